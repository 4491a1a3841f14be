/**
 * Requests no polite client sends, over a raw socket: unknown options and commands,
 * unknown flags, rejected writes whose payload must be drained, bad magic, oversized
 * requests, clients that vanish mid-request. Per-request errors must leave the connection
 * usable; framing errors may close it but must never take the server down.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { CleanupStack } from '../../testkit/cleanup.js';
import { makeImage, makeTempDir, readRange } from '../../testkit/files.js';
import {
  NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_WRITE, NBD_FLAG_READ_ONLY, NBD_OPT_GO, NBD_REP_ACK, RawNbdClient,
} from '../helpers/raw-nbd.js';
import { startServer, type NbdServer } from '../../testkit/server.js';

const IMAGE_BYTES = 4 << 20;
const EPERM = 1;
const EINVAL = 22;
const ENOSPC = 28;
const NBD_REP_ERR_UNSUP = 0x80000001;
const NBD_FLAG_HAS_FLAGS = 1 << 0;

async function connectGo(cleanup: CleanupStack, server: NbdServer, exportName = ''): Promise<RawNbdClient> {
  const client = await RawNbdClient.connect(server.socketPath);
  cleanup.after(() => client.destroy());
  const reply = await client.go(exportName);
  assert.equal(reply.type, NBD_REP_ACK, `NBD_OPT_GO acknowledged (reply type 0x${reply.type.toString(16)}: ${reply.data.toString()})`);
  assert.equal(client.exportSize, BigInt(IMAGE_BYTES));
  assert.ok((client.transmissionFlags & NBD_FLAG_HAS_FLAGS) !== 0, 'NBD_FLAG_HAS_FLAGS set');
  return client;
}

/** Block 0 of a 'blocks' image: u32 0 then byte 1 repeated. */
function assertBlockZero(data: Buffer): void {
  assert.equal(data.length, 4096);
  assert.equal(data.readUInt32LE(0), 0);
  assert.ok(data.subarray(4).every((b) => b === 1), 'block 0 content');
}

async function serve(t: { after(fn: () => unknown): void }, readOnly = false): Promise<{ cleanup: CleanupStack; server: NbdServer; image: string }> {
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup);
  const image = path.join(dir, 'raw.img');
  makeImage(image, IMAGE_BYTES, 'blocks');
  const server = await startServer(cleanup, { images: [image], readOnly });
  return { cleanup, server, image };
}

test('raw: an unknown option gets ERR_UNSUP and the handshake goes on', async (t) => {
  const { cleanup, server } = await serve(t);
  const client = await RawNbdClient.connect(server.socketPath);
  cleanup.after(() => client.destroy());
  client.sendOption(0x4242, Buffer.from('some payload the server must skip'));
  const reply = await client.readOptionReply();
  assert.equal(reply.option, 0x4242);
  assert.equal(reply.type, NBD_REP_ERR_UNSUP);
  const go = await client.go('');
  assert.equal(go.type, NBD_REP_ACK);
  assert.equal(go.option, NBD_OPT_GO);
  assertBlockZero((await client.request(NBD_CMD_READ, 0n, 4096)).data);
  await client.disconnect();
});

test('raw: unknown command and unknown flag get EINVAL; the connection lives on', async (t) => {
  const { cleanup, server } = await serve(t);
  const client = await connectGo(cleanup, server);
  const unknown = await client.request(0x7f, 0n, 0);
  assert.equal(unknown.error, EINVAL, 'unknown command type');
  const badFlag = await client.request(NBD_CMD_READ, 0n, 4096, 0x4000);
  assert.equal(badFlag.error, EINVAL, 'unknown command flag');
  const read = await client.request(NBD_CMD_READ, 0n, 4096);
  assert.equal(read.error, 0);
  assertBlockZero(read.data);
  assert.equal((await client.request(NBD_CMD_FLUSH, 0n, 0)).error, 0);
  await client.disconnect();
  assert.equal(await client.waitForEnd(5000), true, 'the server closes after NBD_CMD_DISC');
});

test('raw: a write past the end is refused with ENOSPC and its payload drained', async (t) => {
  const { cleanup, server, image } = await serve(t);
  const client = await connectGo(cleanup, server);
  // The payload is full of bytes that look like a request header, so a server that forgot to
  // drain it would misread it as the next request.
  const payload = Buffer.alloc(65536);
  for (let i = 0; i + 28 <= payload.length; i += 28) payload.writeUInt32BE(0x25609513, i);
  const past = await client.request(NBD_CMD_WRITE, BigInt(IMAGE_BYTES - 4096), payload.length, 0, payload);
  assert.equal(past.error, ENOSPC);
  const read = await client.request(NBD_CMD_READ, 0n, 4096);
  assert.equal(read.error, 0);
  assertBlockZero(read.data);
  assert.equal(readRange(image, IMAGE_BYTES - 4096, 4).readUInt32LE(0), IMAGE_BYTES / 4096 - 1, 'last block untouched');
  const readPast = await client.request(NBD_CMD_READ, BigInt(IMAGE_BYTES), 4096);
  assert.equal(readPast.error, EINVAL);
  // 2^64 - 4096: offset + length overflows 64 bits.
  const wrap = await client.request(NBD_CMD_READ, (1n << 64n) - 4096n, 8192);
  assert.equal(wrap.error, EINVAL, 'an offset that wraps around 2^64 is refused');
  await client.disconnect();
});

