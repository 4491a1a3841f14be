/** NbdServer + NbdClient round trips over a unix socket against a real FileDevice on a temp image. */

import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { spawn } from 'node:child_process';
import path from 'node:path';
import { BdsnapError } from '../../src/errors.js';
import * as C from '../../src/nbd/constants.js';
import { NbdClient } from '../../src/nbd/client.js';
import { NbdServer } from '../../src/nbd/server.js';
import { StaticExports } from '../../src/nbd/static-exports.js';
import { encodeOption, encodeRequest, encodeInfoRequestData } from '../../src/nbd/encoders.js';
import { FileDevice } from '../../src/device/file-device.js';
import { PassThroughDevice } from '../../src/device/pass-through.js';
import { GatedDevice } from '../helpers/devices.js';
import type { WriteOptions } from '../../src/device/block-device.js';
import { loadLibc } from '../../src/host/libc.js';
import { RawNbdClient } from '../helpers/raw-nbd.js';
import { makeImage } from '../../testkit/files.js';
import { RawPeer, serveImage, tempDir, waitFor } from './helpers.js';

const MiB = 1 << 20;

function hasCode(code: string) {
  return (e: unknown): boolean => e instanceof BdsnapError && e.code === code;
}

function pattern(n: number, seed: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + seed) & 0xff;
  return b;
}

/**
 * A FileDevice on a new zero image of `sizeBytes`, seen through `layer` (properties over it, as
 * Object.create gives them: a slow or failing method), served alone on a unix socket.
 */
async function serveLayered(t: TestContext, sizeBytes: number, layer: (file: FileDevice) => PropertyDescriptorMap) {
  const dir = tempDir(t);
  const image = path.join(dir, 'i.img');
  makeImage(image, sizeBytes, 0);
  const file = await FileDevice.open(image);
  t.after(() => file.close());
  const exports = new StaticExports([{ name: image, device: Object.create(file, layer(file)) as FileDevice }]);
  const server = new NbdServer({ exports });
  const socketPath = path.join(dir, 'i.sock');
  await server.listenUnix(socketPath);
  t.after(() => server.close());
  return { image, exports, server, socketPath };
}

for (const structuredReplies of [true, false]) {
  test(`read/write/flush/trim/zero/cache round trip (${structuredReplies ? 'structured' : 'simple'} replies)`, async (t) => {
    const s = await serveImage(t, { sizeBytes: 4 * MiB });
    const c = await s.connect({ structuredReplies });
    assert.equal(c.structuredReplies, structuredReplies);
    assert.equal(c.size, 4 * MiB);
    assert.equal(c.exportName, s.image);
    assert.equal(c.blockSizes.minimum, 512);
    const f = c.transmissionFlags;
    for (const flag of [C.NBD_FLAG_HAS_FLAGS, C.NBD_FLAG_SEND_FLUSH, C.NBD_FLAG_SEND_FUA, C.NBD_FLAG_SEND_TRIM,
      C.NBD_FLAG_SEND_WRITE_ZEROES, C.NBD_FLAG_SEND_FAST_ZERO, C.NBD_FLAG_SEND_CACHE, C.NBD_FLAG_CAN_MULTI_CONN]) {
      assert.ok((f & flag) !== 0, `flag ${flag}`);
    }
    assert.equal((f & C.NBD_FLAG_READ_ONLY) !== 0, false);
    assert.equal((f & C.NBD_FLAG_SEND_DF) !== 0, structuredReplies);

    const data = pattern(64 * 1024, 7);
    await c.write(data, MiB, { fua: true });
    const back = Buffer.alloc(data.length);
    await c.read(back, MiB);
    assert.deepEqual(back, data);
    // Written through the server means written to the file.
    const onDisk = Buffer.alloc(data.length);
    const fd = fs.openSync(s.image, 'r');
    fs.readSync(fd, onDisk, 0, onDisk.length, MiB);
    fs.closeSync(fd);
    assert.deepEqual(onDisk, data);

    await c.flush();
    await c.trim(MiB, 4096);
    await c.zero(MiB, 8192, { noHole: true });
    await c.read(back, MiB);
    assert.ok(back.subarray(0, 8192).every((b) => b === 0));
    assert.deepEqual(back.subarray(8192), data.subarray(8192));
    await c.cache(0, MiB);
    // FileDevice has no fast zero: the server says so at once and changes nothing.
    await assert.rejects(c.zero(MiB + 8192, 4096, { fastZero: true }), hasCode('ENOTSUP'));
    await c.read(back, MiB);
    assert.deepEqual(back.subarray(8192), data.subarray(8192));
    // Zero-length requests succeed without touching anything.
    await c.write(Buffer.alloc(0), 0);
    assert.equal((await c.request(C.NBD_CMD_READ, 0, 0, 0)).data?.length, 0);
    await c.close();
  });
}

