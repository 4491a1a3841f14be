/**
 * Model-based property test of the snapshot engine: random writes, trims, zeroes, concurrent
 * bursts (device writes racing image reads), points taken at random moments through the
 * barrier (with a write in flight when hold() starts and one arriving while held), image
 * writes, removed points, extended storages, and simulated daemon kills (layer and storages
 * dropped without close or flush, sometimes with a torn record appended, then reopened with
 * DiffStorage.open and addPoint). Every image must always equal the device content recorded
 * at its point plus its own writes, and the device what was written to it.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import fc from 'fast-check';
import { FileDevice } from '../../src/device/file-device.js';
import { DiffStorage, SnapshotLayer, type DiffStorageOptions, type SnapshotImage } from '../../src/snapshot/index.js';
import { tearTail, tempDir } from './helpers.js';

type Range = { offset: number; length: number };
type Op =
  | { kind: 'write'; offset: number; length: number; seed: number }
  | { kind: 'zero'; offset: number; length: number }
  | { kind: 'trim'; offset: number; length: number }
  | { kind: 'flush' }
  | { kind: 'burst'; writes: Array<Range & { seed: number }>; reads: Array<Range & { pick: number }> }
  | { kind: 'take'; before: Range & { seed: number }; during: Range & { seed: number } }
  | { kind: 'image-write'; pick: number; offset: number; length: number; seed: number; zero: boolean }
  | { kind: 'image-read'; pick: number; offset: number; length: number }
  | { kind: 'remove'; pick: number }
  | { kind: 'extend'; pick: number }
  | { kind: 'kill'; torn: number };

const SIZE = 30 * 4096 + 2048; // not a multiple of any chunk size: the last chunk is partial

const range = fc.tuple(fc.integer({ min: 0, max: SIZE - 1 }), fc.integer({ min: 1, max: 40000 }))
  .map(([offset, length]) => ({ offset, length: Math.min(length, SIZE - offset) }));
const seeded = fc.tuple(range, fc.integer({ min: 1, max: 255 })).map(([r, seed]) => ({ ...r, seed }));

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 6, arbitrary: seeded.map((r) => ({ kind: 'write' as const, ...r })) },
  { weight: 2, arbitrary: range.map((r) => ({ kind: 'zero' as const, ...r })) },
  { weight: 1, arbitrary: range.map((r) => ({ kind: 'trim' as const, ...r })) },
  { weight: 1, arbitrary: fc.constant({ kind: 'flush' as const }) },
  {
    weight: 2,
    arbitrary: fc.tuple(fc.array(seeded, { minLength: 1, maxLength: 5 }), fc.array(fc.tuple(range, fc.nat()).map(([r, pick]) => ({ ...r, pick })), { maxLength: 4 }))
      .map(([writes, reads]) => ({ kind: 'burst' as const, writes, reads })),
  },
  { weight: 3, arbitrary: fc.tuple(seeded, seeded).map(([before, during]) => ({ kind: 'take' as const, before, during })) },
  { weight: 3, arbitrary: fc.tuple(fc.nat(), seeded, fc.boolean()).map(([pick, r, zero]) => ({ kind: 'image-write' as const, pick, ...r, zero })) },
  { weight: 3, arbitrary: fc.tuple(fc.nat(), range).map(([pick, r]) => ({ kind: 'image-read' as const, pick, ...r })) },
  { weight: 1, arbitrary: fc.nat().map((pick) => ({ kind: 'remove' as const, pick })) },
  { weight: 1, arbitrary: fc.nat().map((pick) => ({ kind: 'extend' as const, pick })) },
  { weight: 1, arbitrary: fc.integer({ min: 0, max: 3 }).map((torn) => ({ kind: 'kill' as const, torn })) },
);

function pattern(length: number, seed: number, offset: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) b[i] = (seed * 31 + (offset + i) * 7 + ((offset + i) >> 9)) & 0xff;
  return b;
}

interface Point {
  options: DiffStorageOptions;
  storage: DiffStorage;
  image: SnapshotImage;
  /** What the image must show. */
  content: Buffer;
  /** Storages of earlier lives (before a simulated kill), closed at the end. */
  dropped: DiffStorage[];
}

