/**
 * A device is one device whatever names it, for an instant restore as for the registry: a
 * target named through a symbolic link is restored, shown and served under its canonical path,
 * and a second restore onto the same device through another name (the real path, a hard link)
 * is refused. All through the real daemon and CLI.
 */

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { createBackup, type BackupSource } from '../../src/backup/index.js';
import { NbdClient } from '../../src/nbd/client.js';
import { LocalDirStore } from '../../src/repository/object-store.js';
import { startDaemon } from '../../testkit/daemon.js';
import { needs } from '../../testkit/needs.js';
import { initRepo } from '../backup/helpers.js';
import { ext4WithFiles } from '../helpers/ext4.js';
import { restoresOf } from '../helpers/instant-restore.js';

const MiB = 1024 * 1024;

test('an instant restore onto a target named through a symbolic link is keyed by the device: one status row, served by any name, a second restore by another name refused', { timeout: 60_000 }, async (t) => {
  // Held to 1 MiB/s: the restore runs throughout.
  const daemon = await startDaemon(t, { password: false, extraArgs: ['--restore-rate', '1M'] });
  const top = fs.realpathSync(daemon.sandbox.top);
  fs.mkdirSync(path.join(top, 'real'));
  const real = path.join(top, 'real', 'target.img');
  fs.writeFileSync(real, Buffer.alloc(16 * MiB));
  const link = path.join(top, 'link.img');
  fs.symlinkSync(real, link);
  const hard = path.join(top, 'hard.img');
  fs.linkSync(real, hard);
  // A link in a directory anyone may write: whoever can change it could point the restore anywhere.
  fs.mkdirSync(path.join(top, 'open'));
  fs.chmodSync(path.join(top, 'open'), 0o777);
  const planted = path.join(top, 'open', 'target.img');
  fs.symlinkSync(real, planted);
  const content = randomBytes(16 * MiB);
  const repoDir = path.join(top, 'repo');
  const repo = await initRepo(new LocalDirStore(repoDir), { encryption: false });
  // One backup naming the device three ways, as backups made under other names would.
  const source = (device: string): BackupSource => ({ device, sizeBytes: content.length, changed: null, why: 'test', read: async (to, offset) => void content.copy(to, 0, offset, offset + to.length) });
  const { id } = await createBackup(repo, [source(link), source(real), source(hard), source(planted)]);

  const unsafe = await daemon.cli(['backup', 'restore', '--repo', repoDir, id, planted, '--instant'], undefined, true);
  assert.notEqual(unsafe.exitCode, 0, 'a link another user can change is not followed');
  assert.match(unsafe.stderr, /leads to .*target\.img through .*open\/target\.img, a link another user can replace \(.* is writable by other users .*\); give the real path/, unsafe.stderr);

  const started = await daemon.cli(['backup', 'restore', '--repo', repoDir, id, link, '--instant', '--json'], undefined, true);
  assert.equal(started.exitCode, 0, started.stderr);
  assert.equal((JSON.parse(started.stdout) as { target: string }).target, real, 'the restore is keyed by the canonical path');
  assert.deepEqual((await restoresOf(daemon)).map((r) => [r.target, r.state]), [[real, 'running']]);

  for (const other of [real, hard]) {
    const second = await daemon.cli(['backup', 'restore', '--repo', repoDir, id, other, '--instant'], undefined, true);
    assert.notEqual(second.exitCode, 0, `a second restore onto the same device as ${other} is refused`);
    assert.match(second.stderr, /already being restored/, `${other}: ${second.stderr}`);
  }
  for (const other of [real, hard]) {
    const refused = await daemon.cli(['snapshot', 'create', other], undefined, true);
    assert.notEqual(refused.exitCode, 0, `the device under restore is not snapshotted as ${other}`);
    assert.match(refused.stderr, /being restored|same file as the registered/, refused.stderr);
  }

  // Served by the restore under any name of the target.
  for (const name of [link, hard]) {
    const client = await NbdClient.connect({ socketPath: path.join(daemon.runDir, 'nbd.sock'), exportName: name });
    try {
      const got = Buffer.alloc(MiB);
      await client.read(got, 12 * MiB);
      assert.ok(got.equals(content.subarray(12 * MiB, 13 * MiB)), `${name} reads the backup`);
    } finally {
      await client.close();
    }
  }
  assert.equal((await restoresOf(daemon)).length, 1, 'still one restore');
});