/** Offers readInto, and gives back a Buffer other than the one it was handed, as a device on another thread does. */
class ReadIntoDevice extends PassThroughDevice {
  reads = 0;
  readIntos = 0;

  override read(target: Buffer, offsetBytes: number): Promise<void> {
    this.reads++;
    return super.read(target, offsetBytes);
  }

  async readInto(buf: Buffer, atBytes: number, offsetBytes: number): Promise<Buffer> {
    this.readIntos++;
    const back = Buffer.alloc(buf.length);
    await super.read(back.subarray(atBytes), offsetBytes);
    return back;
  }
}

test('a device that offers readInto is read through it, and the reply is built from the buffer it gives back', async (t) => {
  const content = pattern(MiB, 3);
  let device: ReadIntoDevice | undefined;
  const s = await serveImage(t, { sizeBytes: MiB, fill: (b) => content.copy(b), wrap: (d) => (device = new ReadIntoDevice(d)) });
  for (const structuredReplies of [true, false]) {
    const c = await s.connect({ structuredReplies });
    const back = Buffer.alloc(65536);
    await c.read(back, 4096);
    assert.deepEqual(back, content.subarray(4096, 4096 + back.length), `${structuredReplies ? 'structured' : 'simple'} replies`);
    await c.close();
  }
  assert.deepEqual([device?.readIntos, device?.reads], [2, 0], 'each READ went through readInto');
});

test('structured READ: all-zero data comes as a hole chunk, other data as a data chunk; block status', async (t) => {
  const s = await serveImage(t, { sizeBytes: MiB, fill: (b) => b.fill(0x77, 0, 65536) });
  const c = await s.connect();
  const data = await c.request(C.NBD_CMD_READ, 0, 0, 65536);
  assert.equal(data.holeChunks, 0);
  assert.ok(data.data?.every((b) => b === 0x77));
  const hole = await c.request(C.NBD_CMD_READ, C.NBD_CMD_FLAG_DF, 65536, 65536);
  assert.equal(hole.holeChunks, 1);
  assert.ok(hole.data?.every((b) => b === 0));
  assert.ok(c.blockStatusAvailable);
  const all = await c.request(C.NBD_CMD_BLOCK_STATUS, 0, 4096, 8192);
  assert.deepEqual(all.extents, [{ length: 8192, flags: 0 }]);
  const one = await c.request(C.NBD_CMD_BLOCK_STATUS, C.NBD_CMD_FLAG_REQ_ONE, 0, 512);
  assert.deepEqual(one.extents, [{ length: 512, flags: 0 }]);
  await assert.rejects(c.request(C.NBD_CMD_BLOCK_STATUS, 0, MiB - 512, 1024), hasCode('EINVAL'));
  await c.close();
});

test('block status without a selected context, and DF without structured replies, are EINVAL', async (t) => {
  const s = await serveImage(t);
  const c = await s.connect({ structuredReplies: false });
  assert.equal(c.blockStatusAvailable, false);
  await assert.rejects(c.request(C.NBD_CMD_BLOCK_STATUS, 0, 0, 4096), hasCode('EINVAL'));
  await assert.rejects(c.request(C.NBD_CMD_READ, C.NBD_CMD_FLAG_DF, 0, 4096), hasCode('EINVAL'));
  await c.read(Buffer.alloc(512), 0);
  await c.close();
});

