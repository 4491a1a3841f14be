/**
 * Session memory follows the touched chunks, not the device size: a session on a 64 GiB sparse
 * image touching a few chunks stays within a few MiB of heap and array-buffer memory, and the
 * compact chunk table agrees with a Map through random use.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import fc from 'fast-check';
import { FileDevice } from '../../src/device/file-device.js';
import { CowDevice, restore } from '../../src/snapshot/index.js';
import { ChunkBitmap, ChunkTable } from '../../src/snapshot/chunk-table.js';
import { makeImage } from '../../testkit/files.js';
import { tempDir } from './helpers.js';

const GIB = 1024 * 1024 * 1024;
const MIB = 1024 * 1024;

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

/** Heap plus ArrayBuffer memory (typed arrays live outside the V8 heap), after a full GC. */
function usedBytes(): number {
  gc();
  gc();
  const m = process.memoryUsage();
  return m.heapUsed + m.arrayBuffers;
}

for (const chunkSize of [4096, 64 * 1024]) {
  test(`a session on a 64 GiB sparse device with ${chunkSize / 1024} KiB chunks touching a few chunks uses < 8 MiB`, async (t) => {
    const dir = tempDir(t);
    const image = path.join(dir, 'sparse.img');
    makeImage(image, 64 * GIB, 'zero');
    const dev = await FileDevice.open(image);
    t.after(() => dev.close());
    const offsets = [0, 7 * GIB + 12345, 32 * GIB, 64 * GIB - 4096, 40 * GIB + 3 * chunkSize];
    const before = usedBytes();
    const cow = CowDevice.create(dev, { devicePath: image, snapshotRoot: path.join(dir, 'snap'), chunkSize });
    for (const at of offsets) await cow.write(Buffer.alloc(4096, 0xab), at);
    // Rewrites and reads of the same chunks add nothing.
    for (const at of offsets) await cow.write(Buffer.alloc(100, 0xcd), at);
    const during = usedBytes() - before;
    t.diagnostic(`session memory ${(during / 1024).toFixed(0)} KiB`);
    // 64 GiB in 4 KiB chunks is 16 Mi chunks: a byte per chunk would be 16 MiB, a bit is 2 MiB.
    assert.ok(during < 8 * MIB, `session memory ${(during / MIB).toFixed(2)} MiB`);
    assert.equal(cow.stats().preservedChunks, offsets.length + (chunkSize === 4096 ? 1 : 0));
    const summary = await cow.close();
    assert.equal(summary?.state, 'complete');
    await dev.close();
    // The original content (zeroes of the holes) comes back.
    const result = await restore(summary.sessionDir);
    assert.equal(result.digestCheck, 'verified');
    const back = Buffer.alloc(4096 + 12345 % chunkSize);
    for (const at of offsets) {
      const fd = fs.openSync(image, 'r');
      try {
        fs.readSync(fd, back, 0, Math.min(back.length, 64 * GIB - at), at);
      } finally {
        fs.closeSync(fd);
      }
      assert.ok(back.every((b) => b === 0), `zeroes again at ${at}`);
    }
  });
}

test('ChunkBitmap costs one bit per chunk and keeps bits apart', () => {
  const bitmap = new ChunkBitmap(16 * 1024 * 1024);
  assert.equal(bitmap.byteLength, 2 * MIB);
  const set = [0, 1, 31, 32, 33, 1000, 16 * 1024 * 1024 - 1];
  for (const c of set) bitmap.add(c);
  for (let c = 0; c < 2000; c++) assert.equal(bitmap.has(c), set.includes(c), `chunk ${c}`);
  assert.equal(bitmap.has(16 * 1024 * 1024 - 1), true);
  assert.equal(bitmap.hasAll(31, 33), true);
  assert.equal(bitmap.hasAll(30, 33), false);
});

test('ChunkTable agrees with a Map (first value wins) and sorts its entries', () => {
  fc.assert(fc.property(
    fc.array(fc.tuple(fc.oneof(fc.nat({ max: 5000 }), fc.nat({ max: 2 ** 40 }), fc.constant(2 ** 33 + 1)), fc.nat({ max: 2 ** 45 })), { maxLength: 600 }),
    (entries) => {
      const table = new ChunkTable();
      const model = new Map<number, number>();
      for (const [chunk, value] of entries) {
        table.setIfAbsent(chunk, value);
        if (!model.has(chunk)) model.set(chunk, value);
      }
      assert.equal(table.size, model.size);
      for (const [chunk, value] of model) assert.equal(table.get(chunk), value);
      assert.equal(table.get(5001), model.get(5001));
      const { chunks, values } = table.sorted();
      const expected = [...model.keys()].sort((a, b) => a - b);
      assert.deepEqual([...chunks], expected);
      assert.deepEqual([...values], expected.map((c) => model.get(c)));
    },
  ));
});

test('ChunkBitmap.addRange sets exactly the chunks of the range, whole words and ragged ends alike', () => {
  fc.assert(fc.property(fc.array(fc.tuple(fc.nat({ max: 300 }), fc.nat({ max: 150 })), { maxLength: 8 }), (ranges) => {
    const bitmap = new ChunkBitmap(512);
    const model = new Set<number>();
    for (const [first, length] of ranges) {
      bitmap.addRange(first, first + length);
      for (let c = first; c <= first + length; c++) model.add(c);
    }
    for (let c = 0; c < 512; c++) assert.equal(bitmap.has(c), model.has(c), `chunk ${c}`);
  }));
});

test('ChunkTable.setRunIfAbsent is a run of setIfAbsent (first value wins), growing as needed', () => {
  fc.assert(fc.property(fc.array(fc.tuple(fc.nat({ max: 2000 }), fc.nat({ max: 300 }), fc.nat({ max: 2 ** 40 })), { maxLength: 12 }), (runs) => {
    const table = new ChunkTable();
    const model = new Map<number, number>();
    for (const [first, length, value] of runs) {
      table.setRunIfAbsent(first, first + length, value, 4096);
      for (let c = first; c <= first + length; c++) if (!model.has(c)) model.set(c, value + (c - first) * 4096);
    }
    assert.equal(table.size, model.size);
    for (const [chunk, value] of model) assert.equal(table.get(chunk), value);
  }));
});

test('ChunkTable memory grows with the entries: under 64 bytes each', () => {
  const table = new ChunkTable();
  for (let i = 0; i < 100_000; i++) table.setIfAbsent(i * 7, i * 65536);
  assert.equal(table.size, 100_000);
  assert.ok(table.byteLength / table.size < 64, `${table.byteLength / table.size} bytes per entry`);
  assert.equal(table.get(7 * 99_999), 99_999 * 65536);
  assert.equal(table.get(3), undefined);
});
