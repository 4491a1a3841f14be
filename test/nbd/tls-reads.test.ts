/**
 * The server's reads after NBD_OPT_STARTTLS: decrypted bytes go into the connection's read
 * buffer or straight into the WRITE payload being received, as plaintext ones do, and a paused
 * connection stops reading its TLS socket.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import net from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import { loadClientTls, loadTls, type NbdTls } from '../../src/nbd/tls.js';
import { readTlsInto } from '../../src/nbd/adopted-socket.js';
import { writePsk } from '../../testkit/tls.js';
import { GatedDevice } from '../helpers/devices.js';
import { serveImage, tempDir, waitFor, type TestContext } from './helpers.js';

const MiB = 1024 * 1024;

/**
 * A unix socket relay to `target` that forwards with backpressure (pipe) and counts the bytes
 * the target's socket has taken from it (not those still in the relay's write buffer).
 */
async function countingRelay(t: TestContext, target: string, socketPath: string): Promise<{ socketPath: string; takenBytes: () => number }> {
  let forwarded = 0;
  let upstream: net.Socket | undefined;
  const server = net.createServer((down) => {
    const up = net.connect(target);
    upstream = up;
    down.on('data', (chunk: Buffer) => (forwarded += chunk.length));
    down.pipe(up);
    up.pipe(down);
    down.on('error', () => up.destroy());
    up.on('error', () => down.destroy());
    down.on('close', () => up.destroy());
    up.on('close', () => down.destroy());
  });
  await new Promise<void>((resolve) => server.listen(socketPath, resolve));
  t.after(() => {
    upstream?.destroy();
    server.close();
  });
  return { socketPath, takenBytes: () => forwarded - (upstream?.writableLength ?? 0) };
}

async function pskPair(t: TestContext): Promise<{ server: NbdTls; client: tls.ConnectionOptions }> {
  const file = path.join(tempDir(t), 'keys.psk');
  writePsk(file, { alice: crypto.randomBytes(32).toString('hex') });
  return { server: (await loadTls({ pskFile: file }))!, client: await loadClientTls({ host: 'localhost', pskFile: file }) };
}

test('over TLS, WRITE payloads of every size and split across TLS records land where they were aimed, many in flight', async (t) => {
  const keys = await pskPair(t);
  const s = await serveImage(t, { sizeBytes: 16 * MiB, tls: keys.server });
  const c = await s.connect({ tls: keys.client });
  // Sizes (in the device's 512-byte sectors) around a TLS record (16 KiB) and the read buffer
  // (256 KiB), and whole MiBs; each request's 28-byte header shifts the splits further.
  const sizes = [512, 4096, 16384 - 512, 16384, 16384 + 512, 65536 + 512, 262144 - 512, 262144, 262144 + 512, MiB, MiB + 512, 3 * MiB, 512];
  const data = sizes.map((n) => crypto.randomBytes(n));
  const offsets: number[] = [];
  let at = 0;
  for (const n of sizes) {
    offsets.push(at);
    at += n;
  }
  await Promise.all(data.map((d, i) => c.write(d, offsets[i]!)));
  const back = await Promise.all(data.map(async (d, i) => {
    const b = Buffer.alloc(d.length);
    await c.read(b, offsets[i]!);
    return b;
  }));
  back.forEach((b, i) => assert.ok(b.equals(data[i]!), `write ${i} of ${sizes[i]} bytes`));
  assert.ok(s.events.some((e) => e.event === 'tls-established'));
  await c.close();
});

test('over TLS, a connection at its in-flight cap stops reading the socket: the client cannot push far past the cap', { timeout: 30_000 }, async (t) => {
  // Forced onto the sockets' own streams, a TLS socket reads ahead up to its high-water mark.
  if (process.env.BDSNAP_NBD_PLAIN_READS) return t.skip('BDSNAP_NBD_PLAIN_READS is set');
  const keys = await pskPair(t);
  let gated: GatedDevice | undefined;
  const s = await serveImage(t, { sizeBytes: 32 * MiB, tls: keys.server, maxInFlightBytesPerConnection: MiB, wrap: (d) => (gated = new GatedDevice(d)) });
  assert.ok(gated);
  gated.hold((kind) => kind === 'write');
  // The client reaches the server through a relay that counts what the server's socket took.
  const relay = await countingRelay(t, s.socketPath, path.join(s.dir, 'relay.sock'));
  const c = await s.connect({ socketPath: relay.socketPath, tls: keys.client });
  const n = 24;
  const data = Array.from({ length: n }, () => crypto.randomBytes(MiB));
  const ops = data.map((d, i) => c.write(d, i * MiB));
  let startedWhileHeld: number;
  let takenBytes: number;
  try {
    await waitFor(() => gated!.started.length >= 1, 5000, 'the first write to reach the device');
    await new Promise((r) => setTimeout(r, 500));
    startedWhileHeld = gated.started.length;
    takenBytes = relay.takenBytes();
  } finally {
    gated.release();
  }
  t.diagnostic(`the server read ${(takenBytes / MiB).toFixed(2)} MiB while paused`);
  assert.equal(startedWhileHeld, 1, `paused at the cap: ${startedWhileHeld} writes started while the first is held`);
  // The cap, the socket buffers of both ends and a few TLS records; not the TLS socket's own
  // read-ahead (its high-water mark is 4 MiB).
  assert.ok(takenBytes < 4 * MiB, `the server read ${(takenBytes / MiB).toFixed(2)} MiB while paused at a 1 MiB cap`);
  await Promise.all(ops);
  const back = await Promise.all(data.map(async (d, i) => {
    const b = Buffer.alloc(MiB);
    await c.read(b, i * MiB);
    return b;
  }));
  back.forEach((b, i) => assert.ok(b.equals(data[i]!), `write ${i}`));
  await c.close();
});

test('readTlsInto: decrypted bytes land in the target while it gives one, else in the shared buffer, in order and with no data events', async (t) => {
  const keys = await pskPair(t);
  const socketPath = path.join(tempDir(t), 's.sock');
  const accepted = new Promise<net.Socket>((resolve) => {
    const listener = net.createServer((sock) => {
      listener.close();
      resolve(sock);
    });
    listener.listen(socketPath);
  });
  const client = tls.connect({ ...keys.client, path: socketPath });
  t.after(() => client.destroy());
  const plain = await accepted;
  const secure = keys.server.wrap(plain, 4 * MiB);
  t.after(() => secure.destroy());

  const shared = Buffer.alloc(64 * 1024);
  const target = Buffer.alloc(100_000);
  let targetFilled = 0;
  const pieces: Buffer[] = [];
  let receivedBytes = 0;
  assert.equal(readTlsInto(secure, shared, {
    target: () => (targetFilled < target.length ? target.subarray(targetFilled) : undefined),
    received: (n) => {
      pieces.push(Buffer.from(shared.subarray(0, n)));
      receivedBytes += n;
    },
    placed: (n) => {
      pieces.push(Buffer.from(target.subarray(targetFilled, targetFilled + n)));
      targetFilled += n;
    },
  }), true);
  let dataEvents = 0;
  secure.on('data', () => dataEvents++);

  const sent = crypto.randomBytes(300_000);
  client.write(sent);
  await waitFor(() => targetFilled + receivedBytes === sent.length, 10_000, 'every byte to arrive');
  assert.equal(targetFilled, target.length, 'the target was filled first');
  assert.ok(Buffer.concat(pieces).equals(sent), 'in order, each byte once');
  assert.equal(dataEvents, 0);
});