test('out-of-range and misaligned requests get the right errno and the connection lives on', async (t) => {
  const size = MiB;
  const s = await serveImage(t, { sizeBytes: size });
  for (const structuredReplies of [true, false]) {
    const c = await s.connect({ structuredReplies });
    const buf = Buffer.alloc(4096);
    await assert.rejects(c.read(buf, size - 512), hasCode('EINVAL'));
    await assert.rejects(c.write(buf, size - 512), hasCode('ENOSPC'));
    await assert.rejects(c.zero(size - 512, 4096), hasCode('ENOSPC'));
    await assert.rejects(c.trim(size - 512, 4096), hasCode('EINVAL'));
    await assert.rejects(c.cache(size, 512), hasCode('EINVAL'));
    await assert.rejects(c.request(C.NBD_CMD_READ, 0, 2 ** 60, 512), hasCode('EINVAL'));
    await assert.rejects(c.read(buf.subarray(0, 100), 0), hasCode('EINVAL'));
    await assert.rejects(c.read(buf, 100), hasCode('EINVAL'));
    await assert.rejects(c.write(buf.subarray(0, 1000), 0), hasCode('EINVAL'));
    await assert.rejects(c.request(C.NBD_CMD_FLUSH, 0, 512, 0), hasCode('EINVAL'));
    // Still usable.
    await c.write(pattern(4096, 1), size - 4096);
    await c.read(buf, size - 4096);
    assert.deepEqual(buf, pattern(4096, 1));
    await c.close();
  }
});

test('unknown commands and flags are EINVAL and the connection lives on', async (t) => {
  const s = await serveImage(t);
  const c = await s.connect();
  await assert.rejects(c.request(99, 0, 0, 0), hasCode('EINVAL'));
  await assert.rejects(c.request(C.NBD_CMD_RESIZE, 0, 0, 0), hasCode('EINVAL'));
  await assert.rejects(c.request(C.NBD_CMD_READ, 1 << 9, 0, 512), hasCode('EINVAL'));
  await assert.rejects(c.request(C.NBD_CMD_WRITE, C.NBD_CMD_FLAG_REQ_ONE, 0, 512, Buffer.alloc(512)), hasCode('EINVAL'));
  await c.write(pattern(512, 3), 0);
  const back = Buffer.alloc(512);
  await c.read(back, 0);
  assert.deepEqual(back, pattern(512, 3));
  await c.close();
});

test('a read-only export refuses writes with EPERM and still reads', async (t) => {
  const s = await serveImage(t, { readOnly: true, fill: (b) => b.fill(9) });
  const c = await s.connect();
  assert.ok(c.readOnly);
  await assert.rejects(c.write(Buffer.alloc(512), 0), hasCode('EPERM'));
  await assert.rejects(c.trim(0, 512), hasCode('EPERM'));
  await assert.rejects(c.zero(0, 512), hasCode('EPERM'));
  const back = Buffer.alloc(512);
  await c.read(back, 0);
  assert.ok(back.every((b) => b === 9));
  await c.close();
});

test('the payload of a rejected WRITE is read and discarded, even past the payload cap', async (t) => {
  const s = await serveImage(t, { sizeBytes: MiB });
  const c = await s.connect();
  // Its payload looks like requests: if the server parsed it as such, the next reply would be wrong.
  const fake = Buffer.alloc(4096);
  for (let i = 0; i + 28 <= fake.length; i += 28) encodeRequest(0, C.NBD_CMD_DISC, 0, 0, 0, 0).copy(fake, i);
  await assert.rejects(c.write(fake, MiB), hasCode('ENOSPC'));
  await assert.rejects(c.write(Buffer.alloc(33 * MiB, 1), 0), hasCode('EINVAL'));
  const back = Buffer.alloc(4096);
  await c.read(back, 0);
  assert.ok(back.every((b) => b === 0), 'nothing of the rejected writes reached the device');
  await c.close();
});

