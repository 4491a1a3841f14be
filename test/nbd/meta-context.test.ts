/**
 * Metadata contexts beyond base:allocation: an export whose handle carries MetaContextSources
 * (a snapshot's frozen change map as qemu:dirty-bitmap contexts, and fakes with odd flags or
 * failures). Checked with our client, with nbdinfo --map and with libnbd's Python binding,
 * and by hand on the wire for the malformed cases.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { NbdClient } from '../../src/nbd/client.js';
import * as C from '../../src/nbd/constants.js';
import { encodeClientFlags, encodeMetaContextData, encodeOption, encodeRequest } from '../../src/nbd/encoders.js';
import type { MetaContextSource } from '../../src/nbd/exports.js';
import { FrozenChangeMap, dirtyBitmapContextName } from '../../src/snapshot/change-map/index.js';
import { nbdshEnv, requireTool, run } from '../../testkit/process.js';
import { nbdUri } from '../../testkit/server.js';
import { RawPeer, serveImage } from './helpers.js';

const SIZE_BYTES = 8 << 20;
const BLOCK_BYTES = 64 * 1024;

/** A frozen map of snapshot 5 with a fixed pattern of numbers 0..5 per block. */
function frozenView(): FrozenChangeMap {
  const blocks = SIZE_BYTES / BLOCK_BYTES;
  const entries = new Uint32Array(blocks);
  for (let i = 0; i < blocks; i++) entries[i] = (i * 7 + (i >> 3)) % 6;
  return new FrozenChangeMap({ generation: '3fa2c1d0', number: 5, blockSize: BLOCK_BYTES, deviceSizeBytes: SIZE_BYTES, entries });
}

const FLAGS_SOURCE: MetaContextSource = {
  name: 'x-test:flags',
  // Longer than asked on purpose: the server cuts it to the request.
  extents: async (_offsetBytes, lengthBytes) => [
    { length: 4096, flags: 0x80000001 },
    { length: 8192, flags: 6 },
    { length: lengthBytes + 1_000_000, flags: 0 },
  ],
};
const FAILING_SOURCE: MetaContextSource = {
  name: 'x-test:failing',
  extents: async () => {
    throw new Error('the source broke');
  },
};
const EMPTY_SOURCE: MetaContextSource = { name: 'x-test:empty', extents: async () => [] };

function serveWithContexts(t: Parameters<typeof serveImage>[0], frozen: FrozenChangeMap) {
  return serveImage(t, { sizeBytes: SIZE_BYTES, metaContexts: [...frozen.contextSources(), FLAGS_SOURCE, FAILING_SOURCE, EMPTY_SOURCE] });
}

/** Extents -> merged byte ranges with flag bit 0 set. */
function dirtyRanges(extents: Array<{ length: number; flags: number }>, startBytes = 0): Array<{ offsetBytes: number; lengthBytes: number }> {
  const out: Array<{ offsetBytes: number; lengthBytes: number }> = [];
  let at = startBytes;
  for (const e of extents) {
    if ((e.flags & 1) !== 0) {
      const prev = out[out.length - 1];
      if (prev && prev.offsetBytes + prev.lengthBytes === at) prev.lengthBytes += e.length;
      else out.push({ offsetBytes: at, lengthBytes: e.length });
    }
    at += e.length;
  }
  return out;
}

test('listMetaContexts: everything, by prefix, by exact name; unknown namespaces match nothing', async (t) => {
  const frozen = frozenView();
  const served = await serveWithContexts(t, frozen);
  const opts = { socketPath: served.socketPath, exportName: served.image };
  const bitmaps = [1, 2, 3, 4].map((n) => dirtyBitmapContextName(frozen.generation, n));
  assert.deepEqual(frozen.contextNames(), bitmaps);

  const all = await NbdClient.listMetaContexts(opts);
  assert.deepEqual(all, [C.BASE_ALLOCATION, ...bitmaps, 'x-test:flags', 'x-test:failing', 'x-test:empty']);
  assert.deepEqual(await NbdClient.listMetaContexts(opts, ['qemu:dirty-bitmap:']), bitmaps);
  assert.deepEqual(await NbdClient.listMetaContexts(opts, ['qemu:']), bitmaps);
  assert.deepEqual(await NbdClient.listMetaContexts(opts, [`qemu:dirty-bitmap:${frozen.generation}:`]), bitmaps);
  assert.deepEqual(await NbdClient.listMetaContexts(opts, ['qemu:dirty-bitmap:00000000:']), []);
  assert.deepEqual(await NbdClient.listMetaContexts(opts, ['base:']), [C.BASE_ALLOCATION]);
  assert.deepEqual(await NbdClient.listMetaContexts(opts, [bitmaps[2]!, 'nope:nothing', 'no-colon']), [bitmaps[2]]);
  // An unknown export offers base:allocation only; GO is where it is refused.
  assert.deepEqual(await NbdClient.listMetaContexts({ ...opts, exportName: '/no/such/export' }), [C.BASE_ALLOCATION]);
  await assert.rejects(NbdClient.connect({ ...opts, exportName: '/no/such/export' }), { code: 'ENOENT' });
});

