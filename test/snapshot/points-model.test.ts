/**
 * Model-based property test of the copy-before-write engine with every kind of point at once,
 * stacked as the daemon stacks them: a mount session (CowDevice) joining the snapshots' layer,
 * and two snapshots. Random writes, trims, zeroes, flushes, concurrent bursts (writes racing
 * reads of the session view and of the images), image writes, takes that replace the older
 * snapshot through the barrier, session ends, and simulated kills (session, layer and storages
 * dropped without close, sometimes with torn records appended, then recovered and reopened).
 * The session view must always show the session's start, each image its point plus its own
 * writes, the device what was written; restoring a session gives back its start.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import fc from 'fast-check';
import { FileDevice } from '../../src/device/file-device.js';
import { SnapshotLayer, type CowDevice } from '../../src/snapshot/index.js';
import {
  MODEL_SIZE as SIZE, ModelPoints, ModelSessions, applyDeviceOp, pattern, pointOpArbs, rangeArb, seededArb, tempDir, type PointOp, type Range, type Seeded,
} from './helpers.js';

type Op =
  | PointOp
  | ({ kind: 'view' } & Range)
  | { kind: 'end-session' }
  | { kind: 'kill'; tornSession: boolean; tornStorage: number };

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 6, arbitrary: pointOpArbs.write },
  { weight: 2, arbitrary: pointOpArbs.zero },
  { weight: 1, arbitrary: pointOpArbs.trim },
  { weight: 1, arbitrary: pointOpArbs.flush },
  { weight: 2, arbitrary: pointOpArbs.burst },
  { weight: 2, arbitrary: rangeArb.map((r) => ({ kind: 'view' as const, ...r })) },
  { weight: 2, arbitrary: pointOpArbs.imageRead },
  { weight: 2, arbitrary: pointOpArbs.imageWrite },
  { weight: 1, arbitrary: pointOpArbs.take },
  { weight: 1, arbitrary: fc.constant({ kind: 'end-session' as const }) },
  { weight: 1, arbitrary: fc.tuple(fc.boolean(), fc.integer({ min: 0, max: 3 })).map(([tornSession, tornStorage]) => ({ kind: 'kill' as const, tornSession, tornStorage })) },
);

test('a session and two snapshots on one device match the model through writes, takes, session ends and kills', async (t) => {
  const top = tempDir(t, 'bdsnap-pointsmodel-');
  let run = 0;
  await fc.assert(
    fc.asyncProperty(fc.constantFrom(4096, 8192, 16384), seededArb, fc.array(opArb, { minLength: 1, maxLength: 25 }), fc.nat(), async (chunkSize, early, ops, pickSession) => {
      const dir = path.join(top, `run-${run++}`);
      fs.mkdirSync(dir);
      const image = path.join(dir, 'disk.img');
      const first = pattern(SIZE, 99, 0);
      fs.writeFileSync(image, first);
      const root = path.join(dir, 'sessions');
      let model = Buffer.from(first);
      let dev = await FileDevice.open(image);
      let layer = new SnapshotLayer(dev, { chunkSize });
      const points = new ModelPoints(dir, chunkSize);
      const oldLayers: SnapshotLayer[] = [];
      const sessions = new ModelSessions(dev, image, root, chunkSize);
      let cow: CowDevice = sessions.open(layer, model);
      const checkView = async (offset: number, length: number, what: string): Promise<void> => {
        const got = Buffer.alloc(length);
        await cow.view().read(got, offset);
        assert.ok(got.equals(sessions.start.subarray(offset, offset + length)), `${what}: the session view at ${offset}+${length}`);
      };
      const write = (w: Seeded): Promise<void> => cow.write(pattern(w.length, w.seed, w.offset), w.offset);
      const take = (before: Seeded | undefined, during: Seeded | undefined): Promise<void> => points.take(layer, write, model, before, during);
      try {
        // Two snapshots at different points in time, both beside the session from here on.
        await take(undefined, undefined);
        await write(early);
        pattern(early.length, early.seed, early.offset).copy(model, early.offset);
        await take(undefined, undefined);
        for (const op of ops) {
          switch (op.kind) {
            case 'write':
            case 'zero':
            case 'trim':
            case 'flush':
              await applyDeviceOp(cow, model, op);
              break;
            case 'burst': {
              // Device writes in flight together with reads of every point: the device keeps
              // whichever write landed last (taken from the device), the points must not move.
              const reads = op.reads.flatMap((r, i) => {
                if (i % 2 === 0) return [checkView(r.offset, r.length, 'view read during a burst')];
                const p = points.pick(r.pick);
                return p ? [points.check(p, r.offset, r.length, 'image read during a burst')] : [];
              });
              await Promise.all([...op.writes.map(write), ...reads]);
              model = Buffer.alloc(SIZE);
              await dev.read(model, 0);
              break;
            }
            case 'view':
              await checkView(op.offset, op.length, 'view read');
              break;
            case 'image-read': {
              const p = points.pick(op.pick);
              if (p) await points.check(p, op.offset, op.length, 'image read');
              break;
            }
            case 'image-write':
              await points.imageWrite(op);
              break;
            case 'take': {
              // The older snapshot goes; a new one takes its place, so two stay.
              const old = points.list.shift()!;
              await layer.removePoint(old.image);
              for (const s of old.dropped) await s.close();
              await old.storage.destroy();
              await take(op.before, op.during);
              assert.equal(layer.pointCount, 3, 'the session and two snapshots');
              break;
            }
            case 'end-session':
              await cow.close();
              sessions.ended(cow);
              cow = sessions.open(layer, model);
              break;
            case 'kill': {
              // The process dies: nothing is closed or flushed; torn records may follow the last
              // stored ones. The restarted process recovers the session, reopens every storage,
              // adds its point again and starts a new session.
              await sessions.kill(cow, op.tornSession);
              oldLayers.push(layer);
              layer = new SnapshotLayer(dev, { chunkSize });
              await points.reopen(layer, op.tornStorage);
              cow = sessions.open(layer, model);
              break;
            }
          }
        }
        await checkView(0, SIZE, 'view at the end');
        for (const p of points.list) await points.check(p, 0, SIZE, 'image at the end');
        await cow.close();
        sessions.ended(cow);
        const onDevice = Buffer.alloc(SIZE);
        await dev.read(onDevice, 0);
        assert.ok(onDevice.equals(model), 'the device holds what was written');
      } finally {
        await cow.dropAsIfKilled().catch(() => undefined);
        await points.close(layer);
        await layer.close();
        for (const l of oldLayers) await l.close();
        await dev.close();
      }
      await sessions.restoresEach(pickSession, first);
      dev = await FileDevice.open(image); // the lock was released by every path above
      await dev.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }),
    { numRuns: 50 },
  );
});