test('many requests in flight on one connection all land where they were aimed', async (t) => {
  const s = await serveImage(t, { sizeBytes: 8 * MiB });
  const c = await s.connect();
  const n = 256;
  const writes = [];
  for (let i = 0; i < n; i++) writes.push(c.write(pattern(16384, i), i * 16384));
  await waitFor(() => c.requestsInFlight > 1, 5000, 'requests in flight');
  await Promise.all(writes);
  const reads = [];
  for (let i = 0; i < n; i++) {
    const b = Buffer.alloc(16384);
    reads.push(c.read(b, i * 16384).then(() => b));
  }
  const results = await Promise.all(reads);
  results.forEach((b, i) => assert.deepEqual(b, pattern(16384, i), `block ${i}`));
  await c.close();
});

test('a slow request does not hold back a later one: replies come out of order', { timeout: 20_000 }, async (t) => {
  let gated: GatedDevice | undefined;
  const s = await serveImage(t, { fill: (b) => b.fill(7), wrap: (d) => (gated = new GatedDevice(d)) });
  assert.ok(gated);
  gated.hold((kind, offsetBytes) => kind === 'read' && offsetBytes === 0);
  const raw = await RawNbdClient.connect(s.socketPath, 5000);
  t.after(() => raw.destroy());
  assert.equal((await raw.go(s.image)).type, C.NBD_REP_ACK);
  const slow = raw.sendRequest(C.NBD_CMD_READ, 0n, 4096);
  const fast = raw.sendRequest(C.NBD_CMD_READ, 4096n, 4096);
  const first = await raw.readSimpleReply(4096).finally(() => gated!.release());
  assert.equal(first.cookie, fast, 'the reply to the second request comes first');
  assert.deepEqual(gated.started.map((r) => r.offsetBytes), [0, 4096], 'both reads reached the device');
  const second = await raw.readSimpleReply(4096);
  assert.deepEqual([second.cookie, second.error], [slow, 0]);
  assert.ok(first.data.every((b) => b === 7) && second.data.every((b) => b === 7));
  await raw.disconnect();
});

test('backpressure: at the in-flight cap the server stops taking requests, then resumes', { timeout: 30_000 }, async (t) => {
  let gated: GatedDevice | undefined;
  const s = await serveImage(t, { sizeBytes: 16 * MiB, maxInFlightBytesPerConnection: MiB, wrap: (d) => (gated = new GatedDevice(d)) });
  assert.ok(gated);
  gated.hold((kind) => kind === 'write');
  const c = await s.connect();
  const ops = [];
  for (let i = 0; i < 16; i++) ops.push(c.write(pattern(MiB, i), i * MiB));
  // The first 1 MiB write fills the cap: the server must not start the others while it is held.
  let startedWhileHeld: number;
  try {
    await waitFor(() => gated!.started.length >= 1, 5000, 'the first write to reach the device');
    await new Promise((r) => setTimeout(r, 300));
    startedWhileHeld = gated.started.length;
  } finally {
    gated.release(); // a failed test must not leave writes held: closing the server waits for them
  }
  assert.equal(startedWhileHeld, 1, `paused at the cap: ${startedWhileHeld} writes started while the first is held`);
  await Promise.all(ops);
  assert.equal(gated.started.length, 16, 'every write went through after the release');
  const reads = [];
  for (let i = 0; i < 16; i++) reads.push(c.request(C.NBD_CMD_READ, 0, i * MiB, MiB));
  const got = await Promise.all(reads);
  got.forEach((r, i) => assert.deepEqual(r.data, pattern(MiB, i)));
  await c.close();
});

