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
import { DATA_FILE } from '../../src/snapshot/format.js';
import {
  CowDevice, DiffStorage, SnapshotLayer, listSessions, recoverSession, restore, type DiffStorageOptions, type SnapshotImage,
} from '../../src/snapshot/index.js';
import { tearTail, tempDir } from './helpers.js';

type Range = { offset: number; length: number };
type Seeded = Range & { seed: number };
type Op =
  | ({ kind: 'write' } & Seeded)
  | ({ kind: 'zero' } & Range)
  | ({ kind: 'trim' } & Range)
  | { kind: 'flush' }
  | { kind: 'burst'; writes: Seeded[]; reads: Array<Range & { pick: number }> }
  | ({ kind: 'view' } & Range)
  | ({ kind: 'image-read'; pick: number } & Range)
  | ({ kind: 'image-write'; pick: number; zero: boolean } & Seeded)
  | { kind: 'take'; before: Seeded; during: Seeded }
  | { kind: 'end-session' }
  | { kind: 'kill'; tornSession: boolean; tornStorage: number };

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
  { weight: 2, arbitrary: range.map((r) => ({ kind: 'view' as const, ...r })) },
  { weight: 2, arbitrary: fc.tuple(fc.nat(), range).map(([pick, r]) => ({ kind: 'image-read' as const, pick, ...r })) },
  { weight: 2, arbitrary: fc.tuple(fc.nat(), seeded, fc.boolean()).map(([pick, r, zero]) => ({ kind: 'image-write' as const, pick, zero, ...r })) },
  { weight: 1, arbitrary: fc.tuple(seeded, seeded).map(([before, during]) => ({ kind: 'take' as const, before, during })) },
  { weight: 1, arbitrary: fc.constant({ kind: 'end-session' as const }) },
  { weight: 1, arbitrary: fc.tuple(fc.boolean(), fc.integer({ min: 0, max: 3 })).map(([tornSession, tornStorage]) => ({ kind: 'kill' as const, tornSession, tornStorage })) },
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

