/**
 * Edge cases through libnbd's Python binding (nbdsh), with libnbd's own client-side checks
 * turned off (set_strict_mode(0)) so that bad requests reach the server: reads past the
 * end, zero-length requests, writes on a read-only export, unknown export names in option
 * mode, block status with and without REQ_ONE, many requests in flight. The Python side
 * only observes; every judgement is made here, so a failure shows what the server did.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { CleanupStack } from '../../testkit/cleanup.js';
import { makeImage, makeTempDir, readRange } from '../../testkit/files.js';
import { nbdshEnv, run } from '../../testkit/process.js';
import { needs } from '../../testkit/needs.js';
import { startServer } from '../../testkit/server.js';

const IMAGE_BYTES = 8 << 20;

/** Outcome of one call: its value, or the errno name libnbd reported. */
type Outcome = { ok: unknown } | { err: string; message: string };

const PRELUDE = `
import json, sys
def attempt(fn):
    try:
        r = fn()
        if isinstance(r, (bytes, bytearray)):
            r = {"bytes": len(r), "first": r[0] if len(r) else None, "all_same": len(set(r)) <= 1}
        return {"ok": r}
    except nbd.Error as e:
        return {"err": str(e.errno), "message": e.string}
results = {}
`;

async function nbdsh(script: string): Promise<Record<string, unknown>> {
  const result = await run('nbdsh', ['-c', '-'], { input: `${PRELUDE}\n${script}\nprint("RESULT " + json.dumps(results))\n`, env: nbdshEnv() });
  const line = result.stdout.split('\n').find((l) => l.startsWith('RESULT '));
  assert.ok(line, `nbdsh printed no result:\n${result.stdout}\n${result.stderr}`);
  return JSON.parse(line.slice('RESULT '.length)) as Record<string, unknown>;
}

function outcome(results: Record<string, unknown>, key: string): Outcome {
  const value = results[key];
  assert.ok(value !== undefined, `no result for ${key}: ${JSON.stringify(results)}`);
  return value as Outcome;
}

function assertErr(results: Record<string, unknown>, key: string, errno: string): void {
  const o = outcome(results, key);
  assert.ok('err' in o, `${key}: expected ${errno}, the call succeeded: ${JSON.stringify(o)}`);
  assert.equal(o.err, errno, `${key}: ${o.message}`);
}

function assertOk(results: Record<string, unknown>, key: string): unknown {
  const o = outcome(results, key);
  assert.ok('ok' in o, `${key}: expected success, got ${JSON.stringify(o)}`);
  return o.ok;
}