test('garbage bytes close only that connection', async (t) => {
  const s = await serveImage(t);
  const good = await s.connect();
  const raw = await RawPeer.connect(s.socketPath);
  await raw.enterTransmission();
  raw.write(Buffer.from('this is not an NBD request, not at all'));
  await raw.closed;
  assert.ok(s.events.some((e) => e.event === 'protocol-error' && /bad request magic/.test(String(e.error))));
  const b = Buffer.alloc(512);
  await good.read(b, 0);
  // Garbage during the handshake too.
  const raw2 = await RawPeer.connect(s.socketPath);
  await raw2.read(18);
  raw2.write(Buffer.alloc(4));
  raw2.write(Buffer.from('garbage garbage garbage'));
  await raw2.closed;
  await good.read(b, 0);
  await waitFor(() => s.server.connectionCount === 1, 5000, 'the bad connections to go');
  await good.close();
});

test('unknown client flags close the connection', { timeout: 10_000 }, async (t) => {
  const s = await serveImage(t);
  const raw = await RawPeer.connect(s.socketPath);
  await raw.read(18);
  raw.write(Buffer.from([0, 0, 0, 0x80]));
  const closed = await Promise.race([raw.closed.then(() => true), new Promise<false>((r) => setTimeout(() => r(false), 3000))]);
  assert.equal(closed, true, 'the server closes the connection within 3 s');
  await assert.rejects(raw.read(1, 100), /socket closed after 0 of 1 bytes/, 'nothing is sent after the greeting');
  assert.ok(s.events.some((e) => e.event === 'protocol-error' && /unknown client flags 0x80/.test(String(e.error))), JSON.stringify(s.events));
  await waitFor(() => s.server.connectionCount === 0, 3000, 'the connection to go');
});

test('options: unknown ones get ERR_UNSUP and haggling goes on; LIST; INFO of an unknown export; ABORT', async (t) => {
  const s = await serveImage(t);
  const raw = await RawPeer.connect(s.socketPath);
  const greeting = await raw.read(18);
  assert.equal(greeting.readUInt16BE(16), C.NBD_FLAG_FIXED_NEWSTYLE | C.NBD_FLAG_NO_ZEROES);
  raw.write(Buffer.from([0, 0, 0, 3]));
  const reply = async (): Promise<{ option: number; type: number; data: Buffer }> => {
    const h = await raw.read(20);
    assert.equal(h.readBigUInt64BE(0), C.NBD_REP_MAGIC);
    const data = await raw.read(h.readUInt32BE(16));
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data };
  };
  for (const opt of [C.NBD_OPT_EXTENDED_HEADERS, 12345]) {
    raw.write(encodeOption(opt));
    const r = await reply();
    assert.equal(r.option, opt);
    assert.equal(r.type, C.NBD_REP_ERR_UNSUP);
  }
  // TLS is known but not enabled here: refused by policy, and haggling goes on in plaintext.
  raw.write(encodeOption(C.NBD_OPT_STARTTLS));
  assert.equal((await reply()).type, C.NBD_REP_ERR_POLICY);
  raw.write(encodeOption(C.NBD_OPT_LIST));
  const server = await reply();
  assert.equal(server.type, C.NBD_REP_SERVER);
  assert.equal(server.data.toString('utf8', 4), s.image);
  assert.equal((await reply()).type, C.NBD_REP_ACK);
  raw.write(encodeOption(C.NBD_OPT_LIST, Buffer.from('x')));
  assert.equal((await reply()).type, C.NBD_REP_ERR_INVALID);
  raw.write(encodeOption(C.NBD_OPT_SET_META_CONTEXT, Buffer.alloc(8)));
  assert.equal((await reply()).type, C.NBD_REP_ERR_INVALID, 'meta contexts need structured replies first');
  raw.write(encodeOption(C.NBD_OPT_INFO, encodeInfoRequestData('/no/such/export', [])));
  assert.equal((await reply()).type, C.NBD_REP_ERR_UNKNOWN);
  raw.write(encodeOption(C.NBD_OPT_INFO, Buffer.from([0, 0, 0, 200, 0, 0])));
  assert.equal((await reply()).type, C.NBD_REP_ERR_INVALID);
  raw.write(encodeOption(C.NBD_OPT_GO, Buffer.alloc(70 * 1024)));
  assert.equal((await reply()).type, C.NBD_REP_ERR_TOO_BIG);
  raw.write(encodeOption(C.NBD_OPT_INFO, encodeInfoRequestData('', [C.NBD_INFO_NAME, C.NBD_INFO_DESCRIPTION])));
  const infos = new Map<number, Buffer>();
  for (;;) {
    const r = await reply();
    if (r.type === C.NBD_REP_ACK) break;
    assert.equal(r.type, C.NBD_REP_INFO);
    infos.set(r.data.readUInt16BE(0), r.data);
  }
  assert.equal(infos.get(C.NBD_INFO_EXPORT)?.readBigUInt64BE(2), 1n << 20n);
  assert.equal(infos.get(C.NBD_INFO_NAME)?.toString('utf8', 2), s.image);
  assert.equal(infos.get(C.NBD_INFO_DESCRIPTION)?.toString('utf8', 2), 'test image');
  assert.equal(infos.get(C.NBD_INFO_BLOCK_SIZE)?.readUInt32BE(2), 512);
  assert.equal(s.exports.openHandles, 0, 'the INFO handle was released');
  raw.write(encodeOption(C.NBD_OPT_ABORT));
  assert.equal((await reply()).type, C.NBD_REP_ACK);
  await raw.closed;
});