test('snapshot images match the model through writes, takes, image writes, removals, extensions and kills', async (t) => {
  const top = tempDir(t, 'bdsnap-snapmodel-');
  let run = 0;
  await fc.assert(
    fc.asyncProperty(fc.constantFrom(4096, 8192, 16384), fc.array(opArb, { minLength: 1, maxLength: 30 }), async (chunkSize, ops) => {
      const dir = path.join(top, `run-${run++}`);
      fs.mkdirSync(dir);
      const image = path.join(dir, 'disk.img');
      fs.writeFileSync(image, pattern(SIZE, 99, 0));
      const model = pattern(SIZE, 99, 0);
      const dev = await FileDevice.open(image);
      let layer = new SnapshotLayer(dev, { chunkSize });
      const points: Point[] = [];
      let nextId = 0;
      const pick = (n: number): Point | undefined => points[n % Math.max(1, points.length)];
      const check = async (p: Point, offset: number, length: number, what: string): Promise<void> => {
        const got = Buffer.alloc(length);
        await p.image.read(got, offset);
        assert.ok(got.equals(p.content.subarray(offset, offset + length)), `${what}: image ${p.options.id} at ${offset}+${length}`);
      };
      const write = async (w: Range & { seed: number }): Promise<void> => {
        await layer.write(pattern(w.length, w.seed, w.offset), w.offset);
      };
      try {
        for (const op of ops) {
          switch (op.kind) {
            case 'write':
              await write(op);
              pattern(op.length, op.seed, op.offset).copy(model, op.offset);
              break;
            case 'zero':
              await layer.zero(op.offset, op.length);
              model.fill(0, op.offset, op.offset + op.length);
              break;
            case 'trim':
              // FileDevice trims are advisory: the content stays, but the originals must be kept.
              await layer.trim(op.offset, op.length);
              break;
            case 'flush':
              await layer.flush();
              break;
            case 'burst': {
              // Overlapping device writes in flight together with image reads: the device keeps
              // whichever write landed last (taken from the device), the images must not move.
              const reads = op.reads.flatMap((r) => {
                const p = pick(r.pick);
                return p ? [check(p, r.offset, r.length, 'read during a burst')] : [];
              });
              await Promise.all([...op.writes.map(write), ...reads]);
              await dev.read(model, 0);
              break;
            }
            case 'take': {
              const storeDir = path.join(dir, `store-${nextId}`);
              fs.mkdirSync(storeDir, { mode: 0o700 });
              const options: DiffStorageOptions = { id: `snap${nextId++}`, dirs: [storeDir], chunkSize };
              const storage = await DiffStorage.create(options);
              // A write in flight when hold() starts is in the point; one issued while held is not.
              const before = write(op.before);
              const holding = layer.hold();
              pattern(op.before.length, op.before.seed, op.before.offset).copy(model, op.before.offset);
              await holding;
              let reached = false;
              const during = write(op.during).then(() => (reached = true));
              points.push({ options, storage, image: layer.addPoint(storage, 0), content: Buffer.from(model), dropped: [] });
              await new Promise((resolve) => setImmediate(resolve));
              assert.equal(reached, false, 'a write issued while held waits for release()');
              layer.release();
              await Promise.all([before, during]);
              pattern(op.during.length, op.during.seed, op.during.offset).copy(model, op.during.offset);
              break;
            }
            case 'image-write': {
              const p = pick(op.pick);
              if (!p) break;
              if (op.zero) {
                await p.image.zero(op.offset, op.length);
                p.content.fill(0, op.offset, op.offset + op.length);
              } else {
                await p.image.write(pattern(op.length, op.seed + 1000, op.offset), op.offset);
                pattern(op.length, op.seed + 1000, op.offset).copy(p.content, op.offset);
              }
              break;
            }
            case 'image-read': {
              const p = pick(op.pick);
              if (p) await check(p, op.offset, op.length, 'image read');
              break;
            }
            case 'remove': {
              const p = pick(op.pick);
              if (!p) break;
              await layer.removePoint(p.image);
              await assert.rejects(p.image.read(Buffer.alloc(1), 0), (e: Error & { code?: string }) => e.code === 'ESHUTDOWN');
              await p.storage.destroy();
              points.splice(points.indexOf(p), 1);
              assert.equal(layer.pointCount, points.length);
              break;
            }
            case 'extend': {
              const p = pick(op.pick);
              if (!p) break;
              const more = path.join(dir, `more-${nextId++}`);
              fs.mkdirSync(more, { mode: 0o700 });
              await p.storage.extend({ dir: more });
              p.options = { ...p.options, dirs: p.storage.usage().dirs };
              break;
            }
            case 'kill': {
              // The daemon dies: nothing is closed or flushed; a torn record may follow the last
              // stored one. The restarted daemon opens every storage and adds its point again.
              layer = new SnapshotLayer(dev, { chunkSize });
              for (const p of points) {
                if (op.torn > 0) tearTail(p.storage, op.torn);
                p.dropped.push(p.storage);
                p.storage = await DiffStorage.open(p.options);
                assert.equal(p.storage.state, 'ok');
                await layer.hold();
                p.image = layer.addPoint(p.storage, 0);
                layer.release();
                await check(p, 0, SIZE, 'image after a restart');
              }
              break;
            }
          }
        }
        for (const p of points) await check(p, 0, SIZE, 'image at the end');
        const onDevice = Buffer.alloc(SIZE);
        await dev.read(onDevice, 0);
        assert.ok(onDevice.equals(model), 'the device holds what was written');
      } finally {
        for (const p of points) {
          await layer.removePoint(p.image);
          for (const s of p.dropped) await s.close();
          await p.storage.close();
        }
        await layer.close();
        await dev.close();
      }
      fs.rmSync(dir, { recursive: true, force: true });
    }),
    { numRuns: 100 },
  );
});
