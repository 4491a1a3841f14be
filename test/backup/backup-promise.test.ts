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
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { TEST_PASSWORD, ok, sandbox, startDaemon, type Sandbox } from '../../testkit/daemon.js';
import { makeImage } from '../../testkit/files.js';
import { needs } from '../../testkit/needs.js';
import { seededRandom } from '../helpers/crash-states.js';
import { heldNbdsh } from '../service/helpers.js';
import { backupCreate } from './daemon-cycles.js';

const IMAGE_BYTES = 2 << 20;
const STEPS = 14;

interface Write { offset: number; length: number; byte: number }

function apply(image: Buffer, w: Write): void {
  image.fill(w.byte, w.offset, w.offset + w.length);
}

/** A write of up to 48 KiB at a random place, in whole `align`-byte blocks. */
function randomWrite(random: () => number, align = 1): Write {
  const blocks = IMAGE_BYTES / align;
  const offset = Math.floor(random() * (blocks - 1)) * align;
  const length = Math.min(1 + Math.floor(random() * ((3 * 16384) / align)), blocks - offset / align) * align;
  return { offset, length, byte: 1 + Math.floor(random() * 255) };
}

/** dd writing `w` into `file` in place, as another process. */
function ddWrite(file: string, w: Write): void {
  const r = spawnSync('sh', ['-c', `head -c ${w.length} /dev/zero | tr '\\0' '\\${w.byte.toString(8).padStart(3, '0')}' | dd of="$1" bs=4096 seek=${w.offset} oflag=seek_bytes conv=notrunc status=none`, 'sh', file],
    { encoding: 'utf8', timeout: 20_000 });
  assert.equal(r.status, 0, r.stderr);
}

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
      const writes = Array.from({ length: 1 + Math.floor(random() * 3) }, () => randomWrite(random, 4096));
      const around = random() < 0.3 ? randomWrite(random) : undefined;
      const kill = !around && random() < 0.25;
      seen.sessions++;
      log.push(`session of ${writes.length} write(s)${around ? ' written around' : ''}${kill ? ', the daemon killed during it' : ''}`);
      const client = await heldNbdsh(t, box, image, [...writes.map((w) => `h.pwrite(bytes([${w.byte}]) * ${w.length}, ${w.offset})`), 'h.flush()', 'print("written", flush=True)'].join('\n'));
      for (const w of writes) apply(model, w);
      if (around) {
        ddWrite(image, around);
        apply(model, around);
        seen.writtenAround++;
      }
      if (kill) {
        daemon.server.kill('SIGKILL');
        await daemon.server.waitForExit(10_000);
        await client.end().catch(() => undefined);
        daemon = await startDaemon(t, { sandbox: box, password: false });
        seen.killed++;
      } else {
        await client.end();
      }
    } else if (roll < 0.45) {
      const w = randomWrite(random);
      log.push('a write outside bdsnap while nothing held the image');
      ddWrite(image, w);
      apply(model, w);
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
