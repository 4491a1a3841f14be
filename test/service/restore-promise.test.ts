/**
 * The restore promise through the daemon, against a model: random sequences of what users do
 * to an active image (NBD sessions of random writes; `dd` into the image while a session holds
 * it, or while nothing does; the daemon killed with SIGKILL in the middle of a session and
 * started again; a second daemon started on the same directories; restores of any session) and
 * after every restore the image must be exactly that session's start (exit 0) or left as it
 * was (refused, with a reason): never a wrong image. A session that another process wrote
 * around, and every session before it, must be refused; the newest session, untouched since it
 * ended (or since the daemon that held it was killed) and not yet restored, must restore.
 */

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { TEST_PASSWORD, cli, ok, sandbox, startDaemon } from '../../testkit/daemon.js';
import { makeImage } from '../../testkit/files.js';
import { needs } from '../../testkit/needs.js';
import { seededRandom } from '../helpers/crash-states.js';
import { applyWrite, ddWrite, randomWrite } from '../helpers/image-writes.js';
import { describeSession, drawSession, runUserSession, sessionDirs } from './helpers.js';

const IMAGE_BYTES = 1 << 20;
const STEPS = 12;

/** What the model knows of a session: the image at its start, and whether another process wrote around it. */
interface ModelSession { dir: string; start: Buffer; writtenAround: boolean }

/** What a sequence did, so that the test can tell it covered each case. */
interface Seen { restored: number; refused: number; writtenAround: number; refusedWrittenAround: number; killed: number }

async function runSequence(t: TestContext, seed: number, seen: Seen): Promise<void> {
  const random = seededRandom(seed);
  const box = sandbox(t, 'bdsnap-promise-');
  const image = fs.realpathSync(makeImage(path.join(box.top, 'disk.img'), IMAGE_BYTES, 'random', seed));
  let daemon = await startDaemon(t, { sandbox: box, password: false });
  ok(box, ['passwd', '--password-stdin'], `${TEST_PASSWORD}\n`);
  ok(box, ['activate', image, '--password-stdin'], `${TEST_PASSWORD}\n`);

  const model = fs.readFileSync(image);
  const sessions: ModelSession[] = [];
  /** Whether the newest session is the last thing that changed the image (nothing outside since, no restore). */
  let newestUntouched = false;
  const log: string[] = [];
  const where = (): string => `seed ${seed}, steps: ${log.join('; ')}`;

  for (let step = 0; step < STEPS; step++) {
    const roll = random();
    if (roll < 0.45 || sessions.length === 0) {
      const session = drawSession(random, IMAGE_BYTES);
      log.push(describeSession(session));
      const start = Buffer.from(model);
      const before = new Set(sessionDirs(box));
      daemon = await runUserSession(t, box, daemon, image, model, session);
      if (session.kill) seen.killed++;
      const fresh = sessionDirs(box).filter((d) => !before.has(d));
      assert.equal(fresh.length, 1, `one new session directory (${where()})`);
      sessions.push({ dir: fresh[0]!, start, writtenAround: session.around !== undefined });
      if (session.around) seen.writtenAround++;
      newestUntouched = true;
    } else if (roll < 0.52) {
      log.push('a second daemon started on the same directories');
      const second = cli(box, ['daemon', '--run-dir', box.runDir, '--state-dir', box.stateDir, '--snapshot-root', box.snapshotRoot]);
      assert.notEqual(second.status, 0, `a second daemon was not refused (${where()})`);
      assert.ok(fs.readFileSync(image).equals(model), `a refused second daemon changed the image (${where()})`);
      assert.ok(daemon.server.running(), `the first daemon still runs (${where()})`);
    } else if (roll < 0.62) {
      const w = randomWrite(random, IMAGE_BYTES);
      log.push('a write outside bdsnap while nothing held the image');
      ddWrite(image, w);
      applyWrite(model, w);
      newestUntouched = false;
    } else {
      const pick = Math.floor(random() * sessions.length);
      const target = sessions[pick]!;
      log.push(`restore of session ${pick + 1} of ${sessions.length}`);
      const r = cli(box, ['restore', path.join(box.snapshotRoot, target.dir)]);
      const now = fs.readFileSync(image);
      if (r.status === 0) {
        assert.ok(now.equals(target.start), `restore said it succeeded but the image is not the session's start (${where()})`);
        assert.ok(!sessions.slice(pick).some((s) => s.writtenAround), `a session written around (or one before it) was restored (${where()})`);
        model.set(now);
        seen.restored++;
      } else {
        seen.refused++;
        if (sessions.slice(pick).some((s) => s.writtenAround)) seen.refusedWrittenAround++;
        assert.ok(now.equals(model), `a refused restore changed the image (${where()}): ${r.stderr}`);
        assert.match(r.stderr, /\S/, `a refusal says why (${where()})`);
        const mustRestore = pick === sessions.length - 1 && newestUntouched && !target.writtenAround;
        assert.ok(!mustRestore, `the newest session, untouched since it ended, was refused (${where()}): ${r.stderr}`);
      }
      newestUntouched = false;
    }
  }
}

test('restore through the daemon, in random orders with writes around bdsnap: the session start exactly, or refused and the image left as it was', { timeout: 240_000 }, async (t) => {
  if (!needs(t, { root: true, tools: ['nbdsh', 'dd'] })) return;
  const seen: Seen = { restored: 0, refused: 0, writtenAround: 0, refusedWrittenAround: 0, killed: 0 };
  for (const seed of [11, 12, 13]) await runSequence(t, seed, seen);
  t.diagnostic(JSON.stringify(seen));
  // The sequences must have met every case, or they prove less than they claim.
  assert.ok(seen.restored > 0 && seen.refused > 0 && seen.refusedWrittenAround > 0 && seen.killed > 0, `cases met: ${JSON.stringify(seen)}`);
});
