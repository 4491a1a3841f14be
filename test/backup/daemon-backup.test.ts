/**
 * `bdsnap backup create` against the real daemon: a kernel ext4 mounted through bdsnap and
 * kept busy between backups gets a full backup, then incrementals that read only what the
 * change map says changed; each restored backup equals the image of a snapshot taken at the
 * same point and passes e2fsck. Two devices backed up together restore to a consistent pair.
 * The snapshot a backup takes is always destroyed. Needs root, FUSE and loop devices.
 */

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { ok, sandbox, startDaemon } from '../../testkit/daemon.js';
import { backupCreate, busyExt4Backups, noSnapshotsLeft } from './daemon-cycles.js';
import { makeImage } from '../../testkit/files.js';
import { ORDERED_WRITER_SALTS } from '../service/fixtures/ordered-writer.js';
import { highestOrderedWrite, startOrderedWriter } from '../service/helpers.js';

test('busy ext4 through bdsnap: full, then incremental backups that restore exactly and pass e2fsck', { timeout: 400_000 }, async (t: TestContext) => {
  await busyExt4Backups(t, (box) => path.join(box.top, 'repo'));
});

test('two devices in one backup restore to a consistent pair', { timeout: 180_000 }, async (t: TestContext) => {
  const box = sandbox(t);
  // Small blocks, many of them: the writer must not run out before the last backup.
  const WRITE_BYTES = 512;
  const BYTES = 64 << 20;
  const a = makeImage(path.join(box.top, 'a.img'), BYTES, 0);
  const b = makeImage(path.join(box.top, 'b.img'), BYTES, 0);
  await startDaemon(t, { sandbox: box, password: false });
  ok(box, ['snapshot', 'destroy', (JSON.parse(ok(box, ['snapshot', 'create', a, b, '--json'])) as { id: string }).id]);
  const repo = path.join(box.top, 'repo');
  ok(box, ['backup', 'init', '--repo', repo]);
  // In its own process, so it goes on writing while the CLI takes the backup's snapshot.
  const writer = await startOrderedWriter(t, box, a, b, WRITE_BYTES, BYTES / WRITE_BYTES);
  const takes: Array<{ id: string; before: number; after: number }> = [];
  for (let i = 0; i < 5; i++) {
    const before = await writer.go(50);
    const id = backupCreate(box, repo, [a, b]).id;
    const after = await writer.pause();
    assert.ok(after > before, `backup ${i}: the writer went on writing while it was taken (${before}, then ${after})`);
    takes.push({ id, before, after });
  }
  await writer.stop();
  for (const { id, before, after } of takes) {
    const ra = path.join(box.top, 'ra.img');
    const rb = path.join(box.top, 'rb.img');
    ok(box, ['backup', 'restore', '--repo', repo, id, a, '--output', ra]);
    ok(box, ['backup', 'restore', '--repo', repo, id, b, '--output', rb]);
    const ha = highestOrderedWrite(fs.readFileSync(ra), WRITE_BYTES, ORDERED_WRITER_SALTS.a);
    const hb = highestOrderedWrite(fs.readFileSync(rb), WRITE_BYTES, ORDERED_WRITER_SALTS.b);
    fs.rmSync(ra);
    fs.rmSync(rb);
    const shown = `acknowledged ${before} before, ${after} after; A up to ${ha}, B up to ${hb}`;
    assert.ok(ha === hb || ha === hb + 1, `backup ${id}: not one point in time (${shown})`);
    assert.ok(hb >= before, `backup ${id}: a pair acknowledged before the backup is missing (${shown})`);
    assert.ok(ha <= after + 1, `backup ${id}: holds writes issued after the backup (${shown})`);
  }
  ok(box, ['backup', 'verify', '--repo', repo]);
  noSnapshotsLeft(box);
});