test('connecting to an unknown export fails with ENOENT', async (t) => {
  const s = await serveImage(t);
  await assert.rejects(NbdClient.connect({ socketPath: s.socketPath, exportName: '/nope' }), hasCode('ENOENT'));
  const c = await NbdClient.connect({ socketPath: s.socketPath, exportName: s.image });
  assert.equal(c.exportName, s.image);
  await c.close();
});

test('a client vanishing mid-request does not crash the server; its handle is released once', async (t) => {
  const s = await serveImage(t, { sizeBytes: 4 * MiB });
  for (let round = 0; round < 5; round++) {
    const raw = await RawPeer.connect(s.socketPath);
    await raw.enterTransmission();
    // A write whose payload never fully arrives, plus reads whose replies nobody reads.
    for (let i = 0; i < 8; i++) raw.write(encodeRequest(0, C.NBD_CMD_READ, 0, i, 0, MiB));
    raw.write(encodeRequest(0, C.NBD_CMD_WRITE, 0, 99, 0, MiB));
    raw.write(Buffer.alloc(MiB / 2, 1));
    await new Promise((r) => setTimeout(r, round * 5));
    raw.destroy();
  }
  await waitFor(() => s.server.connectionCount === 0 && s.exports.openHandles === 0, 5000, 'connections to be released');
  const c = await s.connect();
  const b = Buffer.alloc(4096);
  await c.read(b, 0);
  assert.ok(b.every((x) => x === 0), 'the half-sent write was never applied');
  await c.close();
  await waitFor(() => s.exports.openHandles === 0, 5000, 'the last handle');
});

