/**
 * The NBD client against a scripted server that answers reads its own way: data split over
 * chunks and socket writes lands whole in the caller's buffer, and a reply that leaves part of
 * the read uncovered is a protocol error, never a buffer with stale bytes in it.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import path from 'node:path';
import * as C from '../../src/nbd/constants.js';
import { NbdClient } from '../../src/nbd/client.js';
import { RequestDecoder } from '../../src/nbd/request-decoder.js';
import {
  encodeGreeting, encodeInfoExport, encodeOffsetHole, encodeOptionReply, encodeStructuredNone, writeStructuredHeader, writeU64,
} from '../../src/nbd/encoders.js';
import { makeTempDir } from '../../testkit/files.js';

const SIZE = 1 << 20;

function offsetData(cookie: number, offsetBytes: number, data: Buffer, done: boolean): Buffer {
  const chunk = Buffer.alloc(C.STRUCTURED_REPLY_HEADER_BYTES + 8 + data.length);
  writeStructuredHeader(chunk, done ? C.NBD_REPLY_FLAG_DONE : 0, 0, C.NBD_REPLY_TYPE_OFFSET_DATA, 0, cookie, 8 + data.length);
  writeU64(chunk, C.STRUCTURED_REPLY_HEADER_BYTES, offsetBytes);
  data.copy(chunk, C.STRUCTURED_REPLY_HEADER_BYTES + 8);
  return chunk;
}

/** A unix-socket server of `onSocket`, listening in a temporary directory, closed after the test: its socket path. */
async function listenOnce(t: { after: (fn: () => unknown) => void }, onSocket: (socket: net.Socket) => void): Promise<string> {
  const socketPath = path.join(makeTempDir(t, 'bdsnap-client-replies-'), 'nbd.sock');
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('error', () => undefined);
    onSocket(socket);
  });
  await new Promise<void>((resolve) => server.listen(socketPath, resolve));
  t.after(() => new Promise<void>((resolve) => {
    for (const s of sockets) s.destroy();
    server.close(() => resolve());
  }));
  return socketPath;
}

/** A server that negotiates structured replies and answers each read with `answer`. */
async function scriptedServer(t: { after: (fn: () => unknown) => void }, answer: (cookie: number, offsetBytes: number, lengthBytes: number) => Buffer[]): Promise<string> {
  return listenOnce(t, (socket) => {
    const decoder = new RequestDecoder();
    decoder.setPhase('client-flags');
    socket.write(encodeGreeting(C.NBD_FLAG_FIXED_NEWSTYLE | C.NBD_FLAG_NO_ZEROES));
    socket.on('data', (chunk) => {
      for (const m of decoder.push(chunk)) {
        if (m.kind === 'client-flags') decoder.setPhase('options');
        else if (m.kind === 'option' && m.option === C.NBD_OPT_GO) {
          socket.write(encodeOptionReply(C.NBD_OPT_GO, C.NBD_REP_INFO, encodeInfoExport(SIZE, C.NBD_FLAG_HAS_FLAGS | C.NBD_FLAG_SEND_DF)));
          socket.write(encodeOptionReply(C.NBD_OPT_GO, C.NBD_REP_ACK));
          decoder.setPhase('transmission');
        } else if (m.kind === 'option') {
          socket.write(encodeOptionReply(m.option, m.option === C.NBD_OPT_STRUCTURED_REPLY ? C.NBD_REP_ACK : C.NBD_REP_ERR_UNSUP));
        } else if (m.kind === 'request' && m.type === C.NBD_CMD_READ) {
          // One socket write per byte range, cut at odd places, to split chunks between reads.
          const whole = Buffer.concat(answer(m.cookieLo, m.offsetBytes, m.lengthBytes));
          for (let at = 0; at < whole.length; at += 7777) socket.write(whole.subarray(at, at + 7777));
        }
      }
    });
  });
}