test('an instant restore into a new file named through a linked directory is shown, served and guarded under the file\'s real path', { timeout: 60_000 }, async (t) => {
  const daemon = await startDaemon(t, { password: false, extraArgs: ['--restore-rate', '1M'] });
  const top = fs.realpathSync(daemon.sandbox.top);
  fs.mkdirSync(path.join(top, 'real'));
  fs.symlinkSync(path.join(top, 'real'), path.join(top, 'via'));
  const content = randomBytes(16 * MiB);
  const repoDir = path.join(top, 'repo');
  const repo = await initRepo(new LocalDirStore(repoDir), { encryption: false });
  const { id } = await createBackup(repo, [{ device: '/dev/a', sizeBytes: content.length, changed: null, why: 'test', read: async (to, offset) => void content.copy(to, 0, offset, offset + to.length) }]);
  const real = path.join(top, 'real', 'out.img');

  const started = await daemon.cli(['backup', 'restore', '--repo', repoDir, id, '/dev/a', '--output', path.join(top, 'via', 'out.img'), '--instant', '--json'], undefined, true);
  assert.equal(started.exitCode, 0, started.stderr);
  assert.deepEqual((await restoresOf(daemon)).map((r) => [r.target, r.state]), [[real, 'running']], 'status names the file by its real path');
  const refused = await daemon.cli(['snapshot', 'create', real], undefined, true);
  assert.notEqual(refused.exitCode, 0, 'the file under restore is not taken up by its real path');
  assert.match(refused.stderr, /being restored/, refused.stderr);
  const client = await NbdClient.connect({ socketPath: path.join(daemon.runDir, 'nbd.sock'), exportName: real });
  try {
    const got = Buffer.alloc(MiB);
    await client.read(got, 12 * MiB);
    assert.ok(got.equals(content.subarray(12 * MiB, 13 * MiB)), 'the real path reads the backup');
  } finally {
    await client.close();
  }
});

test('an instant restore into a file that already exists is refused, and the file is left exactly as it was', { timeout: 60_000 }, async (t) => {
  const daemon = await startDaemon(t, { password: false });
  const top = fs.realpathSync(daemon.sandbox.top);
  const content = randomBytes(4 * MiB);
  const repoDir = path.join(top, 'repo');
  const repo = await initRepo(new LocalDirStore(repoDir), { encryption: false });
  const { id } = await createBackup(repo, [{ device: '/dev/a', sizeBytes: content.length, changed: null, why: 'test', read: async (to, offset) => void content.copy(to, 0, offset, offset + to.length) }]);
  const precious = path.join(top, 'precious.img');
  const kept = randomBytes(2 * MiB);
  fs.writeFileSync(precious, kept, { mode: 0o600 });

  const refused = await daemon.cli(['backup', 'restore', '--repo', repoDir, id, '/dev/a', '--output', precious, '--instant'], undefined, true);
  assert.notEqual(refused.exitCode, 0, 'an existing --output is refused');
  assert.match(refused.stderr, /precious\.img exists; only a new file is made here, and that one was left as it was/, refused.stderr);
  assert.ok(fs.readFileSync(precious).equals(kept), 'the existing file is untouched (it was emptied before the refusal)');
  assert.deepEqual(await restoresOf(daemon), [], 'no restore was started');
});

test('a file under instant restore is mounted through the restore by another name of it, and status shows that mount on its row', { timeout: 120_000 }, async (t) => {
  if (!needs(t, { root: true, paths: ['/dev/fuse'], tools: ['nbdfuse', 'losetup', 'fusermount3', 'mkfs.ext4', 'mount', 'umount'] })) return;
  const daemon = await startDaemon(t, { password: false, extraArgs: ['--restore-rate', '1M'] });
  const top = fs.realpathSync(daemon.sandbox.top);
  fs.mkdirSync(path.join(top, 'real'));
  fs.symlinkSync(path.join(top, 'real'), path.join(top, 'via'));
  // fill.bin keeps the copy, held to 1 MiB/s, running for the whole test (zero pieces cost it nothing).
  const files = new Map([['a.bin', randomBytes(3 * MiB + 5)], ['fill.bin', randomBytes(20 * MiB)]]);
  const fsImage = path.join(top, 'fs.img');
  ext4WithFiles(fsImage, 32 * MiB, files);
  const content = fs.readFileSync(fsImage);
  const repoDir = path.join(top, 'repo');
  const repo = await initRepo(new LocalDirStore(repoDir), { encryption: false });
  const { id } = await createBackup(repo, [{ device: '/dev/a', sizeBytes: content.length, changed: null, why: 'test', read: async (to, offset) => void content.copy(to, 0, offset, offset + to.length) }]);
  const real = path.join(top, 'real', 'out.img');
  await daemon.cli(['backup', 'restore', '--repo', repoDir, id, '/dev/a', '--output', path.join(top, 'via', 'out.img'), '--instant']);
  const mnt = path.join(top, 'mnt');
  fs.mkdirSync(mnt);
  const mounted = await daemon.cli(['mount', real, mnt], undefined, true);
  assert.equal(mounted.exitCode, 0, `the real path of the target mounts through its restore: ${mounted.stderr}`);
  try {
    assert.deepEqual(fs.readFileSync(path.join(mnt, 'a.bin')), files.get('a.bin'));
    assert.deepEqual((await restoresOf(daemon)).map((r) => [r.target, r.state, r.mountpoint]), [[real, 'running', mnt]]);
  } finally {
    await daemon.cli(['umount', mnt]);
  }
});
