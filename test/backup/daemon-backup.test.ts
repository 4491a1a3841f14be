/**
 * `bdsnap backup create` against the real daemon: a kernel ext4 mounted through bdsnap and
 * kept busy between backups gets a full backup, then incrementals that read only what the
 * change map says changed; each restored backup equals the image of a snapshot taken at the
 * same point and passes e2fsck. Two devices backed up together restore to a consistent pair.
 * The snapshot a backup takes is always destroyed. Needs root, FUSE and loop devices.
 */

import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { needs } from '../helpers/needs.js';
import { cli, daemonUri, ok, sandbox, startDaemon, type Sandbox } from '../helpers/daemon.js';
import { makeImage } from '../helpers/files.js';
import { isMounted } from '../helpers/kernel.js';
import { runSync } from '../helpers/process.js';
import { ORDERED_WRITER_SALTS } from '../service/fixtures/ordered-writer.js';
import { highestOrderedWrite, startOrderedWriter } from '../service/helpers.js';

interface Created {
  id: string;
  devices: Array<{ device: string; kind: 'full' | 'incremental'; why: string; readBytes: number; sizeBytes: number }>;
}

function backupCreate(box: Sandbox, repo: string, devices: string[], extra: string[] = []): Created {
  return JSON.parse(ok(box, ['backup', 'create', ...devices, '--repo', repo, '--json', ...extra])) as Created;
}

/** The device as a fresh snapshot shows it, copied out with nbdcopy (the snapshot is dropped). */
function referenceImage(box: Sandbox, device: string, file: string): void {
  // No freeze: freezing writes the superblock, which would move the device past the backup's point.
  const snap = JSON.parse(ok(box, ['snapshot', 'create', device, '--no-freeze', '--json'])) as { id: string };
  runSync('nbdcopy', [daemonUri(box, `${device}@${snap.id}`), file]);
  ok(box, ['snapshot', 'destroy', snap.id]);
}

function noSnapshotsLeft(box: Sandbox): void {
  const list = JSON.parse(ok(box, ['snapshot', 'list', '--json'])) as { snapshots: unknown[] };
  assert.deepEqual(list.snapshots, [], 'backup create destroyed its snapshot');
}

const KERNEL_NEEDS = { root: true, paths: ['/dev/fuse'], tools: ['nbdfuse', 'fusermount3', 'losetup', 'mkfs.ext4', 'e2fsck', 'fsfreeze', 'nbdcopy', 'mount', 'umount'] };

test('busy ext4 through bdsnap: full, then incremental backups that restore exactly and pass e2fsck', { timeout: 400_000 }, async (t: TestContext) => {
  if (!needs(t, KERNEL_NEEDS)) return;
  const box = sandbox(t);
  await startDaemon(t, { sandbox: box, password: false });
  const image = path.join(box.top, 'disk.img');
  makeImage(image, 96 << 20, 'zero');
  runSync('mkfs.ext4', ['-q', '-F', '-E', 'lazy_itable_init=0,lazy_journal_init=0', image]);
  const device = fs.realpathSync(image);
  const mnt = path.join(box.top, 'mnt');
  fs.mkdirSync(mnt);
  // The mount is taken down here, whatever happens in the body, while the daemon still runs.
  ok(box, ['mount', device, mnt, '-t', 'ext4', '-o', 'noatime']);
  try {
    await backupCycles(box, device, mnt);
  } finally {
    if (isMounted(mnt)) cli(box, ['umount', mnt]);
    if (isMounted(mnt)) spawnSync('umount', ['-l', mnt]);
  }
});

async function backupCycles(box: Sandbox, device: string, mnt: string): Promise<void> {
  const repo = path.join(box.top, 'repo');
  ok(box, ['backup', 'init', '--repo', repo]);

  /** A burst of file work in its own process, then quiet (sync) so a backup and a reference see one state. */
  let round = 0;
  const busy = async (): Promise<void> => {
    round++;
    const script = `set -e; d="$1/r$2"; mkdir -p "$d"; for i in $(seq 1 40); do head -c $((4096 * (i % 7 + 1))) /dev/urandom > "$d/f$i"; done; rm -f "$d/f3" "$d/f5"; sync`;
    await new Promise<void>((resolve, reject) => {
      const p = spawn('bash', ['-c', script, 'busy', mnt, String(round)], { stdio: 'ignore' });
      p.once('exit', (code) => (code === 0 ? resolve() : reject(new Error(`workload exited ${code}`))));
    });
  };

  const results: Array<{ created: Created; reference: string }> = [];
  for (let i = 0; i < 3; i++) {
    await busy();
    const created = backupCreate(box, repo, [device]);
    const reference = path.join(box.top, `reference-${i}.img`);
    referenceImage(box, device, reference);
    results.push({ created, reference });
    noSnapshotsLeft(box);
  }
  const [full, inc1, inc2] = results.map((r) => r.created.devices[0]!);
  assert.equal(full?.kind, 'full');
  assert.equal(inc1?.kind, 'incremental', `second backup: ${inc1?.why}`);
  assert.equal(inc2?.kind, 'incremental', `third backup: ${inc2?.why}`);
  // The full backup reads what the image holds (its holes are skipped); an incremental reads
  // the pieces around the changed blocks only.
  assert.ok((full?.readBytes ?? Infinity) < (full?.sizeBytes ?? 0) / 2, `the full backup read ${full?.readBytes} bytes of a sparse ${full?.sizeBytes}`);
  assert.ok((inc1?.readBytes ?? Infinity) < (full?.sizeBytes ?? 0) / 8, `the incremental read ${inc1?.readBytes} bytes of ${full?.sizeBytes}`);

  for (const [i, r] of results.entries()) {
    const out = path.join(box.top, `restored-${i}.img`);
    ok(box, ['backup', 'restore', '--repo', repo, r.created.id, device, '--output', out]);
    const got = fs.readFileSync(out);
    const want = fs.readFileSync(r.reference);
    // The primary superblock (bytes 1024-2047) differs by design: the backup's freeze clears
    // ext4's needs_recovery flag for the image and the thaw sets it again on the device.
    got.fill(0, 1024, 2048);
    want.fill(0, 1024, 2048);
    const differing: number[] = [];
    for (let at = 0; at < want.length; at += 4096) if (!got.subarray(at, at + 4096).equals(want.subarray(at, at + 4096))) differing.push(at / 4096);
    assert.deepEqual(differing, [], `backup ${i} restores to the image of a snapshot taken at its point (4 KiB blocks differ: ${differing.slice(0, 20).join(' ')}; ${got.length} vs ${want.length} bytes)`);
    const fsck = spawnSync('e2fsck', ['-fn', out], { encoding: 'utf8' });
    assert.equal(fsck.status, 0, `e2fsck -fn of restored backup ${i}:\n${fsck.stdout}${fsck.stderr}`);
  }
  const full2 = backupCreate(box, repo, [device], ['--full']);
  assert.equal(full2.devices[0]?.kind, 'full');
  assert.match(full2.devices[0]?.why ?? '', /full/);
  noSnapshotsLeft(box);
}

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