test('client: a read answered in data and hole chunks, split anywhere, lands whole in the caller\'s buffer', { timeout: 20_000 }, async (t) => {
  const socketPath = await scriptedServer(t, (cookie, offsetBytes, lengthBytes) => {
    const half = lengthBytes / 2;
    return [
      offsetData(cookie, offsetBytes + half, Buffer.alloc(half / 2, 0xbb), false),
      encodeOffsetHole(0, cookie, offsetBytes + half + half / 2, half / 2, 0),
      offsetData(cookie, offsetBytes, Buffer.alloc(half, 0xaa), false),
      encodeStructuredNone(0, cookie),
    ];
  });
  const client = await NbdClient.connect({ socketPath });
  t.after(() => client.close());
  for (const length of [4096, 65536, 262144]) {
    const target = Buffer.alloc(length, 0xff);
    await client.read(target, 8192);
    const half = length / 2;
    assert.ok(target.subarray(0, half).every((b) => b === 0xaa), `${length}: first half`);
    assert.ok(target.subarray(half, half + half / 2).every((b) => b === 0xbb), `${length}: third quarter`);
    assert.ok(target.subarray(half + half / 2).every((b) => b === 0), `${length}: the hole reads as zeroes`);
  }
});

test('client: a read reply that leaves bytes uncovered is a protocol error', { timeout: 20_000 }, async (t) => {
  const socketPath = await scriptedServer(t, (cookie, offsetBytes, lengthBytes) => [
    offsetData(cookie, offsetBytes, Buffer.alloc(lengthBytes - 512, 0xaa), false),
    encodeStructuredNone(0, cookie),
  ]);
  const client = await NbdClient.connect({ socketPath });
  t.after(() => client.close().catch(() => undefined));
  await assert.rejects(client.read(Buffer.alloc(4096), 0), (e: unknown) => (e as { code?: string }).code === 'EPROTO' && /covers 3584 of 4096 bytes/.test((e as Error).message));
});

test('client: a server that answers an option with replies and never a final one is cut off, its replies not held without end', { timeout: 60_000 }, async (t) => {
  let sentBytes = 0;
  const socketPath = await listenOnce(t, (socket) => {
    const decoder = new RequestDecoder();
    decoder.setPhase('client-flags');
    socket.write(encodeGreeting(C.NBD_FLAG_FIXED_NEWSTYLE | C.NBD_FLAG_NO_ZEROES));
    // As fast as the client reads: 64 KiB metadata contexts, each "selected", none the last.
    const flood = (option: number): void => {
      const reply = encodeOptionReply(option, C.NBD_REP_META_CONTEXT, Buffer.alloc(C.MAX_OPTION_PAYLOAD_BYTES - 64, 0x61));
      while (!socket.destroyed && sentBytes < 256 << 20) {
        sentBytes += reply.length;
        if (!socket.write(reply)) {
          socket.once('drain', () => flood(option));
          return;
        }
      }
    };
    socket.on('data', (chunk) => {
      for (const m of decoder.push(chunk)) {
        if (m.kind === 'client-flags') decoder.setPhase('options');
        else if (m.kind === 'option' && m.option === C.NBD_OPT_STRUCTURED_REPLY) socket.write(encodeOptionReply(m.option, C.NBD_REP_ACK));
        else if (m.kind === 'option') flood(m.option);
      }
    });
  });
  const outcome = await Promise.race([
    NbdClient.connect({ socketPath, exportName: '' }).then(() => 'connected', (err: unknown) => err as Error),
    new Promise<string>((resolve) => setTimeout(() => resolve('still reading'), 30_000).unref()),
  ]);
  assert.ok(outcome instanceof Error, `the client gave up on the endless replies (${String(outcome)} after ${sentBytes} bytes sent)`);
  assert.match(outcome.message, /the NBD server sent more than 16777216 bytes of replies to option \d+ without a final one/);
  assert.ok(sentBytes < 64 << 20, `it stopped soon: ${sentBytes} bytes sent`);
});
