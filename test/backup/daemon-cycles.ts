/**
 * Backups of a busy kernel ext4 through the real daemon, restored and compared with the image
 * of a snapshot taken at the same point: shared by the local and S3 repository tests.
 */

import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import type { TestContext } from 'node:test';
import { needs } from '../../testkit/needs.js';
import { cli, daemonUri, ok, sandbox, startDaemon, type Sandbox } from '../../testkit/daemon.js';
import { makeImage } from '../../testkit/files.js';
import { isMounted } from '../../testkit/kernel.js';
import { runSync } from '../../testkit/process.js';

export interface Created {
  id: string;
  devices: Array<{ device: string; kind: 'full' | 'incremental'; why: string; readBytes: number; sizeBytes: number }>;
}

export function backupCreate(box: Sandbox, repo: string, devices: string[], extra: string[] = []): Created {
  return JSON.parse(ok(box, ['backup', 'create', ...devices, '--repo', repo, '--json', ...extra])) as Created;
}

/** The device as a fresh snapshot shows it, copied out with nbdcopy (the snapshot is dropped). */
export function referenceImage(box: Sandbox, device: string, file: string): void {
  // No freeze: freezing writes the superblock, which would move the device past the backup's point.
  const snap = JSON.parse(ok(box, ['snapshot', 'create', device, '--no-freeze', '--json'])) as { id: string };
  runSync('nbdcopy', [daemonUri(box, `${device}@${snap.id}`), file]);
  ok(box, ['snapshot', 'destroy', snap.id]);
}

export function noSnapshotsLeft(box: Sandbox): void {
  const list = JSON.parse(ok(box, ['snapshot', 'list', '--json'])) as { snapshots: unknown[] };
  assert.deepEqual(list.snapshots, [], 'backup create destroyed its snapshot');
}

export const KERNEL_NEEDS = { root: true, paths: ['/dev/fuse'], tools: ['nbdfuse', 'fusermount3', 'losetup', 'mkfs.ext4', 'e2fsck', 'fsfreeze', 'nbdcopy', 'mount', 'umount'] };

/** Backups of a busy ext4 into `repo`: a full, two incrementals, each restored and compared, then a forced full. */
export async function backupCycles(box: Sandbox, device: string, mnt: string, repo: string): Promise<void> {
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

/**
 * The busy-ext4 test, for any repository: `repoFor` gives the REPO in the sandbox; `env` is
 * added to the CLI's environment (S3 credentials).
 */
export async function busyExt4Backups(t: TestContext, repoFor: (box: Sandbox) => string, env: Record<string, string> = {}): Promise<void> {
  if (!needs(t, KERNEL_NEEDS)) return;
  const box = sandbox(t);
  Object.assign(box.env, env);
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
    await backupCycles(box, device, mnt, repoFor(box));
  } finally {
    if (isMounted(mnt)) cli(box, ['umount', mnt]);
    if (isMounted(mnt)) spawnSync('umount', ['-l', mnt]);
  }
}