test('raw: writes on a read-only export get EPERM with the payload drained', async (t) => {
  const { cleanup, server, image } = await serve(t, true);
  const client = await connectGo(cleanup, server);
  assert.ok((client.transmissionFlags & NBD_FLAG_READ_ONLY) !== 0, 'NBD_FLAG_READ_ONLY advertised');
  const payload = Buffer.alloc(128 * 1024, 0xee);
  const refused = await client.request(NBD_CMD_WRITE, 0n, payload.length, 0, payload);
  assert.equal(refused.error, EPERM);
  const read = await client.request(NBD_CMD_READ, 0n, 4096);
  assert.equal(read.error, 0);
  assertBlockZero(read.data);
  assertBlockZero(readRange(image, 0, 4096));
  await client.disconnect();
});

test('raw: bad request magic closes that connection only', async (t) => {
  const { cleanup, server } = await serve(t);
  const bystander = await connectGo(cleanup, server);
  const victim = await connectGo(cleanup, server);
  assertBlockZero((await victim.request(NBD_CMD_READ, 0n, 4096)).data);
  victim.sendRaw(Buffer.alloc(28, 0xa5));
  assert.equal(await victim.waitForEnd(10_000), true, 'the server closes a connection that breaks framing');
  // The other connection and new ones still work.
  assertBlockZero((await bystander.request(NBD_CMD_READ, 0n, 4096)).data);
  const fresh = await connectGo(cleanup, server);
  assertBlockZero((await fresh.request(NBD_CMD_READ, 0n, 4096)).data);
  await fresh.disconnect();
  await bystander.disconnect();
});

test('raw: an oversized read is refused with EINVAL and the connection lives on', { timeout: 30_000 }, async (t) => {
  const { cleanup, server } = await serve(t);
  const client = await connectGo(cleanup, server);
  // A per-request error, not a framing error: a read carries no payload, so the stream stays in step.
  const cookie = client.sendRequest(NBD_CMD_READ, 0n, 0xffffffff);
  const reply = await client.readSimpleReply(0);
  assert.deepEqual([reply.cookie, reply.error], [cookie, EINVAL], 'a 4 GiB read is refused with EINVAL');
  assertBlockZero((await client.request(NBD_CMD_READ, 0n, 4096)).data);
  const fresh = await connectGo(cleanup, server);
  assertBlockZero((await fresh.request(NBD_CMD_READ, 0n, 4096)).data);
  await fresh.disconnect();
  await client.disconnect();
});

test('raw: clients that vanish in the handshake or mid-request do not disturb others', async (t) => {
  const { cleanup, server } = await serve(t);
  const steady = await connectGo(cleanup, server);
  for (let i = 0; i < 10; i++) {
    const leaver = await RawNbdClient.connect(server.socketPath);
    if (i % 2 === 0) {
      leaver.sendOption(NBD_OPT_GO, Buffer.from([0, 0]));
    } else {
      await leaver.go('');
      leaver.sendRequest(NBD_CMD_WRITE, 0n, 65536, 0, Buffer.alloc(1000, 0x33));
    }
    leaver.destroy();
  }
  assertBlockZero((await steady.request(NBD_CMD_READ, 0n, 4096)).data);
  await steady.disconnect();
  assert.equal(server.running(), true, `server still running:\n${server.stderr()}`);
});

test('raw: SIGTERM with writes in flight: every acknowledged write is in the image and the exit is clean', async (t) => {
  const { cleanup, server, image } = await serve(t);
  const client = await connectGo(cleanup, server);
  const count = 48;
  const sizeBytes = 64 * 1024;
  const cookies = new Map<bigint, number>();
  for (let i = 0; i < count; i++) {
    cookies.set(client.sendRequest(NBD_CMD_WRITE, BigInt(i * sizeBytes), sizeBytes, 0, Buffer.alloc(sizeBytes, 0x40 + i)), i);
  }
  // The first reply proves the server is working on the batch when the signal arrives.
  const first = await client.readSimpleReply();
  process.kill(server.pid, 'SIGTERM');
  const replies = [first];
  for (;;) {
    const reply = await client.readSimpleReply().catch(() => undefined);
    if (reply === undefined) break;
    replies.push(reply);
  }
  const ESHUTDOWN = 108;
  for (const reply of replies) {
    const index = cookies.get(reply.cookie);
    assert.ok(index !== undefined, `reply for unknown cookie ${reply.cookie}`);
    assert.ok(reply.error === 0 || reply.error === ESHUTDOWN, `write ${index}: error ${reply.error}`);
    if (reply.error === 0) {
      assert.ok(readRange(image, index * sizeBytes, sizeBytes).every((b) => b === 0x40 + index), `acknowledged write ${index} is in the image`);
    }
  }
  const exited = await server.waitForExit(10_000);
  assert.deepEqual(exited, { exitCode: 0, signal: null }, `clean exit after SIGTERM (${replies.length} of ${count} answered):\n${server.stderr()}`);
});