test('graceful close: requests in flight finish and reply, the device is flushed, everything is released', async (t) => {
  // A slow layer over the file, so the close surely happens while writes are in flight.
  let started = 0;
  let flushes = 0;
  const { image, exports, server, socketPath: sock } = await serveLayered(t, 4 * MiB, (file) => ({
    write: { value: async (data: Buffer, offsetBytes: number) => {
      started++;
      await new Promise((r) => setTimeout(r, 100));
      await file.write(data, offsetBytes);
    } },
    flush: { value: async () => {
      flushes++;
      await file.flush();
    } },
    // The file's own writeNow would write at once, past the delay.
    writeNow: { value: undefined },
  }));
  const c = await NbdClient.connect({ socketPath: sock });
  const n = 16;
  const results: Array<Promise<string>> = [];
  for (let i = 0; i < n; i++) results.push(c.write(pattern(65536, i), i * 65536).then(() => 'ok', (e: BdsnapError) => e.code));
  await waitFor(() => started === n, 5000, 'every write to be in flight');
  await server.close();
  assert.deepEqual(await Promise.all(results), Array(n).fill('ok'));
  assert.ok(flushes >= 1, 'the device was flushed');
  assert.equal(server.connectionCount, 0);
  assert.equal(exports.openHandles, 0);
  const content = fs.readFileSync(image);
  for (let i = 0; i < n; i++) assert.deepEqual(content.subarray(i * 65536, (i + 1) * 65536), pattern(65536, i), `write ${i}`);
  await assert.rejects(c.read(Buffer.alloc(512), 0), hasCode('ESHUTDOWN'));
  await assert.rejects(NbdClient.connect({ socketPath: sock }), hasCode('ENOENT'));
});

