/**
 * SnapshotLayer and SnapshotImage: the write barrier, several points on one device, one
 * storage shared by two devices, image writes that never reach the device, an image read that
 * races a copy, extents, removal, and a storage that goes bad without harming the device.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { FileDevice } from '../../src/device/file-device.js';
import { EXTENT_HOLE, EXTENT_ZERO, type BlockDevice, type CloneResult, type Extent, type WriteOptions } from '../../src/device/block-device.js';
import { PassThroughDevice } from '../../src/device/pass-through.js';
import { DiffStorage, SnapshotLayer, type SnapshotImage } from '../../src/snapshot/index.js';
import { settlesWithin } from '../../testkit/server.js';
import { makeImage } from '../../testkit/files.js';
import { isError, tempDir, type TestContext } from './helpers.js';

const CHUNK = 4096;

/**
 * A FileDevice whose writes can be held at a gate and whose next read can be paused, recording
 * which writes reached it: enough to stage the races of the barrier and of image reads. It
 * offers no trim, fast zero or reflink, so every original is read through it.
 */
class GatedDevice extends PassThroughDevice {
  /** Offsets of the writes that reached the device (before the gate). */
  readonly arrived: number[] = [];
  #gate: Promise<void> | undefined;
  #openGate: (() => void) | undefined;
  #pauseRead: Promise<void> | undefined;
  #pauseExtents: Promise<void> | undefined;
  extentFlags = 0;

  override get canTrim(): boolean { return false; }
  override get canFastZero(): boolean { return false; }

  closeGate(): void {
    this.#gate = new Promise((resolve) => (this.#openGate = resolve));
  }

  openGate(): void {
    this.#openGate?.();
    this.#gate = undefined;
  }

  /** The next read waits (before reading anything) until the returned function is called. */
  pauseNextRead(): () => void {
    let go!: () => void;
    this.#pauseRead = new Promise((resolve) => (go = resolve));
    return go;
  }

  override async read(target: Buffer, offsetBytes: number): Promise<void> {
    const pause = this.#pauseRead;
    this.#pauseRead = undefined;
    if (pause) await pause;
    return super.read(target, offsetBytes);
  }

