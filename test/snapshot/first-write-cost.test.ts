/**
 * What a first write costs the event loop beyond the device's own read and write: the promises
 * the engine makes for it (each one a microtask, and garbage for the scavenger), counted with
 * async_hooks on the daemon's stack (SnapshotLayer, the session on it, and a snapshot beside).
 * Random 4 KiB first writes are bound by this CPU time, not by the disk: a few promises more
 * per write made them measurably slower (bench/first-write-cpu.ts measures the time itself).
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHook } from 'node:async_hooks';
import fs from 'node:fs';
import path from 'node:path';
import { FileDevice } from '../../src/device/file-device.js';
import { PassThroughDevice } from '../../src/device/pass-through.js';
import { ChunkBitmap } from '../../src/snapshot/chunk-table.js';
import { CowLayer, type CowPoint } from '../../src/snapshot/cow-layer.js';
import { CowDevice, DiffStorage, SnapshotLayer } from '../../src/snapshot/index.js';
import { pattern, tempDir } from './helpers.js';

const CHUNK = 16 * 1024;
const SIZE = 1024 * 1024;
const WRITE = 4096;
/**
 * Promises of the engine per first write, as the copy-before-write path made them before there
 * was a single engine (a session alone); with a snapshot beside, its sink's store adds to it.
 */
const SESSION_BUDGET = 10;
const SNAPSHOT_SINK_BUDGET = 7;

let promises = 0;
const hook = createHook({
  init: (_id, type) => {
    if (type === 'PROMISE') promises++;
  },
});

async function promisesOf(fn: () => Promise<void>): Promise<number> {
  promises = 0;
  hook.enable();
  try {
    await fn();
  } finally {
    hook.disable();
  }
  return promises;
}

/** Promises of one first write through the engine, less those of the device's read of the chunk and write. */
async function enginePromisesPerFirstWrite(t: Parameters<typeof tempDir>[0], withSnapshot: boolean): Promise<number[]> {
  const dir = tempDir(t, 'bdsnap-fwcost-');
  const imagePath = path.join(dir, 'disk.img');
  fs.writeFileSync(imagePath, pattern(SIZE, 1, 0));
  const dev = await FileDevice.open(imagePath);
  let storage: DiffStorage | undefined;
  let cow: CowDevice | undefined;
  try {
    const layer = new SnapshotLayer(dev, { chunkSize: CHUNK });
    if (withSnapshot) {
      const storeDir = path.join(dir, 'store');
      fs.mkdirSync(storeDir, { mode: 0o700 });
      storage = await DiffStorage.create({ id: 'snap', dirs: [storeDir], chunkSize: CHUNK });
      await layer.hold();
      layer.addPoint(storage, 0);
      layer.release();
    }
    const session = CowDevice.create(layer, { devicePath: imagePath, snapshotRoot: path.join(dir, 'sessions'), chunkSize: CHUNK });
    cow = session;
    const data = pattern(WRITE, 2, 0);
    const chunkBuf = Buffer.alloc(CHUNK);
    // The first write starts the session (its directory and manifest): not a steady-state cost.
    await session.write(data, 0);
    const counts: number[] = [];
    for (let chunk = 1; chunk <= 4; chunk++) {
      const firstWrite = await promisesOf(() => session.write(data, chunk * CHUNK));
      const bare = await promisesOf(async () => {
        await dev.read(chunkBuf, chunk * CHUNK);
        await dev.write(data, chunk * CHUNK);
      });
      counts.push(firstWrite - bare);
    }
    return counts;
  } finally {
    await cow?.close();
    await storage?.close();
    await dev.close();
  }
}

test('a first write through a session makes no more promises than the engine made before the single engine', async (t) => {
  const counts = await enginePromisesPerFirstWrite(t, false);
  for (const n of counts) {
    assert.ok(n <= SESSION_BUDGET, `a first write made ${n} promises of the engine (budget ${SESSION_BUDGET}): each is a microtask on every random first write; measure with bench/first-write-cpu.ts before raising it`);
  }
});

test('with a snapshot beside the session, a first write makes no more promises than the session\'s plus one store of the second sink', async (t) => {
  const counts = await enginePromisesPerFirstWrite(t, true);
  const budget = SESSION_BUDGET + SNAPSHOT_SINK_BUDGET;
  for (const n of counts) {
    assert.ok(n <= budget, `a first write made ${n} promises of the engine (budget ${budget}): each is a microtask on every random first write; measure with bench/first-write-cpu.ts before raising it`);
  }
});

/** Keeps every buffer the engine reads the device into. */
class ReadTargets extends PassThroughDevice {
  readonly targets: Buffer[] = [];

  override read(target: Buffer, offsetBytes: number): Promise<void> {
    this.targets.push(target);
    return super.read(target, offsetBytes);
  }
}

test('a point lacking a whole run is handed the buffer the run was read into, not a view of it', async (t) => {
  const dir = tempDir(t, 'bdsnap-fwcost-');
  const imagePath = path.join(dir, 'disk.img');
  fs.writeFileSync(imagePath, pattern(SIZE, 1, 0));
  const dev = await FileDevice.open(imagePath);
  t.after(() => dev.close());
  const reads = new ReadTargets(dev);
  const layer = new CowLayer(reads, { chunkSize: CHUNK });
  t.after(() => layer.close());
  const preserved = new ChunkBitmap(SIZE / CHUNK);
  const stored: Buffer[] = [];
  const point: CowPoint = {
    preserved,
    usable: true,
    sink: { usable: true, sync: () => Promise.resolve() },
    ready: () => true,
    storeOriginal: (firstChunk, payload) => {
      stored.push(payload);
      preserved.addRange(firstChunk, firstChunk + payload.length / CHUNK - 1);
      return Promise.resolve();
    },
    locate: () => undefined,
    readAt: () => Promise.reject(new Error('not read in this test')),
    checkReadable: () => undefined,
  };
  layer.attachPoint(point);
  const data = pattern(WRITE, 2, 0);
  for (let chunk = 1; chunk <= 4; chunk++) await layer.write(data, chunk * CHUNK + WRITE);
  assert.equal(stored.length, 4);
  // A view would be one more Buffer object per first write, on the engine's hottest path.
  stored.forEach((payload, i) => assert.equal(payload, reads.targets[i], `first write ${i + 1}: the sink got a view of the read buffer`));
});
