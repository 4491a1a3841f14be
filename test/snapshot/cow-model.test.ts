/**
 * Model-based property test of the copy-before-write engine: random writes, trims, zeroes,
 * flushes, concurrent bursts, simulated process kills (the CowDevice is dropped without close,
 * sometimes with a torn record appended, then recovered) and clean closes, checked against an
 * in-memory model. The view must always show the session's start; restoring any session must
 * give back its start, and restoring the oldest afterwards the very first content.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import fc from 'fast-check';
import { FileDevice } from '../../src/device/file-device.js';
import { restore, type CowDevice } from '../../src/snapshot/index.js';
import { MODEL_SIZE as SIZE, ModelSessions, applyDeviceOp, pattern, rangeArb as range, tempDir, type DeviceOp } from './helpers.js';

type Op =
  | DeviceOp
  | { kind: 'burst'; writes: Array<{ offset: number; length: number; seed: number }> }
  | { kind: 'view'; offset: number; length: number }
  | { kind: 'close' }
  | { kind: 'kill'; torn: boolean };

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 6, arbitrary: fc.tuple(range, fc.integer({ min: 1, max: 255 }), fc.boolean()).map(([r, seed, fua]) => ({ kind: 'write' as const, ...r, seed, fua })) },
  { weight: 2, arbitrary: range.map((r) => ({ kind: 'zero' as const, ...r })) },
  { weight: 1, arbitrary: range.map((r) => ({ kind: 'trim' as const, ...r })) },
  { weight: 1, arbitrary: fc.constant({ kind: 'flush' as const }) },
  { weight: 2, arbitrary: fc.array(fc.tuple(range, fc.integer({ min: 1, max: 255 })).map(([r, seed]) => ({ ...r, seed })), { minLength: 2, maxLength: 6 }).map((writes) => ({ kind: 'burst' as const, writes })) },
  { weight: 3, arbitrary: range.map((r) => ({ kind: 'view' as const, ...r })) },
  { weight: 1, arbitrary: fc.constant({ kind: 'close' as const }) },
  { weight: 1, arbitrary: fc.boolean().map((torn) => ({ kind: 'kill' as const, torn })) },
);

test('copy-before-write matches the model through writes, kills, recoveries and restores', async (t) => {
  const top = tempDir(t, 'bdsnap-model-');
  let run = 0;
  await fc.assert(
    fc.asyncProperty(fc.constantFrom(4096, 8192, 16384), fc.array(opArb, { minLength: 1, maxLength: 25 }), fc.nat(), async (chunkSize, ops, pick) => {
      const dir = path.join(top, `run-${run++}`);
      fs.mkdirSync(dir);
      const image = path.join(dir, 'disk.img');
      const first = pattern(SIZE, 99, 0);
      fs.writeFileSync(image, first);
      const root = path.join(dir, 'snap');
      let model = Buffer.from(first);
      let dev = await FileDevice.open(image);
      const sessions = new ModelSessions(dev, image, root, chunkSize);
      let cow: CowDevice = sessions.open(dev, model);
      try {
        for (const op of ops) {
          switch (op.kind) {
            case 'write':
            case 'zero':
            case 'trim':
            case 'flush':
              await applyDeviceOp(cow, model, op);
              break;
            case 'burst': {
              // Overlapping writes in flight together: the device keeps whichever landed last, so
              // take the model from the device, but the originals must still be exact.
              await Promise.all(op.writes.map((w) => cow.write(pattern(w.length, w.seed, w.offset), w.offset)));
              model = Buffer.alloc(SIZE);
              await dev.read(model, 0);
              break;
            }
            case 'view': {
              const got = Buffer.alloc(op.length);
              await cow.view().read(got, op.offset);
              assert.deepEqual(got, sessions.start.subarray(op.offset, op.offset + op.length), 'the view shows the session start');
              break;
            }
            case 'close':
              await cow.close();
              sessions.ended(cow);
              cow = sessions.open(dev, model);
              break;
            case 'kill':
              await sessions.kill(cow, op.torn);
              cow = sessions.open(dev, model);
              break;
          }
        }
        await cow.close();
        sessions.ended(cow);
      } finally {
        await dev.close();
      }
      assert.deepEqual(fs.readFileSync(image), model, 'the device holds what was written');
      if (!(await sessions.restoresEach(pick, first))) return;
      const again = await restore(sessions.starts[0]!.dir);
      assert.equal(again.alreadyRestored, true);
      dev = await FileDevice.open(image); // the lock was released by every path above
      await dev.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }),
    { numRuns: 60 },
  );
});
