/**
 * Connections served on worker threads while the exports stay on the server's thread (as the
 * daemon serves its sessions): a client sees the same replies, errors included, as when every
 * connection is served on one thread, and writes from several threads meet on one device.
 */

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { threadId } from 'node:worker_threads';
import type { WriteOptions } from '../../src/device/block-device.js';
import { PassThroughDevice } from '../../src/device/pass-through.js';
import { BdsnapError } from '../../src/errors.js';
import { serveImage, waitFor } from './helpers.js';

const IMAGE_BYTES = 4 << 20;
/** Writes here fail with ENOSPC, reads with EIO: errors must cross the threads as they are. */
const BAD_OFFSET = 3 << 20;

class FailingDevice extends PassThroughDevice {
  override async read(target: Buffer, offsetBytes: number): Promise<void> {
    if (offsetBytes === BAD_OFFSET) throw new BdsnapError('EIO', 'the medium failed here');
    return super.read(target, offsetBytes);
  }

  override async write(data: Buffer, offsetBytes: number, options?: WriteOptions): Promise<void> {
    if (offsetBytes === BAD_OFFSET) throw new BdsnapError('ENOSPC', 'no room here');
    return super.write(data, offsetBytes, options);
  }
}

const outcome = (p: Promise<unknown>): Promise<string> =>
  p.then(() => 'ok', (err: unknown) => `${(err as { code?: string }).code}: ${(err as Error).message}`);

/** What a client sees of one scripted session, with `ownerThreads` or on one thread. */
async function transcript(t: Parameters<typeof serveImage>[0], ownerThreads?: number): Promise<{ lines: string[]; threads: Set<unknown> }> {
  const s = await serveImage(t, { sizeBytes: IMAGE_BYTES, wrap: (d) => new FailingDevice(d), ...(ownerThreads ? { ownerThreads } : {}) });
  const lines: string[] = [];
  lines.push(await outcome(s.connect({ exportName: '/no/such/export' })));
  const clients = await Promise.all([0, 1, 2, 3].map(() => s.connect({ exportName: s.image })));
  const data = randomBytes(1 << 20);
  // Four connections write their quarter of the same megabyte at once.
  await Promise.all(clients.map((c, i) => c.write(data.subarray(i << 18, (i + 1) << 18), i << 18)));
  const back = Buffer.alloc(1 << 20);
  await clients[3]!.read(back, 0);
  lines.push(`read back equal: ${back.equals(data)}`);
  lines.push(await outcome(clients[0]!.write(Buffer.alloc(4096, 1), BAD_OFFSET)));
  lines.push(await outcome(clients[1]!.read(Buffer.alloc(4096), BAD_OFFSET)));
  lines.push(await outcome(clients[2]!.write(Buffer.alloc(4096, 1), IMAGE_BYTES)));
  lines.push(await outcome(clients[2]!.zero(1 << 20, 1 << 20)));
  lines.push(await outcome(clients[2]!.trim(2 << 20, 4096)));
  lines.push(await outcome(clients[1]!.flush()));
  lines.push(JSON.stringify(await clients[0]!.extents(0, IMAGE_BYTES)));
  const zeroed = Buffer.alloc(1 << 20, 1);
  await clients[0]!.read(zeroed, 1 << 20);
  lines.push(`zeroed: ${zeroed.every((b) => b === 0)}`);
  // The connections still serve after their errors.
  lines.push(await outcome(Promise.all(clients.map((c) => c.read(Buffer.alloc(4096), 0)))));
  await Promise.all(clients.map((c) => c.close()));
  await waitFor(() => s.exports.openHandles === 0, 5000, 'every handle to be released');
  const threads = new Set(s.events.filter((e) => e.event === 'export-opened').map((e) => e.thread));
  return { lines, threads };
}

test('served on worker threads with the exports on this one: the same replies and errors as on one thread', { timeout: 60_000 }, async (t) => {
  const one = await transcript(t);
  const owner = await transcript(t, 2);
  t.diagnostic(one.lines.join(' | '));
  assert.deepEqual(owner.lines, one.lines);
  assert.equal(one.lines[1], 'read back equal: true');
  assert.ok(owner.threads.size === 2 && !owner.threads.has(undefined) && !owner.threads.has(threadId),
    `the connections were served by two worker threads (${[...owner.threads].join(', ')})`);
});