test('a session and two snapshots on one device match the model through writes, takes, session ends and kills', async (t) => {
  const top = tempDir(t, 'bdsnap-pointsmodel-');
  let run = 0;
  await fc.assert(
    fc.asyncProperty(fc.constantFrom(4096, 8192, 16384), seeded, fc.array(opArb, { minLength: 1, maxLength: 25 }), fc.nat(), async (chunkSize, early, ops, pickSession) => {
      const dir = path.join(top, `run-${run++}`);
      fs.mkdirSync(dir);
      const image = path.join(dir, 'disk.img');
      const first = pattern(SIZE, 99, 0);
      fs.writeFileSync(image, first);
      const root = path.join(dir, 'sessions');
      let model = Buffer.from(first);
      let dev = await FileDevice.open(image);
      let layer = new SnapshotLayer(dev, { chunkSize });
      const points: Point[] = [];
      const oldLayers: SnapshotLayer[] = [];
      let nextId = 0;
      /** Start content of every session that left a directory, oldest first. */
      const starts: Array<{ dir: string; content: Buffer }> = [];
      let sessionStart = Buffer.from(model);
      let mountMs = Date.parse('2026-01-01T00:00:00Z');
      const newSession = (): CowDevice => {
        sessionStart = Buffer.from(model);
        mountMs += 1000;
        return CowDevice.create(layer, { devicePath: image, snapshotRoot: root, chunkSize, deviceIdentity: { ...dev.identity }, mountTime: new Date(mountMs) });
      };
      let cow = newSession();
      const endSession = (): void => {
        if (cow.sessionDir) starts.push({ dir: cow.sessionDir, content: sessionStart });
      };
      const pick = (n: number): Point | undefined => points[n % Math.max(1, points.length)];
      const checkImage = async (p: Point, offset: number, length: number, what: string): Promise<void> => {
        const got = Buffer.alloc(length);
        await p.image.read(got, offset);
        assert.ok(got.equals(p.content.subarray(offset, offset + length)), `${what}: image ${p.options.id} at ${offset}+${length}`);
      };
      const checkView = async (offset: number, length: number, what: string): Promise<void> => {
        const got = Buffer.alloc(length);
        await cow.view().read(got, offset);
        assert.ok(got.equals(sessionStart.subarray(offset, offset + length)), `${what}: the session view at ${offset}+${length}`);
      };
      const write = (w: Seeded): Promise<void> => cow.write(pattern(w.length, w.seed, w.offset), w.offset);
      /** A snapshot now, through the barrier: a write in flight when hold() starts is in it, one issued while held is not. */
      const take = async (before: Seeded | undefined, during: Seeded | undefined): Promise<void> => {
        const storeDir = path.join(dir, `store-${nextId}`);
        fs.mkdirSync(storeDir, { mode: 0o700 });
        const options: DiffStorageOptions = { id: `snap${nextId++}`, dirs: [storeDir], chunkSize };
        const storage = await DiffStorage.create(options);
        const writing = before ? write(before) : Promise.resolve();
        const holding = layer.hold();
        if (before) pattern(before.length, before.seed, before.offset).copy(model, before.offset);
        await holding;
        let reached = false;
        const held = during ? write(during).then(() => (reached = true)) : Promise.resolve();
        points.push({ options, storage, image: layer.addPoint(storage, 0), content: Buffer.from(model), dropped: [] });
        await new Promise((resolve) => setImmediate(resolve));
        assert.equal(reached, false, 'a write issued while held waits for release()');
        layer.release();
        await Promise.all([writing, held]);
        if (during) pattern(during.length, during.seed, during.offset).copy(model, during.offset);
      };
      try {
        // Two snapshots at different points in time, both beside the session from here on.
        await take(undefined, undefined);
        await write(early);
        pattern(early.length, early.seed, early.offset).copy(model, early.offset);
        await take(undefined, undefined);
        for (const op of ops) {
          switch (op.kind) {
            case 'write':
              await write(op);
              pattern(op.length, op.seed, op.offset).copy(model, op.offset);
              break;
            case 'zero':
              await cow.zero(op.offset, op.length);
              model.fill(0, op.offset, op.offset + op.length);
              break;
            case 'trim':
              // FileDevice trims are advisory: the content stays, but the originals must be kept.
              await cow.trim(op.offset, op.length);
              break;
            case 'flush':
              await cow.flush();
              break;
            case 'burst': {
              // Device writes in flight together with reads of every point: the device keeps
              // whichever write landed last (taken from the device), the points must not move.
              const reads = op.reads.flatMap((r, i) => {
                if (i % 2 === 0) return [checkView(r.offset, r.length, 'view read during a burst')];
                const p = pick(r.pick);
                return p ? [checkImage(p, r.offset, r.length, 'image read during a burst')] : [];
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
              const p = pick(op.pick);
              if (p) await checkImage(p, op.offset, op.length, 'image read');
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
            case 'take': {
              // The older snapshot goes; a new one takes its place, so two stay.
              const old = points.shift()!;
              await layer.removePoint(old.image);
              for (const s of old.dropped) await s.close();
              await old.storage.destroy();
              await take(op.before, op.during);
              assert.equal(layer.pointCount, 3, 'the session and two snapshots');
              break;
            }
            case 'end-session':
              await cow.close();
              endSession();
              cow = newSession();
              break;
            case 'kill': {
              // The process dies: nothing is closed or flushed; torn records may follow the last
              // stored ones. The restarted process recovers the session, reopens every storage,
              // adds its point again and starts a new session.
              await cow.dropAsIfKilled();
              endSession();
              if (op.tornSession && cow.sessionDir) fs.appendFileSync(path.join(cow.sessionDir, DATA_FILE), pattern(100, 7, 0));
              if (cow.sessionDir) assert.equal((await recoverSession(cow.sessionDir)).state, 'interrupted');
              oldLayers.push(layer);
              layer = new SnapshotLayer(dev, { chunkSize });
              for (const p of points) {
                if (op.tornStorage > 0) tearTail(p.storage, op.tornStorage);
                p.dropped.push(p.storage);
                p.storage = await DiffStorage.open(p.options);
                assert.equal(p.storage.state, 'ok');
                await layer.hold();
                p.image = layer.addPoint(p.storage, 0);
                layer.release();
                await checkImage(p, 0, SIZE, 'image after a restart');
              }
              cow = newSession();
              break;
            }
          }
        }
        await checkView(0, SIZE, 'view at the end');
        for (const p of points) await checkImage(p, 0, SIZE, 'image at the end');
        await cow.close();
        endSession();
        const onDevice = Buffer.alloc(SIZE);
        await dev.read(onDevice, 0);
        assert.ok(onDevice.equals(model), 'the device holds what was written');
      } finally {
        await cow.dropAsIfKilled().catch(() => undefined);
        for (const p of points) {
          await layer.removePoint(p.image);
          for (const s of p.dropped) await s.close();
          await p.storage.close();
        }
        await layer.close();
        for (const l of oldLayers) await l.close();
        await dev.close();
      }
      const listed = await listSessions(root, image);
      assert.deepEqual(listed.map((s) => s.dir), starts.map((s) => s.dir));
      if (starts.length > 0) {
        // Restore a random session, then the oldest.
        const k = pickSession % starts.length;
        const r1 = await restore(starts[k]!.dir);
        assert.equal(r1.sessionsApplied.length, starts.length - k);
        assert.deepEqual(fs.readFileSync(image), starts[k]!.content, `restore of session ${k} of ${starts.length}`);
        await restore(starts[0]!.dir);
        assert.deepEqual(fs.readFileSync(image), first, 'restore of the oldest gives the very first content');
      }
      dev = await FileDevice.open(image); // the lock was released by every path above
      await dev.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }),
    { numRuns: 50 },
  );
});