test('NbdClient: several contexts selected, one chunk each, extents equal the change map', async (t) => {
  const frozen = frozenView();
  const served = await serveWithContexts(t, frozen);
  const since2 = dirtyBitmapContextName(frozen.generation, 2);
  const since4 = dirtyBitmapContextName(frozen.generation, 4);
  const client = await served.connect({
    exportName: served.image,
    // A prefix and unknown names select nothing, and are no error.
    metaContexts: [since2, since4, 'x-test:flags', 'x-test:failing', 'x-test:empty', 'qemu:dirty-bitmap:', 'qemu:dirty-bitmap:ffffffff:1'],
  });
  assert.deepEqual(client.metaContexts.sort(), [C.BASE_ALLOCATION, since2, since4, 'x-test:empty', 'x-test:failing', 'x-test:flags'].sort());
  assert.equal(client.contextAvailable('qemu:dirty-bitmap:'), false);
  assert.equal(client.contextAvailable('qemu:dirty-bitmap:ffffffff:1'), false);
  await assert.rejects(client.blockStatusContext('qemu:dirty-bitmap:ffffffff:1', 0, 4096), { code: 'ENOTSUP' });

  // A failing source and one giving no extents fail the whole request with EIO; the
  // connection goes on. Then a connection without them, for the reads.
  await assert.rejects(client.blockStatusContext(since2, 0, SIZE_BYTES), { code: 'EIO' });
  const good = await served.connect({ exportName: served.image, metaContexts: [since2, since4, 'x-test:flags'] });
  const reply = await good.request(C.NBD_CMD_BLOCK_STATUS, 0, 0, SIZE_BYTES);
  assert.equal(reply.contexts?.size, 4, 'one chunk per selected context');
  for (const since of [2, 4]) {
    const name = dirtyBitmapContextName(frozen.generation, since);
    const extents = await good.blockStatusContext(name, 0, SIZE_BYTES);
    assert.equal(extents.reduce((n, e) => n + e.length, 0), SIZE_BYTES, 'the extents cover the request');
    assert.deepEqual(dirtyRanges(extents), frozen.changedSince(since), `since ${since}`);
    // From an unaligned offset, and one extent with REQ_ONE.
    const at = 3 * BLOCK_BYTES + 512;
    const part = await good.blockStatusContext(name, at, 10 * BLOCK_BYTES);
    assert.deepEqual(dirtyRanges(part, at), frozen.changedSince(since, at, 10 * BLOCK_BYTES));
    const one = await good.blockStatusContext(name, at, 10 * BLOCK_BYTES, { reqOne: true });
    assert.equal(one.length, 1);
    assert.deepEqual(one[0], frozen.extents(since, at, 10 * BLOCK_BYTES)[0]);
  }
  const flags = await good.blockStatusContext('x-test:flags', 0, 1 << 20);
  assert.deepEqual(flags, [{ length: 4096, flags: 0x80000001 }, { length: 8192, flags: 6 }, { length: (1 << 20) - 12288, flags: 0 }]);
  const base = await good.extents(0, SIZE_BYTES);
  assert.ok(base.length >= 1 && base.every((e) => e.length > 0), 'base:allocation still answers');
  // The first connection still works after its errors (its block status keeps failing).
  await client.read(Buffer.alloc(4096), 0);
  await assert.rejects(client.extents(0, 4096), { code: 'EIO' });
});