test('nbdsh: structured replies, base:allocation, block status with and without REQ_ONE', async (t) => {
  if (!needs(t, { tools: ['nbdsh'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup);
  const image = path.join(dir, 'bs.img');
  makeImage(image, IMAGE_BYTES, 'blocks');
  const server = await startServer(cleanup, { images: [image] });
  const r = await nbdsh(`
h.add_meta_context("base:allocation")
h.connect_uri(${JSON.stringify(server.uri(image))})
results["size"] = h.get_size()
results["structured"] = h.get_structured_replies_negotiated()
results["meta"] = h.can_meta_context("base:allocation")
def collect(into):
    def cb(metacontext, offset, entries, err):
        into.append({"context": metacontext, "offset": offset, "entries": list(entries)})
        return 0
    return cb
whole = []
h.block_status(h.get_size(), 0, collect(whole))
results["whole"] = whole
one = []
h.block_status(1 << 20, 4096, collect(one), nbd.CMD_FLAG_REQ_ONE)
results["one"] = one
tail = []
h.block_status(4096, h.get_size() - 4096, collect(tail))
results["tail"] = tail
`);
  assert.equal(r.size, IMAGE_BYTES);
  assert.equal(r.structured, true);
  assert.equal(r.meta, true);

  type Chunk = { context: string; offset: number; entries: number[] };
  const check = (chunks: Chunk[], offsetBytes: number, maxBytes: number, what: string): number[] => {
    assert.equal(chunks.length, 1, `${what}: exactly one chunk for the one context: ${JSON.stringify(chunks)}`);
    const chunk = chunks[0] as Chunk;
    assert.equal(chunk.context, 'base:allocation');
    assert.equal(chunk.offset, offsetBytes);
    assert.ok(chunk.entries.length >= 2 && chunk.entries.length % 2 === 0, `${what}: (length, flags) pairs`);
    let covered = 0;
    for (let i = 0; i < chunk.entries.length; i += 2) {
      const lengthBytes = chunk.entries[i] as number;
      const flags = chunk.entries[i + 1] as number;
      assert.ok(lengthBytes > 0, `${what}: extent lengths are positive`);
      assert.equal(flags & 2, 0, `${what}: data reported as zero at +${covered}`);
      covered += lengthBytes;
    }
    assert.ok(covered <= maxBytes || chunk.entries.length === 2, `${what}: extents cover ${covered} of ${maxBytes}`);
    return chunk.entries;
  };
  check(r.whole as Chunk[], 0, IMAGE_BYTES, 'whole export');
  const one = check(r.one as Chunk[], 4096, 1 << 20, 'REQ_ONE');
  assert.equal(one.length, 2, 'REQ_ONE gives exactly one extent');
  const tail = check(r.tail as Chunk[], IMAGE_BYTES - 4096, 4096, 'last block');
  assert.ok((tail[0] as number) <= 4096, 'the extent does not run past the end of the export');
});

test('nbdsh: out-of-range and zero-length requests get errors and the connection lives on', async (t) => {
  if (!needs(t, { tools: ['nbdsh'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup);
  const image = path.join(dir, 'edge.img');
  makeImage(image, IMAGE_BYTES, 'blocks');
  const server = await startServer(cleanup, { images: [image] });
  const r = await nbdsh(`
h.set_strict_mode(0)
h.connect_uri(${JSON.stringify(server.uri(image))})
size = h.get_size()
results["read_past_end"] = attempt(lambda: h.pread(4096, size))
results["read_across_end"] = attempt(lambda: h.pread(8192, size - 4096))
results["read_far_past_end"] = attempt(lambda: h.pread(512, 1 << 62))
results["write_past_end"] = attempt(lambda: h.pwrite(b"x" * 4096, size))
results["write_across_end"] = attempt(lambda: h.pwrite(b"y" * 8192, size - 4096))
results["trim_past_end"] = attempt(lambda: h.trim(4096, size))
results["zero_past_end"] = attempt(lambda: h.zero(4096, size))
results["read_zero_length"] = attempt(lambda: h.pread(0, 4096))
results["write_zero_length"] = attempt(lambda: h.pwrite(b"", 4096))
results["read_unknown_flag"] = attempt(lambda: h.pread(4096, 0, 1 << 12))
results["read_after"] = attempt(lambda: h.pread(4096, size - 4096))
results["write_after"] = attempt(lambda: h.pwrite(b"\\x42" * 4096, 4096, nbd.CMD_FLAG_FUA))
results["flush_after"] = attempt(lambda: h.flush())
results["read_back"] = attempt(lambda: h.pread(4096, 4096))
`);
  assertErr(r, 'read_past_end', 'EINVAL');
  assertErr(r, 'read_across_end', 'EINVAL');
  assertErr(r, 'read_far_past_end', 'EINVAL');
  assertErr(r, 'write_past_end', 'ENOSPC');
  assertErr(r, 'write_across_end', 'ENOSPC');
  assertErr(r, 'trim_past_end', 'EINVAL');
  const zeroPast = outcome(r, 'zero_past_end');
  assert.ok('err' in zeroPast && (zeroPast.err === 'ENOSPC' || zeroPast.err === 'EINVAL'), `write-zeroes past the end: ${JSON.stringify(zeroPast)}`);
  assertErr(r, 'read_unknown_flag', 'EINVAL');
  // Zero-length requests may be answered or refused (nbdkit says EINVAL for reads and
  // ENOSPC for writes); either way they are per-request errors, never fatal.
  const zeroRead = outcome(r, 'read_zero_length');
  assert.ok('ok' in zeroRead || zeroRead.err === 'EINVAL', `read_zero_length: ${JSON.stringify(zeroRead)}`);
  const zeroWrite = outcome(r, 'write_zero_length');
  assert.ok('ok' in zeroWrite || zeroWrite.err === 'EINVAL' || zeroWrite.err === 'ENOSPC', `write_zero_length: ${JSON.stringify(zeroWrite)}`);
  assert.deepEqual(assertOk(r, 'read_after'), { bytes: 4096, first: ((IMAGE_BYTES - 4096) / 4096) & 0xff, all_same: false });
  assertOk(r, 'write_after');
  assertOk(r, 'flush_after');
  assert.deepEqual(assertOk(r, 'read_back'), { bytes: 4096, first: 0x42, all_same: true });
  assert.ok(readRange(image, 4096, 4096).every((b) => b === 0x42), 'the write after the errors reached the image');
  assert.equal(readRange(image, IMAGE_BYTES - 4096, 4).readUInt32LE(0), IMAGE_BYTES / 4096 - 1, 'the refused writes left the last block alone');
});

test('nbdsh: a read-only export refuses write, trim and zero with EPERM and still reads', async (t) => {
  if (!needs(t, { tools: ['nbdsh'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup);
  const image = path.join(dir, 'ro.img');
  makeImage(image, IMAGE_BYTES, 'blocks');
  const server = await startServer(cleanup, { images: [image], readOnly: true });
  const r = await nbdsh(`
h.set_strict_mode(0)
h.connect_uri(${JSON.stringify(server.uri(image))})
results["read_only"] = h.is_read_only()
results["write"] = attempt(lambda: h.pwrite(b"\\xff" * 65536, 0))
results["write_fua"] = attempt(lambda: h.pwrite(b"\\xff" * 4096, 8192, nbd.CMD_FLAG_FUA))
results["trim"] = attempt(lambda: h.trim(4096, 0))
results["zero"] = attempt(lambda: h.zero(4096, 0))
results["read"] = attempt(lambda: h.pread(4096, 0))
results["flush"] = attempt(lambda: h.flush())
`);
  assert.equal(r.read_only, true);
  assertErr(r, 'write', 'EPERM');
  assertErr(r, 'write_fua', 'EPERM');
  assertErr(r, 'trim', 'EPERM');
  assertErr(r, 'zero', 'EPERM');
  // The 64 KiB payload of the refused write was read and dropped: the next reply is in step.
  assert.deepEqual(assertOk(r, 'read'), { bytes: 4096, first: 0, all_same: false });
  assert.equal(readRange(image, 0, 4).readUInt32LE(0), 0, 'block 0 untouched');
  assert.equal(readRange(image, 8192 + 4, 1)[0], 3, 'block 2 untouched');
});

test('nbdsh: the empty export name, unknown names refused with the handshake still usable', async (t) => {
  if (!needs(t, { tools: ['nbdsh'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup);
  const first = path.join(dir, 'first.img');
  const second = path.join(dir, 'second.img');
  makeImage(first, 1 << 20, 'blocks');
  makeImage(second, 2 << 20, 'blocks');
  const server = await startServer(cleanup, { images: [first, second] });
  const r = await nbdsh(`
h.set_opt_mode(True)
h.connect_unix(${JSON.stringify(server.socketPath)})
names = []
h.opt_list(lambda name, desc: names.append(name) or 0)
results["names"] = sorted(names)
h.set_export_name(${JSON.stringify(path.join(dir, 'missing.img'))})
results["go_unknown"] = attempt(lambda: h.opt_go())
h.set_export_name("no/such/export")
results["info_unknown"] = attempt(lambda: h.opt_info())
h.set_export_name("")
results["go_default"] = attempt(lambda: h.opt_go())
results["size"] = h.get_size()
results["read"] = attempt(lambda: h.pread(4096, 4096))
`);
  assert.deepEqual(r.names, [first, second].sort());
  const unknown = outcome(r, 'go_unknown');
  assert.ok('err' in unknown, `NBD_OPT_GO for an unknown export is refused: ${JSON.stringify(unknown)}`);
  assert.ok('err' in outcome(r, 'info_unknown'), 'NBD_OPT_INFO for an unknown export is refused');
  assertOk(r, 'go_default');
  assert.equal(r.size, 1 << 20, 'the empty name selects the first image');
  assert.deepEqual(assertOk(r, 'read'), { bytes: 4096, first: 1, all_same: false });
});

test('nbdsh: 64 requests in flight on one connection all complete with the right data', async (t) => {
  if (!needs(t, { tools: ['nbdsh'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup);
  const image = path.join(dir, 'aio.img');
  makeImage(image, IMAGE_BYTES, 'blocks');
  const server = await startServer(cleanup, { images: [image] });
  const r = await nbdsh(`
h.connect_uri(${JSON.stringify(server.uri(image))})
bufs = []
cookies = []
for i in range(64):
    b = nbd.Buffer(4096)
    bufs.append(b)
    cookies.append(h.aio_pread(b, ((i * 37) % 2048) * 4096))
writes = [h.aio_pwrite(bytes([i + 1]) * 65536, (4 << 20) + i * 65536) for i in range(32)]
while h.aio_in_flight() > 0:
    h.poll(-1)
ok = 0
for i, (b, c) in enumerate(zip(bufs, cookies)):
    h.aio_command_completed(c)
    data = b.to_bytearray()
    block = ((i * 37) % 2048)
    if int.from_bytes(data[0:4], "little") == block and data[4] == (block % 251) + 1:
        ok += 1
for c in writes:
    h.aio_command_completed(c)
h.flush()
results["reads_ok"] = ok
`);
  assert.equal(r.reads_ok, 64);
  for (let i = 0; i < 32; i++) {
    assert.ok(readRange(image, (4 << 20) + i * 65536, 65536).every((b) => b === i + 1), `aio write ${i} reached the image`);
  }
});
