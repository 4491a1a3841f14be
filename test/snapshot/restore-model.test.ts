/**
 * Model-based test of the restore promise: random interleavings of what users do to an image
 * (mounts with writes that end cleanly or by a kill, writes outside bdsnap, restores of any
 * session in place or to `--output`, with or without `--force`) against an in-memory model.
 * Every restore must give back exactly the session's start, or be refused with a reason; it
 * must never write a wrong image. Where the model knows the start can be rebuilt (nothing
 * outside bdsnap touched the device since, and no restore went back past it), the restore must
 * succeed; a refusal there is a failure too.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import fc from 'fast-check';
import { BdsnapError } from '../../src/errors.js';
import { FileDevice } from '../../src/device/file-device.js';
import { DATA_FILE } from '../../src/snapshot/format.js';
import { CowDevice, forgetSessions, listSessions, planForget, recoverSession, restore } from '../../src/snapshot/index.js';
import { pattern, tempDir } from './helpers.js';

const CHUNK = 4096;
const SIZE = 24 * CHUNK + 1024; // the last chunk is partial

interface Write { offset: number; length: number; seed: number }

type Op =
  | { kind: 'session'; writes: Write[]; end: 'close' | 'kill' | 'torn' }
  | { kind: 'outside'; write: Write }
  | { kind: 'restore'; pick: number; output: boolean; force: boolean }
  | { kind: 'forget'; keepLast: number };

const writeArb: fc.Arbitrary<Write> = fc.tuple(fc.integer({ min: 0, max: SIZE - 1 }), fc.integer({ min: 1, max: 3 * CHUNK }), fc.integer({ min: 1, max: 255 }))
  .map(([offset, length, seed]) => ({ offset, length: Math.min(length, SIZE - offset), seed }));

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 5, arbitrary: fc.record({ kind: fc.constant('session' as const), writes: fc.array(writeArb, { minLength: 0, maxLength: 4 }), end: fc.constantFrom('close' as const, 'close' as const, 'kill' as const, 'torn' as const) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('outside' as const), write: writeArb }) },
  { weight: 4, arbitrary: fc.record({ kind: fc.constant('restore' as const), pick: fc.nat(), output: fc.boolean(), force: fc.constantFrom(false, false, false, true) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('forget' as const), keepLast: fc.integer({ min: 1, max: 3 }) }) },
);

interface Session {
  dir: string;
  start: Buffer;
  /** 'exact': a restore must give back `start`; 'lost': it may also refuse, never be wrong. */
  status: 'exact' | 'lost';
  /** An in-place restore of an older session went back past this one's start. */
  jumped: boolean;
}

/** What the model run saw, to report when a property fails. */
interface Log { lines: string[] }