test('nbdinfo --map=qemu:dirty-bitmap:...: the changed extents equal changedSince', async (t) => {
  requireTool('nbdinfo');
  const frozen = frozenView();
  const served = await serveWithContexts(t, frozen);
  const uri = nbdUri(served.socketPath, served.image);
  const info = JSON.parse((await run('nbdinfo', ['--json', uri])).stdout) as { exports: Array<{ contexts?: string[] }> };
  assert.deepEqual(info.exports[0]?.contexts, [C.BASE_ALLOCATION, ...frozen.contextNames(), 'x-test:flags', 'x-test:failing', 'x-test:empty']);
  const listed = JSON.parse((await run('nbdinfo', ['--list', '--json', uri])).stdout) as { exports: Array<{ 'export-name': string; contexts?: string[] }> };
  assert.deepEqual(listed.exports.find((e) => e['export-name'] === served.image)?.contexts, info.exports[0]?.contexts, 'nbdinfo --list shows them too');
  for (const since of [1, 3, 4]) {
    const name = dirtyBitmapContextName(frozen.generation, since);
    const out = await run('nbdinfo', [`--map=${name}`, '--json', uri]);
    const map = JSON.parse(out.stdout) as Array<{ offset: number; length: number; type: number }>;
    let at = 0;
    for (const e of map) {
      assert.equal(e.offset, at, 'contiguous');
      at += e.length;
    }
    assert.equal(at, SIZE_BYTES, 'the map covers the export');
    const changed = dirtyRanges(map.map((e) => ({ length: e.length, flags: e.type })));
    assert.deepEqual(changed, frozen.changedSince(since), `nbdinfo --map=${name}`);
    assert.ok(changed.length > 0 && changed.length < SIZE_BYTES / BLOCK_BYTES, 'a pattern, not all or nothing');
  }
  // A context the export does not offer: nbdinfo fails and says so.
  const missing = await run('nbdinfo', ['--map=qemu:dirty-bitmap:ffffffff:1', uri], { allowFailure: true });
  assert.notEqual(missing.exitCode, 0);
});

test('libnbd (python): block_status with several contexts, REQ_ONE, and listing in option mode', async (t) => {
  requireTool('nbdsh');
  const frozen = frozenView();
  const served = await serveWithContexts(t, frozen);
  const uri = nbdUri(served.socketPath, served.image);
  const since1 = dirtyBitmapContextName(frozen.generation, 1);
  const since3 = dirtyBitmapContextName(frozen.generation, 3);
  const script = `
import json, nbd
results = {}
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(${JSON.stringify(uri)})
listed = []
h.add_meta_context("qemu:dirty-bitmap:")
h.opt_list_meta_context(lambda name: listed.append(name) or 0)
results["listed"] = listed
h.clear_meta_contexts()
listed_all = []
h.opt_list_meta_context(lambda name: listed_all.append(name) or 0)
results["listed_all"] = listed_all
h.add_meta_context("base:allocation")
h.add_meta_context(${JSON.stringify(since1)})
h.add_meta_context(${JSON.stringify(since3)})
h.add_meta_context("qemu:dirty-bitmap:ffffffff:9")
h.opt_go()
results["can"] = {n: h.can_meta_context(n) for n in ["base:allocation", ${JSON.stringify(since1)}, ${JSON.stringify(since3)}, "qemu:dirty-bitmap:ffffffff:9"]}
def collect(into):
    def cb(ctx, offset, entries, err):
        into.append({"context": ctx, "offset": offset, "entries": list(entries)})
        return 0
    return cb
whole = []
pos = 0
size = h.get_size()
while pos < size:
    got = []
    h.block_status(min(size - pos, 1 << 30), pos, collect(got))
    whole.append(got)
    lens = [sum(c["entries"][0::2]) for c in got]
    pos += min(lens)
results["whole"] = whole
one = []
h.block_status(1 << 20, 3 * 65536 + 512, collect(one), nbd.CMD_FLAG_REQ_ONE)
results["one"] = one
h.shutdown()
print("RESULT " + json.dumps(results))
`;
  const out = await run('/usr/bin/python3', ['-c', script], { env: nbdshEnv() });
  const line = out.stdout.split('\n').find((l) => l.startsWith('RESULT '));
  assert.ok(line, out.stdout + out.stderr);
  type Chunk = { context: string; offset: number; entries: number[] };
  const r = JSON.parse(line.slice(7)) as { listed: string[]; listed_all: string[]; can: Record<string, boolean>; whole: Chunk[][]; one: Chunk[] };
  assert.deepEqual(r.listed, frozen.contextNames());
  assert.ok(r.listed_all.includes(C.BASE_ALLOCATION) && r.listed_all.includes(since3) && r.listed_all.includes('x-test:flags'), JSON.stringify(r.listed_all));
  assert.deepEqual(r.can, { 'base:allocation': true, [since1]: true, [since3]: true, 'qemu:dirty-bitmap:ffffffff:9': false });

  // Every reply has exactly one chunk per selected context, each contiguous from the offset.
  const bySince = new Map<string, Array<{ length: number; flags: number }>>([[since1, []], [since3, []]]);
  let at = 0;
  for (const reply of r.whole) {
    assert.deepEqual(reply.map((c) => c.context).sort(), [C.BASE_ALLOCATION, since1, since3].sort());
    let step = Infinity;
    for (const c of reply) {
      assert.equal(c.offset, at);
      step = Math.min(step, c.entries.filter((_, i) => i % 2 === 0).reduce((a, b) => a + b, 0));
    }
    // Keep only what every context covered (the loop above moved on by that much).
    for (const c of reply) {
      const list = bySince.get(c.context);
      if (!list) continue;
      let left = step;
      for (let i = 0; i < c.entries.length && left > 0; i += 2) {
        const length = Math.min(c.entries[i]!, left);
        list.push({ length, flags: c.entries[i + 1]! });
        left -= length;
      }
    }
    at += step;
  }
  assert.equal(at, SIZE_BYTES);
  assert.deepEqual(dirtyRanges(bySince.get(since1)!), frozen.changedSince(1));
  assert.deepEqual(dirtyRanges(bySince.get(since3)!), frozen.changedSince(3));
  assert.equal(r.one.length, 3, 'REQ_ONE: still one chunk per context');
  for (const c of r.one) assert.equal(c.entries.length, 2, `REQ_ONE: one extent for ${c.context}`);
});

