/**
 * A device with a mount session and a snapshot reads each original once: the engine reads a
 * chunk's original for every point that lacks it and hands it to each, instead of each point
 * reading it again. Counted through a BlockDevice wrapper below the engine.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { FileDevice } from '../../src/device/file-device.js';
import { CowDevice, DiffStorage, SnapshotLayer } from '../../src/snapshot/index.js';
import { ReadCountingDevice } from '../helpers/devices.js';
import { pattern, tempDir } from './helpers.js';

const CHUNK = 16 * 1024;
const SIZE = 8 * 1024 * 1024;
const MIB = 1024 * 1024;

test('with a session and a snapshot, each original chunk is read from the device once', async (t) => {
  const dir = tempDir(t, 'bdsnap-readonce-');
  const imagePath = path.join(dir, 'disk.img');
  const first = pattern(SIZE, 3, 0);
  fs.writeFileSync(imagePath, first);
  const storeDir = path.join(dir, 'store');
  fs.mkdirSync(storeDir, { mode: 0o700 });
  const dev = await FileDevice.open(imagePath);
  t.after(() => dev.close());
  const counting = new ReadCountingDevice(dev);
  const layer = new SnapshotLayer(counting, { chunkSize: CHUNK });
  const storage = await DiffStorage.create({ id: 'snap', dirs: [storeDir], chunkSize: CHUNK });
  await layer.hold();
  const image = layer.addPoint(storage, 0);
  layer.release();
  const cow = CowDevice.create(layer, { devicePath: imagePath, snapshotRoot: path.join(dir, 'sessions'), chunkSize: CHUNK });

  // Sequential 1 MiB first writes at depth 4 over the first half, then 4 KiB first writes in
  // flight together (several in one chunk) over the second half, then all of it again.
  const model = Buffer.from(first);
  const written = new Set<number>();
  const write = async (offset: number, length: number, seed: number): Promise<void> => {
    await cow.write(pattern(length, seed, offset), offset);
    pattern(length, seed, offset).copy(model, offset);
    for (let c = Math.floor(offset / CHUNK); c <= Math.floor((offset + length - 1) / CHUNK); c++) written.add(c);
  };
  for (let at = 0; at < SIZE / 2; at += 4 * MIB) {
    await Promise.all([0, 1, 2, 3].map((i) => write(at + i * MIB, MIB, 5)));
  }
  const smallWrites = (seed: number): Promise<void[]> =>
    Promise.all(Array.from({ length: 256 }, (_, i) => write(SIZE / 2 + ((i * 7919) % 1024) * 4096, 4096, seed + (i % 5))));
  await smallWrites(6);
  const firstPass = counting.readsPerUnit(CHUNK, SIZE);
  await Promise.all([0, 1, 2, 3].map((i) => write(i * MIB, MIB, 9)));
  await smallWrites(12);

  const perChunk = counting.readsPerUnit(CHUNK, SIZE);
  assert.deepEqual(perChunk, firstPass, 'rewrites of chunks every point holds read nothing');
  const wrong = perChunk.flatMap((n, c) => ((written.has(c) ? n !== 1 : n !== 0) ? [`chunk ${c}: ${n} reads`] : []));
  assert.deepEqual(wrong.slice(0, 10), [], `every chunk written is read once, any other never (${wrong.length} wrong)`);

  // Both points got the original they were handed.
  const seen = Buffer.alloc(SIZE);
  await cow.view().read(seen, 0);
  assert.ok(seen.equals(first), 'the session view shows the content at its start');
  await image.read(seen, 0);
  assert.ok(seen.equals(first), 'the snapshot image shows the content at its point');
  await dev.read(seen, 0);
  assert.ok(seen.equals(model), 'the device holds what was written');

  await cow.close();
  await layer.removePoint(image);
  await storage.close();
  await layer.close();
});
