/**
 * The backup promise through the daemon, against a model: random sequences of what users do
 * to an active image (NBD sessions of random writes, some written around by `dd`; `dd` into the
 * image while nothing holds it; the daemon killed with SIGKILL and started again; `backup
 * create`, full or incremental as the change map allows; `backup restore` of any earlier
 * backup) and every restore must give back exactly the image as it was when its backup was
 * made. An incremental built on a change map that missed a write would restore a stale image:
 * the model sees it.
 */

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { TEST_PASSWORD, ok, sandbox, startDaemon, type Sandbox } from '../../testkit/daemon.js';
import { makeImage } from '../../testkit/files.js';
import { needs } from '../../testkit/needs.js';
import { seededRandom } from '../helpers/crash-states.js';
import { applyWrite, ddWrite, randomWrite } from '../helpers/image-writes.js';
import { describeSession, drawSession, runUserSession } from '../service/helpers.js';
import { backupCreate } from './daemon-cycles.js';

const IMAGE_BYTES = 2 << 20;
const STEPS = 14;

interface Seen { sessions: number; full: number; incremental: number; restored: number; killed: number; writtenAround: number; outside: number }

async function runSequence(t: TestContext, seed: number, seen: Seen): Promise<void> {
  const random = seededRandom(seed);
  const box: Sandbox = sandbox(t, 'bdsnap-backup-promise-');
  const image = fs.realpathSync(makeImage(path.join(box.top, 'disk.img'), IMAGE_BYTES, 'random', seed));
  const repo = path.join(box.top, 'repo');
  let daemon = await startDaemon(t, { sandbox: box, password: false });
  ok(box, ['passwd', '--password-stdin'], `${TEST_PASSWORD}\n`);
  ok(box, ['activate', image, '--password-stdin'], `${TEST_PASSWORD}\n`);
  ok(box, ['backup', 'init', '--repo', repo]);

  const model = fs.readFileSync(image);
  const backups: Array<{ id: string; content: Buffer }> = [];
  const log: string[] = [];
  const where = (): string => `seed ${seed}, steps: ${log.join('; ')}`;

  for (let step = 0; step < STEPS; step++) {
    const roll = random();
    if (roll < 0.35) {
      const session = drawSession(random, IMAGE_BYTES);
      seen.sessions++;
      log.push(describeSession(session));
      daemon = await runUserSession(t, box, daemon, image, model, session);
      if (session.around) seen.writtenAround++;
      if (session.kill) seen.killed++;
    } else if (roll < 0.45) {
      const w = randomWrite(random, IMAGE_BYTES);
      log.push('a write outside bdsnap while nothing held the image');
      ddWrite(image, w);
      applyWrite(model, w);
      seen.outside++;
    } else if (roll < 0.75 || backups.length === 0) {
      const created = backupCreate(box, repo, [image]);
      const kind = created.devices[0]!.kind;
      log.push(`backup ${backups.length + 1} (${kind})`);
      seen[kind]++;
      assert.ok(fs.readFileSync(image).equals(model), `the backup changed the image (${where()})`);
      backups.push({ id: created.id, content: Buffer.from(model) });
    } else {
      const pick = Math.floor(random() * backups.length);
      log.push(`restore of backup ${pick + 1} of ${backups.length}`);
      const out = path.join(box.top, `restored-${step}.img`);
      ok(box, ['backup', 'restore', '--repo', repo, backups[pick]!.id, image, '--output', out]);
      assert.ok(fs.readFileSync(out).equals(backups[pick]!.content), `backup ${pick + 1} restored something else than the image it was made of (${where()})`);
      fs.rmSync(out);
      seen.restored++;
    }
  }
  // Every backup, once more at the end: a later incremental must not have changed what an earlier one gives back.
  for (const [i, b] of backups.entries()) {
    const out = path.join(box.top, 'final.img');
    ok(box, ['backup', 'restore', '--repo', repo, b.id, image, '--output', out]);
    assert.ok(fs.readFileSync(out).equals(b.content), `backup ${i + 1}, restored at the end (${where()})`);
    fs.rmSync(out);
    seen.restored++;
  }
}

test('backups through the daemon, in random orders with sessions, writes around bdsnap and daemon kills: each restores exactly the image it was made of', { timeout: 300_000 }, async (t) => {
  if (!needs(t, { root: true, tools: ['nbdsh', 'dd'] })) return;
  const seen: Seen = { sessions: 0, full: 0, incremental: 0, restored: 0, killed: 0, writtenAround: 0, outside: 0 };
  for (const seed of [41, 42, 43]) await runSequence(t, seed, seen);
  t.diagnostic(JSON.stringify(seen));
  assert.ok(seen.full > 0 && seen.incremental > 0 && seen.restored > 0 && seen.killed > 0 && seen.writtenAround > 0 && seen.outside > 0, `cases met: ${JSON.stringify(seen)}`);
});