/** Read one option reply: [type, data]. */
async function optionReply(peer: RawPeer): Promise<{ option: number; type: number; data: Buffer }> {
  const h = await peer.read(C.OPTION_REPLY_HEADER_BYTES);
  const length = h.readUInt32BE(16);
  return { option: h.readUInt32BE(8), type: h.readUInt32BE(12) >>> 0, data: length > 0 ? await peer.read(length) : Buffer.alloc(0) };
}

test('malformed meta-context options get error replies and the haggling goes on', async (t) => {
  const frozen = frozenView();
  const served = await serveWithContexts(t, frozen);
  const peer = await RawPeer.connect(served.socketPath);
  t.after(() => peer.destroy());
  await peer.read(18);
  peer.write(encodeClientFlags(C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES));
  const since2 = dirtyBitmapContextName(frozen.generation, 2);

  // Before structured replies: invalid.
  peer.write(encodeOption(C.NBD_OPT_SET_META_CONTEXT, encodeMetaContextData(served.image, [since2])));
  assert.equal((await optionReply(peer)).type, C.NBD_REP_ERR_INVALID);
  peer.write(encodeOption(C.NBD_OPT_STRUCTURED_REPLY));
  assert.equal((await optionReply(peer)).type, C.NBD_REP_ACK);

  // A query length past the option data, a count past it, trailing bytes, a short option.
  const good = encodeMetaContextData(served.image, [since2]);
  const longQuery = Buffer.from(good);
  longQuery.writeUInt32BE(1000, 4 + Buffer.byteLength(served.image) + 4);
  const bigCount = Buffer.from(good);
  bigCount.writeUInt32BE(5, 4 + Buffer.byteLength(served.image));
  for (const [what, data] of [['long query', longQuery], ['big count', bigCount], ['trailing', Buffer.concat([good, Buffer.from([0])])], ['short', Buffer.alloc(5)]] as const) {
    for (const option of [C.NBD_OPT_LIST_META_CONTEXT, C.NBD_OPT_SET_META_CONTEXT]) {
      peer.write(encodeOption(option, data));
      const reply = await optionReply(peer);
      assert.equal(reply.option, option);
      assert.equal(reply.type, C.NBD_REP_ERR_INVALID, `${what}, option ${option}`);
    }
  }

  // A failed SET selected nothing: now a good one, with ids that differ.
  peer.write(encodeOption(C.NBD_OPT_SET_META_CONTEXT, encodeMetaContextData(served.image, [since2, C.BASE_ALLOCATION, since2, 'x-test:flags'])));
  const ids = new Map<string, number>();
  for (;;) {
    const reply = await optionReply(peer);
    if (reply.type === C.NBD_REP_ACK) break;
    assert.equal(reply.type, C.NBD_REP_META_CONTEXT);
    ids.set(reply.data.toString('utf8', 4), reply.data.readUInt32BE(0));
  }
  assert.deepEqual([...ids.keys()].sort(), [C.BASE_ALLOCATION, since2, 'x-test:flags'].sort(), 'a name asked twice is selected once');
  assert.equal(new Set(ids.values()).size, 3, 'each context has its own id');

  // Enter transmission on that export and ask past the end: EINVAL, then a good request.
  peer.write(encodeOption(C.NBD_OPT_EXPORT_NAME, Buffer.from(served.image)));
  await peer.read(10);
  peer.write(encodeRequest(0, C.NBD_CMD_BLOCK_STATUS, 0, 1, SIZE_BYTES - 4096, 8192));
  const err = await peer.read(C.STRUCTURED_REPLY_HEADER_BYTES);
  assert.equal(err.readUInt16BE(6), C.NBD_REPLY_TYPE_ERROR);
  const errPayload = await peer.read(err.readUInt32BE(16));
  assert.equal(errPayload.readUInt32BE(0), C.NBD_EINVAL);
  peer.write(encodeRequest(C.NBD_CMD_FLAG_REQ_ONE, C.NBD_CMD_BLOCK_STATUS, 0, 2, 0, 1 << 20));
  const seen = new Set<number>();
  for (let i = 0; i < 3; i++) {
    const h = await peer.read(C.STRUCTURED_REPLY_HEADER_BYTES);
    assert.equal(h.readUInt16BE(6), C.NBD_REPLY_TYPE_BLOCK_STATUS);
    assert.equal(h.readUInt32BE(12), 2);
    assert.equal(h.readUInt32BE(16), 12, 'REQ_ONE: one descriptor');
    const payload = await peer.read(12);
    seen.add(payload.readUInt32BE(0));
    assert.equal((h.readUInt16BE(4) & C.NBD_REPLY_FLAG_DONE) !== 0, i === 2, 'DONE on the last chunk only');
  }
  assert.deepEqual([...seen].sort(), [...ids.values()].sort());
});

