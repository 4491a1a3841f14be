/** The point-in-time view under races with writes in progress. */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { FileDevice } from '../../src/device/file-device.js';
import type { CloneResult } from '../../src/device/block-device.js';
import { PassThroughDevice } from '../../src/device/pass-through.js';
import { CowDevice } from '../../src/snapshot/index.js';
import { makeImage } from '../../testkit/files.js';
import { isError, tempDir } from './helpers.js';

/**
 * A device whose next read is held back: it reads the file only after `delayMs`. It offers no
 * trim, fast zero or reflink, so every original is read through it; closing it leaves the
 * file open (the test closes that).
 */
class SlowReads extends PassThroughDevice {
  #nextDelayMs = 0;

  override get canTrim(): boolean { return false; }
  override get canFastZero(): boolean { return false; }

  delayNextRead(ms: number): void {
    this.#nextDelayMs = ms;
  }

  override async read(target: Buffer, offsetBytes: number): Promise<void> {
    const delay = this.#nextDelayMs;
    this.#nextDelayMs = 0;
    if (delay > 0) await new Promise((r) => setTimeout(r, delay));
    return super.read(target, offsetBytes);
  }

  override cloneRangeTo(): Promise<CloneResult> {
    return Promise.resolve('unsupported');
  }

  override close(): Promise<void> {
    return Promise.resolve();
  }
}

test('a view read that overlaps a write in progress still returns the original', async (t) => {
  const dir = tempDir(t);
  const image = makeImage(path.join(dir, 'disk.img'), 1 << 20, 'random', 1);
  const original = fs.readFileSync(image);
  const dev = await FileDevice.open(image);
  t.after(() => dev.close());
  const slow = new SlowReads(dev);
  const cow = CowDevice.create(slow, { devicePath: image, snapshotRoot: path.join(dir, 'snap'), chunkSize: 4096 });
  const view = cow.view();
  for (const [offset, length] of [[0, 8192], [5000, 20000], [65536 - 100, 200]] as const) {
    const got = Buffer.alloc(length);
    slow.delayNextRead(40);
    const reading = view.read(got, offset);
    await cow.write(randomBytes(length + 4096), Math.max(0, offset - 2048));
    await reading;
    assert.deepEqual(got, original.subarray(offset, offset + length));
  }
  // Many reads and writes in flight together over the same chunks.
  const reads = Array.from({ length: 40 }, async (_, i) => {
    const offset = (i * 7919) % (1 << 19);
    const got = Buffer.alloc(12000);
    await view.read(got, offset);
    assert.deepEqual(got, original.subarray(offset, offset + 12000), `read ${i}`);
  });
  const writes = Array.from({ length: 40 }, (_, i) => cow.write(randomBytes(9000), (i * 6007) % (1 << 19)));
  await Promise.all([...reads, ...writes]);
  await cow.close();
  await assert.rejects(view.read(Buffer.alloc(10), 0), isError('ESHUTDOWN'));
});

test('the view refuses to read once the session has failed', async (t) => {
  const dir = tempDir(t);
  const image = makeImage(path.join(dir, 'disk.img'), 1 << 20, 'random', 2);
  const dev = await FileDevice.open(image);
  t.after(() => dev.close());
  const cow = CowDevice.create(dev, { devicePath: image, snapshotRoot: path.join(dir, 'snap'), chunkSize: 4096, sizeLimitBytes: 10000 });
  await cow.write(Buffer.alloc(100, 1), 0);
  const got = Buffer.alloc(100);
  await cow.view().read(got, 0);
  await cow.write(Buffer.alloc(20000, 2), 8192);
  assert.equal(cow.state, 'failed');
  await assert.rejects(cow.view().read(got, 0), isError('ESESSION', /size limit/));
  await cow.close();
});
