/**
 * The NBD server's limits, each on its own with a small setting: the in-flight budget shared by
 * connections, the connection limit, the handshake deadline and the send-stall deadline.
 * (test/fuzz/flood.test.ts floods a real `bdsnap serve` process with the defaults.)
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { GatedDevice } from '../helpers/devices.js';
import { NBD_CMD_READ, RawNbdClient } from '../helpers/raw-nbd.js';
import { RawPeer, serveImage, waitFor } from './helpers.js';

const MiB = 1024 * 1024;

test('the in-flight budget is shared: a second connection\'s write waits (unread) while the first holds it', { timeout: 30_000 }, async (t) => {
  let gated: GatedDevice | undefined;
  const s = await serveImage(t, { sizeBytes: 8 * MiB, limits: { maxInFlightBytes: MiB }, wrap: (d) => (gated = new GatedDevice(d)) });
  gated!.hold((kind) => kind === 'write');
  const a = await s.connect();
  const b = await s.connect();
  let started: number;
  const writes: Array<Promise<void>> = [];
  try {
    writes.push(a.write(Buffer.alloc(MiB, 1), 0));
    await waitFor(() => gated!.started.length === 1, 5000, 'the first write to reach the device');
    writes.push(b.write(Buffer.alloc(MiB, 2), MiB));
    // b's header and payload are on their way; the server must not admit them while a's bytes are held.
    await new Promise((r) => setTimeout(r, 300));
    started = gated!.started.length;
    assert.ok(s.server.inFlightBytes <= MiB + 64 * 1024, `held ${s.server.inFlightBytes} bytes of a ${MiB}-byte budget`);
  } finally {
    gated!.release();
  }
  assert.equal(started, 1, 'the second write waited for the budget');
  await Promise.all(writes);
  assert.equal(gated!.started.length, 2);
  await waitFor(() => s.server.inFlightBytes === 0, 5000, 'every byte to be given back');
  const back = Buffer.alloc(MiB);
  await b.read(back, MiB);
  assert.ok(back.every((x) => x === 2));
});

test('a client that takes none of its replies is cut off after the send-stall deadline, and its bytes come back', { timeout: 30_000 }, async (t) => {
  const s = await serveImage(t, { sizeBytes: 32 * MiB, limits: { sendStallTimeoutMs: 500 } });
  const greedy = await RawNbdClient.connect(s.socketPath);
  assert.equal((await greedy.go('')).type, 1);
  greedy.stopReading();
  for (let i = 0; i < 4; i++) greedy.sendRequest(NBD_CMD_READ, BigInt(i * 8 * MiB), 8 * MiB);
  await waitFor(() => s.events.some((e) => e.event === 'send-stalled'), 10_000, 'the stalled client to be cut off');
  await waitFor(() => s.server.inFlightBytes === 0 && s.server.connectionCount === 0, 5000, 'its bytes and slot to be given back');
  greedy.destroy();
  // A client that reads is served as before.
  const c = await s.connect();
  const buf = Buffer.alloc(8 * MiB);
  await c.read(buf, 0);
});

test('a client that does not finish its handshake in time is closed; one in transmission may idle', { timeout: 30_000 }, async (t) => {
  const s = await serveImage(t, { limits: { handshakeTimeoutMs: 300 } });
  const served = await s.connect();
  const slow = await RawPeer.connect(s.socketPath);
  await slow.read(18);
  slow.write(Buffer.from([0, 0, 0, 1]));
  await slow.closed;
  assert.ok(s.events.some((e) => e.event === 'handshake-timeout'), JSON.stringify(s.events));
  await new Promise((r) => setTimeout(r, 400));
  const buf = Buffer.alloc(512);
  await served.read(buf, 0);
});

test('at the connection limit a newcomer takes the slot of the oldest handshake, or is closed when none is left', { timeout: 30_000 }, async (t) => {
  // A handshake deadline far past the test's timeout: only the limit can close these.
  const s = await serveImage(t, { limits: { maxConnections: 2, handshakeTimeoutMs: 60_000 } });
  const first = await RawPeer.connect(s.socketPath);
  await first.read(18);
  const second = await RawPeer.connect(s.socketPath);
  await second.read(18);
  const third = await RawPeer.connect(s.socketPath);
  await third.read(18);
  await first.closed;
  assert.ok(s.events.some((e) => e.event === 'connection-aborted' && /connection limit/.test(String(e.reason))), JSON.stringify(s.events));
  assert.ok(!second.socket.destroyed, 'the newer handshake kept its slot');
  second.destroy();
  third.destroy();
  await waitFor(() => s.server.connectionCount === 0, 5000, 'the raw connections to go');

  const a = await s.connect();
  const b = await s.connect();
  const refused = await RawPeer.connect(s.socketPath);
  await refused.closed;
  assert.ok(s.events.some((e) => e.event === 'connection-refused'), JSON.stringify(s.events));
  const warnings = s.events.filter((e) => e.event === 'connection-limit');
  assert.equal(warnings.length >= 1 && warnings.every((w) => w.level === 'warn'), true, JSON.stringify(warnings));
  const buf = Buffer.alloc(512);
  await a.read(buf, 0);
  await b.read(buf, 0);
});