test('a context that disappears between SET and GO answers EIO, the others still answer', async (t) => {
  const frozen = frozenView();
  const sources: MetaContextSource[] = [...frozen.contextSources()];
  const served = await serveImage(t, { sizeBytes: SIZE_BYTES, metaContexts: sources });
  const since1 = dirtyBitmapContextName(frozen.generation, 1);
  const peer = await RawPeer.connect(served.socketPath);
  t.after(() => peer.destroy());
  await peer.read(18);
  peer.write(encodeClientFlags(C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES));
  peer.write(encodeOption(C.NBD_OPT_STRUCTURED_REPLY));
  await optionReply(peer);
  peer.write(encodeOption(C.NBD_OPT_SET_META_CONTEXT, encodeMetaContextData(served.image, [since1])));
  assert.equal((await optionReply(peer)).type, C.NBD_REP_META_CONTEXT);
  assert.equal((await optionReply(peer)).type, C.NBD_REP_ACK);
  sources.splice(0, sources.length);
  peer.write(encodeOption(C.NBD_OPT_EXPORT_NAME, Buffer.from(served.image)));
  await peer.read(10);
  peer.write(encodeRequest(0, C.NBD_CMD_BLOCK_STATUS, 0, 7, 0, 4096));
  const h = await peer.read(C.STRUCTURED_REPLY_HEADER_BYTES);
  assert.equal(h.readUInt16BE(6), C.NBD_REPLY_TYPE_ERROR);
  assert.equal((await peer.read(h.readUInt32BE(16))).readUInt32BE(0), C.NBD_EIO);
});