async function runOps(dir: string, ops: Op[], log: Log): Promise<void> {
  const image = path.join(dir, 'disk.img');
  const root = path.join(dir, 'snap');
  let device = pattern(SIZE, 99, 0);
  fs.writeFileSync(image, device);
  const sessions: Session[] = [];
  let mountMs = Date.parse('2026-01-01T00:00:00Z');
  let outputs = 0;
  const now = (): Buffer => fs.readFileSync(image);

  for (const op of ops) {
    switch (op.kind) {
      case 'session': {
        const start = Buffer.from(device);
        const dev = await FileDevice.open(image);
        mountMs += 1000;
        const cow = CowDevice.create(dev, { devicePath: image, snapshotRoot: root, chunkSize: CHUNK, deviceIdentity: { ...dev.identity }, mountTime: new Date(mountMs) });
        for (const w of op.writes) {
          const data = pattern(w.length, w.seed, w.offset);
          await cow.write(data, w.offset);
          data.copy(device, w.offset);
        }
        if (op.end === 'close') await cow.close();
        const sessionDir = cow.sessionDir;
        if (op.end !== 'close') {
          // Killed: the store holds what the page cache got; a torn record may follow it.
          await cow.dropAsIfKilled();
          if (op.end === 'torn' && sessionDir) fs.appendFileSync(path.join(sessionDir, DATA_FILE), pattern(100, 7, 0));
          if (sessionDir) assert.equal((await recoverSession(sessionDir)).state, 'interrupted');
        }
        await dev.close();
        if (sessionDir) sessions.push({ dir: sessionDir, start, status: 'exact', jumped: false });
        log.lines.push(`session ${sessions.length - 1} (${op.writes.length} writes, ${op.end})${sessionDir ? '' : ' left no directory'}`);
        break;
      }
      case 'outside': {
        const data = pattern(op.write.length, op.write.seed, op.write.offset);
        const changed = !data.equals(device.subarray(op.write.offset, op.write.offset + op.write.length));
        const fd = fs.openSync(image, 'r+');
        fs.writeSync(fd, data, 0, data.length, op.write.offset);
        fs.closeSync(fd);
        data.copy(device, op.write.offset);
        // Nobody recorded this write: no session's start can be rebuilt for sure any more (even
        // one that wrote the bytes already there moves the image's stamp, which restore checks).
        for (const s of sessions) s.status = 'lost';
        log.lines.push(`outside write at ${op.write.offset}+${op.write.length}${changed ? '' : ' (no change)'}`);
        break;
      }
      case 'forget': {
        // Old sessions go; every kept one must restore as before (the restores after this check it).
        await forgetSessions(root, await planForget(root, image, { keepLast: op.keepLast }));
        const left = new Set((await listSessions(root, image)).map((s) => s.dir));
        // Exactly: every session a restore went back past goes, and of the others the newest N stay.
        const others = sessions.filter((s) => !s.jumped);
        assert.deepEqual(sessions.filter((s) => left.has(s.dir)).map((s) => s.dir), others.slice(-op.keepLast).map((s) => s.dir), `forget --keep-last ${op.keepLast}`);
        const before = sessions.length;
        sessions.splice(0, sessions.length, ...sessions.filter((s) => left.has(s.dir)));
        log.lines.push(`forget --keep-last ${op.keepLast}: ${before - sessions.length} removed`);
        break;
      }
      case 'restore': {
        if (sessions.length === 0) break;
        const k = op.pick % sessions.length;
        const s = sessions[k]!;
        const output = op.output ? path.join(dir, `out-${outputs++}.img`) : undefined;
        const what = `restore of session ${k}${output ? ' --output' : ''}${op.force ? ' --force' : ''} (${s.status})`;
        let refused: BdsnapError | undefined;
        try {
          await restore(s.dir, { output, force: op.force });
        } catch (err) {
          if (!(err instanceof BdsnapError)) throw err;
          refused = err;
        }
        log.lines.push(`${what}: ${refused ? `refused (${refused.code}: ${refused.message})` : 'done'}`);
        if (refused || output) assert.ok(now().equals(device), `${what}: a refused or --output restore changed the device`);
        if (refused) {
          assert.ok(s.status === 'lost', `${what} was refused, but its start can be rebuilt: ${refused.message}`);
          if (output) assert.equal(fs.existsSync(output), false, `${what}: a refused --output restore leaves no file`);
          break;
        }
        const got = output ? fs.readFileSync(output) : now();
        if (output) fs.rmSync(output);
        if (!op.force || s.status === 'exact') assert.ok(got.equals(s.start), `${what} succeeded with a wrong image`);
        if (output) break;
        device = Buffer.from(got);
        // Sessions that started after this one are undone: their starts are gone.
        for (const later of sessions.slice(k + 1)) {
          later.status = 'lost';
          later.jumped = true;
        }
        // A forced restore over changes outside bdsnap leaves a device that is no session's start.
        if (!got.equals(s.start)) for (const older of sessions.slice(0, k + 1)) older.status = 'lost';
        break;
      }
    }
  }
}

test('every restore, in any order, gives back the session start exactly or is refused with a reason', async (t) => {
  const top = tempDir(t, 'bdsnap-restore-model-');
  let run = 0;
  await fc.assert(
    fc.asyncProperty(fc.array(opArb, { minLength: 1, maxLength: 14 }), async (ops) => {
      const dir = path.join(top, `run-${run++}`);
      fs.mkdirSync(dir);
      const log: Log = { lines: [] };
      try {
        await runOps(dir, ops, log);
      } catch (err) {
        throw new Error(`${(err as Error).message}\n  after: ${log.lines.join('\n         ')}`, { cause: err });
      }
      fs.rmSync(dir, { recursive: true, force: true });
    }),
    { numRuns: 150 },
  );
});

test('the reported case: a restore from an older session makes a newer one unrestorable, and restore says so', async (t) => {
  const dir = tempDir(t, 'bdsnap-restore-model-');
  const write = (offset: number, seed: number): Op => ({ kind: 'session', writes: [{ offset, length: CHUNK, seed }], end: 'close' });
  const log: Log = { lines: [] };
  // Sa, Sb, restore Sb, restore Sa, Sc, restore Sb --output: refused (Sb's start was lost).
  await runOps(dir, [
    write(0, 1), write(CHUNK, 2),
    { kind: 'restore', pick: 1, output: false, force: false },
    { kind: 'restore', pick: 0, output: false, force: false },
    write(2 * CHUNK, 3),
    { kind: 'restore', pick: 1, output: true, force: false },
  ], log);
  assert.match(log.lines.at(-1)!, /restore of session 1 --output .*: refused \(ESESSION: the start of .* cannot be rebuilt: a restore from the older session/);
});
