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
import { SnapshotLayer } from '../../src/snapshot/index.js';
import { MODEL_SIZE as SIZE, ModelPoints, applyDeviceOp, pattern, pointOpArbs, tempDir, type PointOp, type Seeded } from './helpers.js';

type Op =
  | PointOp
  | { kind: 'remove'; pick: number }
  | { kind: 'extend'; pick: number }
  | { kind: 'kill'; torn: number };

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 6, arbitrary: pointOpArbs.write },
  { weight: 2, arbitrary: pointOpArbs.zero },
  { weight: 1, arbitrary: pointOpArbs.trim },
  { weight: 1, arbitrary: pointOpArbs.flush },
  { weight: 2, arbitrary: pointOpArbs.burst },
  { weight: 3, arbitrary: pointOpArbs.take },
  { weight: 3, arbitrary: pointOpArbs.imageWrite },
  { weight: 3, arbitrary: pointOpArbs.imageRead },
  { weight: 1, arbitrary: fc.nat().map((pick) => ({ kind: 'remove' as const, pick })) },
  { weight: 1, arbitrary: fc.nat().map((pick) => ({ kind: 'extend' as const, pick })) },
  { weight: 1, arbitrary: fc.integer({ min: 0, max: 3 }).map((torn) => ({ kind: 'kill' as const, torn })) },
);

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
      const points = new ModelPoints(dir, chunkSize);
      const write = async (w: Seeded): Promise<void> => {
        await layer.write(pattern(w.length, w.seed, w.offset), w.offset);
      };
      try {
        for (const op of ops) {
          switch (op.kind) {
            case 'write':
            case 'zero':
            case 'trim':
            case 'flush':
              await applyDeviceOp(layer, model, op);
              break;
            case 'burst': {
              // Overlapping device writes in flight together with image reads: the device keeps
              // whichever write landed last (taken from the device), the images must not move.
              const reads = op.reads.flatMap((r) => {
                const p = points.pick(r.pick);
                return p ? [points.check(p, r.offset, r.length, 'read during a burst')] : [];
              });
              await Promise.all([...op.writes.map(write), ...reads]);
              await dev.read(model, 0);
              break;
            }
            case 'take':
              await points.take(layer, write, model, op.before, op.during);
              break;
            case 'image-write':
              await points.imageWrite(op);
              break;
            case 'image-read': {
              const p = points.pick(op.pick);
              if (p) await points.check(p, op.offset, op.length, 'image read');
              break;
            }
            case 'remove': {
              const p = points.pick(op.pick);
              if (!p) break;
              await layer.removePoint(p.image);
              await assert.rejects(p.image.read(Buffer.alloc(1), 0), (e: Error & { code?: string }) => e.code === 'ESHUTDOWN');
              await p.storage.destroy();
              points.list.splice(points.list.indexOf(p), 1);
              assert.equal(layer.pointCount, points.list.length);
              break;
            }
            case 'extend': {
              const p = points.pick(op.pick);
              if (!p) break;
              const more = path.join(dir, `more-${points.nextId()}`);
              fs.mkdirSync(more, { mode: 0o700 });
              await p.storage.extend({ dir: more });
              p.options = { ...p.options, dirs: p.storage.usage().dirs };
              break;
            }
            case 'kill': {
              // The daemon dies: nothing is closed or flushed; a torn record may follow the last
              // stored one. The restarted daemon opens every storage and adds its point again.
              layer = new SnapshotLayer(dev, { chunkSize });
              await points.reopen(layer, op.torn);
              break;
            }
          }
        }
        for (const p of points.list) await points.check(p, 0, SIZE, 'image at the end');
        const onDevice = Buffer.alloc(SIZE);
        await dev.read(onDevice, 0);
        assert.ok(onDevice.equals(model), 'the device holds what was written');
      } finally {
        await points.close(layer);
        await layer.close();
        await dev.close();
      }
      fs.rmSync(dir, { recursive: true, force: true });
    }),
    { numRuns: 100 },
  );
});