  override async write(data: Buffer, offsetBytes: number, options?: WriteOptions): Promise<void> {
    this.arrived.push(offsetBytes);
    if (this.#gate) await this.#gate;
    return super.write(data, offsetBytes, options);
  }

  /** The next extents() answers (with the flags of the moment it was asked) when the returned function is called. */
  pauseNextExtents(): () => void {
    let go!: () => void;
    this.#pauseExtents = new Promise((resolve) => (go = resolve));
    return go;
  }

  override async extents(_offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    const flags = this.extentFlags;
    const pause = this.#pauseExtents;
    this.#pauseExtents = undefined;
    if (pause) await pause;
    return [{ length: lengthBytes, flags }];
  }

  override cloneRangeTo(): Promise<CloneResult> {
    return Promise.resolve('unsupported');
  }
}

async function setup(t: TestContext, sizeBytes = 1 << 20): Promise<{ dir: string; image: string; dev: FileDevice; before: Buffer }> {
  const dir = tempDir(t);
  const image = makeImage(path.join(dir, 'disk.img'), sizeBytes, 'random', 1);
  const dev = await FileDevice.open(image);
  t.after(() => dev.close());
  return { dir, image, dev, before: fs.readFileSync(image) };
}

async function newStorage(t: TestContext, dir: string, id: string): Promise<DiffStorage> {
  const storeDir = path.join(dir, `store-${id}`);
  fs.mkdirSync(storeDir, { mode: 0o700 });
  const storage = await DiffStorage.create({ id, dirs: [storeDir], chunkSize: CHUNK });
  t.after(() => storage.close());
  return storage;
}

async function take(layer: SnapshotLayer, storage: DiffStorage, deviceKey = 0): Promise<SnapshotImage> {
  await layer.hold();
  try {
    return layer.addPoint(storage, deviceKey);
  } finally {
    layer.release();
  }
}

async function readAll(device: BlockDevice): Promise<Buffer> {
  const b = Buffer.alloc(device.size);
  await device.read(b, 0);
  return b;
}

test('hold() waits for writes in flight; writes issued while held do not reach the device until release()', { timeout: 20_000 }, async (t) => {
  const { dir, dev, before } = await setup(t);
  const gated = new GatedDevice(dev);
  const layer = new SnapshotLayer(gated, { chunkSize: CHUNK });
  const storage = await newStorage(t, dir, 'barrier');

  gated.closeGate();
  const a = Buffer.alloc(1000, 0xa1);
  const inFlight = layer.write(a, 0);
  const holding = layer.hold();
  assert.equal(await settlesWithin(holding, 100), false, 'hold() waits while a write is in flight');
  gated.openGate();
  await inFlight;
  assert.equal(await settlesWithin(holding, 2000), true, 'hold() resolves once the write has finished');

  const b = Buffer.alloc(1000, 0xb2);
  const c = Buffer.alloc(1000, 0xc3);
  const order: string[] = [];
  const held = [layer.write(b, 8192).then(() => order.push('b')), layer.write(c, 8192).then(() => order.push('c'))];
  // Reads, flush and extents are not held.
  assert.equal(await settlesWithin(layer.read(Buffer.alloc(10), 0), 1000), true);
  assert.equal(await settlesWithin(layer.flush(), 1000), true);
  assert.equal(await settlesWithin(layer.extents(0, 4096), 1000), true);
  assert.equal(await settlesWithin(Promise.all(held), 100), false, 'held writes wait');
  assert.deepEqual(gated.arrived, [0], 'held writes have not reached the device');
  const image = layer.addPoint(storage, 0);
  layer.release();
  await Promise.all(held);
  assert.deepEqual(gated.arrived, [0, 8192, 8192]);
  assert.deepEqual(order, ['b', 'c'], 'held writes go on in order');

  const expected = Buffer.from(before);
  a.copy(expected, 0);
  assert.ok((await readAll(image)).equals(expected), 'the image has the write acknowledged before the take and not the held ones');
  c.copy(expected, 8192);
  assert.ok((await readAll(dev)).equals(expected), 'the device has every write, the last one last');
  assert.throws(() => layer.release(), isError('EINVAL'));
});

test('several points on one device at different times are each exact; image writes change only their image', { timeout: 20_000 }, async (t) => {
  const { dir, dev, before } = await setup(t);
  const layer = new SnapshotLayer(dev, { chunkSize: CHUNK });
  const model = Buffer.from(before);
  const points: Array<{ image: SnapshotImage; content: Buffer }> = [];
  for (let i = 0; i < 4; i++) {
    points.push({ image: await take(layer, await newStorage(t, dir, `p${i}`)), content: Buffer.from(model) });
    for (let k = 0; k < 20; k++) {
      const length = 1 + ((k * 7919 + i * 31) % 30000);
      const offset = (k * 104729 + i * 4099) % (model.length - length);
      const data = randomBytes(length);
      await layer.write(data, offset);
      data.copy(model, offset);
    }
  }
  assert.equal(layer.pointCount, 4);
  // An image write across a chunk boundary, partial at both ends.
  const w = Buffer.alloc(CHUNK + 100, 0x5a);
  await points[1]!.image.write(w, 3 * CHUNK - 50);
  w.copy(points[1]!.content, 3 * CHUNK - 50);
  await points[2]!.image.zero(10, 5000);
  points[2]!.content.fill(0, 10, 5010);
  for (const [i, p] of points.entries()) assert.ok((await readAll(p.image)).equals(p.content), `point ${i}`);
  assert.ok((await readAll(dev)).equals(model), 'the device never sees image writes');

  await layer.removePoint(points[0]!.image);
  assert.equal(layer.pointCount, 3);
  await assert.rejects(points[0]!.image.read(Buffer.alloc(1), 0), isError('ESHUTDOWN'));
  await layer.write(Buffer.alloc(CHUNK, 1), 0);
  model.fill(1, 0, CHUNK);
  for (const p of points.slice(1)) assert.ok((await readAll(p.image)).equals(p.content));
  assert.ok((await readAll(dev)).equals(model));
});

test('one storage shared by two devices (device keys 0 and 1), reopened after a kill', { timeout: 20_000 }, async (t) => {
  const { dir, dev, before } = await setup(t);
  const image2 = makeImage(path.join(dir, 'second.img'), 512 * 1024 + 1000, 'random', 2);
  const dev2 = await FileDevice.open(image2);
  t.after(() => dev2.close());
  const before2 = fs.readFileSync(image2);
  const layers = [new SnapshotLayer(dev, { chunkSize: CHUNK }), new SnapshotLayer(dev2, { chunkSize: CHUNK })];
  const storeDir = path.join(dir, 'shared');
  fs.mkdirSync(storeDir, { mode: 0o700 });
  const options = { id: 'shared', dirs: [storeDir], chunkSize: CHUNK };
  const storage = await DiffStorage.create(options);
  t.after(() => storage.close());
  // One barrier across both devices.
  await Promise.all(layers.map((l) => l.hold()));
  const images = layers.map((l, key) => l.addPoint(storage, key));
  for (const l of layers) l.release();
  assert.throws(() => layers[0]!.addPoint(storage, 1), isError('EBUSY'));

  // The same offsets on both: the records must not mix.
  for (const [key, l] of layers.entries()) {
    await l.write(Buffer.alloc(20000, 0x10 + key), 1000);
    await l.zero(l.size - 3000, 3000);
  }
  assert.ok((await readAll(images[0]!)).equals(before));
  assert.ok((await readAll(images[1]!)).equals(before2), 'the last, short chunk too');
  assert.ok(storage.holds(0, 0) && storage.holds(1, 0) && !storage.holds(2, 0));

  // Kill: nothing closed; reopen and add the points again on fresh layers.
  const reopened = await DiffStorage.open(options);
  t.after(() => reopened.close());
  const fresh = [new SnapshotLayer(dev, { chunkSize: CHUNK }), new SnapshotLayer(dev2, { chunkSize: CHUNK })];
  const again = fresh.map((l, key) => l.addPoint(reopened, key));
  assert.ok((await readAll(again[0]!)).equals(before));
  assert.ok((await readAll(again[1]!)).equals(before2));
  // Chunks preserved before the kill are not copied again (the device holds new data now).
  const used = reopened.usage().usedBytes;
  await fresh[0]!.write(Buffer.alloc(100, 0xee), 1000);
  assert.equal(reopened.usage().usedBytes, used);
  assert.ok((await readAll(again[0]!)).equals(before));
});

test('an image read that races a copy returns the original, not the new data', { timeout: 20_000 }, async (t) => {
  const { dir, dev, before } = await setup(t);
  const gated = new GatedDevice(dev);
  const layer = new SnapshotLayer(gated, { chunkSize: CHUNK });
  const image = await take(layer, await newStorage(t, dir, 'race'));
  const go = gated.pauseNextRead();
  const target = Buffer.alloc(3 * CHUNK);
  const reading = image.read(target, CHUNK);
  // The write copies its chunks (with reads that are not paused) and lands on the device.
  await layer.write(Buffer.alloc(2 * CHUNK, 0x77), 2 * CHUNK);
  go();
  await reading;
  assert.ok(target.equals(before.subarray(CHUNK, 4 * CHUNK)));
});

test('image extents: preserved chunks are data, the rest is what the device says', { timeout: 20_000 }, async (t) => {
  const { dir, dev } = await setup(t);
  const gated = new GatedDevice(dev);
  gated.extentFlags = EXTENT_HOLE | EXTENT_ZERO;
  const layer = new SnapshotLayer(gated, { chunkSize: CHUNK });
  const image = await take(layer, await newStorage(t, dir, 'ext'));
  await layer.write(Buffer.alloc(10), 2 * CHUNK + 5);
  await image.write(Buffer.alloc(CHUNK, 3), 5 * CHUNK);
  assert.deepEqual(await image.extents(0, 8 * CHUNK), [
    { length: 2 * CHUNK, flags: EXTENT_HOLE | EXTENT_ZERO },
    { length: CHUNK, flags: 0 },
    { length: 2 * CHUNK, flags: EXTENT_HOLE | EXTENT_ZERO },
    { length: CHUNK, flags: 0 },
    { length: 2 * CHUNK, flags: EXTENT_HOLE | EXTENT_ZERO },
  ]);
  assert.deepEqual(await image.extents(2 * CHUNK + 100, 10), [{ length: 10, flags: 0 }]);
});

test('image extents err towards data: a chunk copied while the device was asked is data, not the device\'s hole', { timeout: 20_000 }, async (t) => {
  const { dir, dev } = await setup(t);
  const gated = new GatedDevice(dev);
  gated.extentFlags = EXTENT_HOLE | EXTENT_ZERO;
  const layer = new SnapshotLayer(gated, { chunkSize: CHUNK });
  const image = await take(layer, await newStorage(t, dir, 'ext-race'));
  // The device is asked about chunks 0-3 (all a hole then); before it answers, chunk 1 is
  // copied and written: the image's chunk 1 now lives in the storage, and a backup that
  // skipped it as zeroes would lose it.
  const go = gated.pauseNextExtents();
  const asking = image.extents(0, 4 * CHUNK);
  await layer.write(Buffer.alloc(100, 0x42), CHUNK + 10);
  go();
  const extents = await asking;
  assert.equal(extents.reduce((n, e) => n + e.length, 0), 4 * CHUNK);
  for (let at = 0, i = 0; i < extents.length; at += extents[i]!.length, i++) {
    const e = extents[i]!;
    if (at < 2 * CHUNK && at + e.length > CHUNK) assert.equal(e.flags & EXTENT_ZERO, 0, `chunk 1 reported as zeroes: ${JSON.stringify(extents)}`);
  }
});

test('with no points, writes go straight to the device; close() does not close the base', { timeout: 20_000 }, async (t) => {
  const { dev } = await setup(t);
  const layer = new SnapshotLayer(dev, { chunkSize: CHUNK });
  await layer.write(Buffer.alloc(100, 9), 0);
  await assert.rejects(layer.write(Buffer.alloc(1), dev.size), isError('ENOSPC'));
  assert.throws(() => new SnapshotLayer(dev, { chunkSize: 3000 }), isError('EINVAL'));
  await layer.hold();
  const held = layer.write(Buffer.alloc(1), 0);
  await layer.close();
  await assert.rejects(held, isError('ESHUTDOWN'), 'a held write fails when the layer closes');
  await assert.rejects(layer.write(Buffer.alloc(1), 0), isError('ESHUTDOWN'));
  const b = Buffer.alloc(100);
  await dev.read(b, 0);
  assert.ok(b.equals(Buffer.alloc(100, 9)));
});

test('concurrent image writes to parts of one chunk are all kept', { timeout: 20_000 }, async (t) => {
  const { dir, dev, before } = await setup(t);
  const layer = new SnapshotLayer(dev, { chunkSize: CHUNK });
  const image = await take(layer, await newStorage(t, dir, 'rmw'));
  const seen: Array<[number, number]> = [];
  image.onImageWrite = (offsetBytes, lengthBytes) => seen.push([offsetBytes, lengthBytes]);
  const expected = Buffer.from(before);
  const writes = [];
  for (let i = 0; i < 16; i++) {
    const data = Buffer.alloc(200, i + 1);
    writes.push(image.write(data, 5 * CHUNK + i * 256));
    data.copy(expected, 5 * CHUNK + i * 256);
  }
  // A device write to the same chunk at the same time: the image must not see it.
  writes.push(layer.write(Buffer.alloc(CHUNK, 0xdd), 5 * CHUNK));
  await Promise.all(writes);
  assert.ok((await readAll(image)).equals(expected));
  assert.equal(seen.length, 16);
  assert.deepEqual(seen[3], [5 * CHUNK + 3 * 256, 200]);
});

test('removing a point and destroying its storage while a reader and a writer are busy: no hang, the device is intact', { timeout: 20_000 }, async (t) => {
  const { dir, dev, before } = await setup(t);
  const layer = new SnapshotLayer(dev, { chunkSize: CHUNK });
  const storage = await newStorage(t, dir, 'busy');
  const image = await take(layer, storage);
  const model = Buffer.from(before);
  let stop = false;
  let reads = 0;
  let writes = 0;
  const reader = (async () => {
    const b = Buffer.alloc(64 * 1024);
    for (let i = 0; !stop; i++) {
      try {
        await image.read(b, (i * 65536) % (dev.size - b.length));
        reads++;
        // Page-cache reads settle in microtasks only: let the writer and the test run.
        await new Promise((resolve) => setImmediate(resolve));
      } catch (err) {
        assert.ok(['ESHUTDOWN', 'EIO'].includes((err as { code?: string }).code ?? ''), String(err));
        return reads;
      }
    }
    return reads;
  })();
  const writer = (async () => {
    for (let i = 0; i < 200; i++) {
      const data = randomBytes(5000);
      const offset = (i * 7919 * 13) % (dev.size - data.length);
      await layer.write(data, offset);
      data.copy(model, offset);
      writes++;
      await new Promise((resolve) => setImmediate(resolve));
    }
  })();
  // Both busy when the point goes: some reads and writes done, the writer far from finished.
  while (reads < 5 || writes < 5) await new Promise((resolve) => setImmediate(resolve));
  const writesAtRemoval = writes;
  const readsAtRemoval = reads;
  await layer.removePoint(image);
  await storage.destroy();
  assert.ok(writesAtRemoval < 200, `the writer was still busy when the point was removed (${writesAtRemoval} of 200 writes)`);
  assert.equal(layer.pointCount, 0);
  await writer;
  stop = true;
  assert.ok((await reader) >= readsAtRemoval);
  assert.ok((await readAll(dev)).equals(model));
  assert.deepEqual(fs.readdirSync(path.join(dir, 'store-busy')), []);
});
