/**
 * A worker thread of `bdsnap serve` that goes idle: it hands back what it holds beyond its
 * pool's share, and otherwise keeps its heap, and with it the request path's compiled code,
 * as it was (a full collection there throws that code away and the next client meets a cold
 * thread). The threads' 'idle' event says which it did.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { NbdClient } from '../../src/nbd/client.js';
import { startServe } from '../../src/service/serve.js';
import { makeImage } from '../../testkit/files.js';
import { tempDir } from './helpers.js';

const MiB = 1024 * 1024;
/** The worker's pool share: the server's per-connection budget (64 MiB) over its two threads. */
const SHARE_BYTES = 32 * MiB;
/** The thread's idle delay (2 s) and some. */
const IDLE_WAIT_MS = 6000;

interface IdleEvent { event: 'idle'; heldBytes: number; collected: boolean; thread: number }

function idleEvents(events: Record<string, unknown>[]): IdleEvent[] {
  return events.filter((e): e is Record<string, unknown> & IdleEvent => e.event === 'idle');
}

async function waitFor<T>(what: string, poll: () => T | undefined): Promise<T> {
  const deadline = Date.now() + IDLE_WAIT_MS;
  for (;;) {
    const found = poll();
    if (found !== undefined) return found;
    if (Date.now() > deadline) throw new Error(`no ${what} within ${IDLE_WAIT_MS} ms`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

test('an idle serving thread collects only when it holds more than its pool may keep', { timeout: 40_000 }, async (t) => {
  const dir = tempDir(t, 'bdsnap-idle-');
  const image = makeImage(path.join(dir, 'disk.img'), 256 * MiB, 0);
  const socketPath = path.join(dir, 's');
  const events: Record<string, unknown>[] = [];
  const asked = process.env.BDSNAP_NBD_THREADS;
  process.env.BDSNAP_NBD_THREADS = '2';
  const serving = await startServe({ images: [image], socketPath, log: (e) => events.push(e) }).finally(() => {
    if (asked === undefined) delete process.env.BDSNAP_NBD_THREADS;
    else process.env.BDSNAP_NBD_THREADS = asked;
  });
  t.after(() => serving.stop());

  // A client's ordinary traffic: 1 MiB writes, four in flight, what the pool recycles.
  const client = await NbdClient.connect({ socketPath, timeoutMs: 10_000 });
  const block = Buffer.alloc(MiB, 7);
  for (let offset = 0; offset < 64 * MiB; offset += 4 * MiB) {
    await Promise.all([0, 1, 2, 3].map((i) => client.write(block, offset + i * MiB)));
  }
  await client.flush();
  await client.close();
  const quiet = await waitFor('idle event after ordinary traffic', () => idleEvents(events)[0]);
  t.diagnostic(JSON.stringify(quiet));
  assert.ok(quiet.heldBytes <= SHARE_BYTES, `after 1 MiB writes the thread holds ${quiet.heldBytes} bytes, within its share`);
  assert.equal(quiet.collected, false, 'no full collection: the thread stays warm');

  // Requests far larger than the pool keeps: what they leave is garbage the thread collects.
  const large = await NbdClient.connect({ socketPath, timeoutMs: 10_000 });
  const big = Buffer.alloc(16 * MiB, 9);
  await Promise.all([0, 1, 2, 3].map((i) => large.write(big, i * 16 * MiB)));
  const reads = [0, 1, 2, 3].map(() => Buffer.alloc(16 * MiB));
  await Promise.all(reads.map((r, i) => large.read(r, i * 16 * MiB)));
  assert.ok(reads.every((r) => r.equals(big)), 'the large writes read back');
  await large.close();
  const after = await waitFor('idle event after large requests', () => idleEvents(events).slice(1).find((e) => e.thread === quiet.thread));
  t.diagnostic(JSON.stringify(after));
  assert.equal(after.collected, after.heldBytes > SHARE_BYTES, `collected exactly when holding more than the share (${after.heldBytes} bytes held)`);
});