test('listenUnix: mode 0600, a stale socket file is replaced, a live one is EBUSY', async (t) => {
  const dir = tempDir(t);
  const image = path.join(dir, 'x.img');
  makeImage(image, 65536, 0);
  const sock = path.join(dir, 's.sock');
  // A stale socket: its owner was killed, so nobody unlinked it.
  const owner = spawn(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(sock)}, () => console.log('up'))`]);
  await new Promise((r) => owner.stdout.once('data', r));
  owner.kill('SIGKILL');
  await new Promise((r) => owner.once('exit', r));
  assert.ok(fs.lstatSync(sock).isSocket());
  const device = await FileDevice.open(image);
  t.after(() => device.close());
  const server = new NbdServer({ exports: new StaticExports([{ name: image, device }]) });
  t.after(() => server.close());
  await server.listenUnix(sock);
  assert.equal(fs.statSync(sock).mode & 0o777, 0o600);
  const second = new NbdServer({ exports: new StaticExports([{ name: image, device }]) });
  await assert.rejects(second.listenUnix(sock), hasCode('EBUSY'));
  const plain = path.join(dir, 'plain');
  fs.writeFileSync(plain, 'x');
  await assert.rejects(second.listenUnix(plain), hasCode('EINVAL'));
  await second.close();
  const c = await NbdClient.connect({ socketPath: sock });
  await c.close();
});

test('TCP listener with TCP_NODELAY serves the same export', async (t) => {
  const dir = tempDir(t);
  const image = path.join(dir, 'x.img');
  fs.writeFileSync(image, pattern(65536, 5));
  const device = await FileDevice.open(image);
  t.after(() => device.close());
  const server = new NbdServer({ exports: new StaticExports([{ name: image, device }]) });
  t.after(() => server.close());
  const { port } = await server.listenTcp('127.0.0.1', 0);
  assert.ok(port > 0);
  const c = await NbdClient.connect({ host: '127.0.0.1', port });
  const b = Buffer.alloc(65536);
  await c.read(b, 0);
  assert.deepEqual(b, pattern(65536, 5));
  await c.close();
});

test('a client that never reads its replies cannot make the server buffer without bound', async (t) => {
  const s = await serveImage(t, { sizeBytes: 8 * MiB, fill: (b) => b.fill(1), maxInFlightBytesPerConnection: 4 * MiB });
  const raw = await RawPeer.connect(s.socketPath);
  await raw.enterTransmission();
  raw.socket.pause();
  const before = process.memoryUsage().arrayBuffers;
  const requests = 256; // 256 MiB of READ replies asked for
  for (let i = 0; i < requests; i++) raw.write(encodeRequest(0, C.NBD_CMD_READ, 0, i, (i % 8) * MiB, MiB));
  let peak = 0;
  for (let i = 0; i < 40; i++) {
    await new Promise((r) => setTimeout(r, 25));
    peak = Math.max(peak, process.memoryUsage().arrayBuffers - before);
  }
  assert.ok(peak < 64 * MiB, `server buffered ${Math.round(peak / MiB)} MiB`);
  // Now read everything: all 256 replies arrive, each with its data.
  raw.socket.resume();
  for (let i = 0; i < requests; i++) {
    const header = await raw.read(16, 10000);
    assert.equal(header.readUInt32BE(4), 0);
    const data = await raw.read(MiB, 10000);
    assert.equal(data[0], 1);
  }
  raw.destroy();
});

test('replies go out as each request completes: a slow read does not hold back a fast one', async (t) => {
  const { socketPath } = await serveLayered(t, MiB, (file) => ({
    read: { value: async (target: Buffer, offsetBytes: number) => {
      if (offsetBytes === 0) await new Promise((r) => setTimeout(r, 200));
      await file.read(target, offsetBytes);
    } },
  }));
  const c = await NbdClient.connect({ socketPath });
  const order: string[] = [];
  const first = c.read(Buffer.alloc(4096), 0).then(() => order.push('slow'));
  const second = c.read(Buffer.alloc(4096), 4096).then(() => order.push('fast'));
  await Promise.all([first, second]);
  assert.deepEqual(order, ['fast', 'slow']);
  await c.close();
});

test('a WRITE answered on the spot: many in one read all get replies, and one the device refuses at once gets its error while the others land', async (t) => {
  // The range at 64 KiB fails as a disk would, from writeNow itself.
  const { image, socketPath } = await serveLayered(t, MiB, (file) => ({
    writeNow: { value: (data: Buffer, offsetBytes: number) => {
      if (offsetBytes === 65536) throw new BdsnapError('EIO', 'the disk refused this range');
      return file.writeNow(data, offsetBytes);
    } },
  }));
  const c = await NbdClient.connect({ socketPath });
  t.after(() => c.close());
  const n = 16;
  const results = await Promise.all(Array.from({ length: n }, (_, i) => c.write(pattern(4096, i), i * 16384).then(() => 'ok', (e: BdsnapError) => e.code)));
  assert.deepEqual(results, Array.from({ length: n }, (_, i) => (i * 16384 === 65536 ? 'EIO' : 'ok')));
  const content = fs.readFileSync(image);
  for (let i = 0; i < n; i++) {
    if (i * 16384 === 65536) continue;
    assert.deepEqual(content.subarray(i * 16384, i * 16384 + 4096), pattern(4096, i), `write ${i}`);
  }
  // The connection lives on.
  await c.write(pattern(4096, 99), 65536 + 4096);
});

/** Records the `queued` hint of every write. */
class HintedDevice extends PassThroughDevice {
  readonly hints: boolean[] = [];
  override async write(data: Buffer, offsetBytes: number, options?: WriteOptions): Promise<void> {
    this.hints.push(options?.queued?.() ?? false);
    return super.write(data, offsetBytes, options);
  }
}

test('a large WRITE says whether more requests wait behind it: never from a client at depth one, yes when it sends several at once', async (t) => {
  if (loadLibc() === undefined) {
    t.skip('koffi is not usable here: the server cannot ask the socket what waits in it');
    return;
  }
  let device!: HintedDevice;
  const s = await serveImage(t, { sizeBytes: 16 * MiB, wrap: (d) => (device = new HintedDevice(d)) });
  const client = await s.connect();
  for (let i = 0; i < 8; i++) await client.write(Buffer.alloc(MiB, i), i * MiB);
  assert.deepEqual(device.hints, new Array(8).fill(false), 'one request at a time: nothing waits behind any');
  device.hints.length = 0;
  await Promise.all(Array.from({ length: 8 }, (_, i) => client.write(Buffer.alloc(MiB, 0x40 + i), (8 + i) * MiB)));
  assert.equal(device.hints.length, 8);
  assert.equal(device.hints[0], true, `the first of eight sent at once has seven behind it: ${device.hints.join(',')}`);
  const back = Buffer.alloc(MiB);
  await client.read(back, 15 * MiB);
  assert.ok(back.every((b) => b === 0x47), 'written');
});
