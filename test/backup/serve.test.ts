/**
 * `bdsnap backup serve`: any backup as read-only NBD exports, read by real clients (nbdcopy,
 * nbdinfo): the bytes of the device at the backup's point, its holes reported as holes, writes
 * refused, and a damaged piece failing the read instead of returning other bytes. And the kernel:
 * an ext4 backup served this way mounts read-only through nbdfuse and a loop device, files exact.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import crypto from 'node:crypto';
import path from 'node:path';
import { LocalDirStore, Repository, backupDevices } from '../../src/backup/index.js';
import { makeImage, makeTempDir, sha256File } from '../../testkit/files.js';
import { run } from '../../testkit/process.js';
import { BDSNAP_MAIN, nbdUri } from '../../testkit/server.js';
import { needs } from '../../testkit/needs.js';
import { ext4WithFiles } from '../helpers/ext4.js';
import { attachKernel } from '../../testkit/kernel.js';
import { ServeSnapshotProvider } from '../../testkit/snapshot-provider.js';

const MiB = 1024 * 1024;
const PASSWORD = 'backup serve test';

/** `bdsnap backup serve` in the background, once it says it is serving; killed at the end of the test. */
async function startBackupServe(t: { after(fn: () => unknown): void }, args: string[]): Promise<ChildProcess> {
  const child = spawn(process.execPath, [BDSNAP_MAIN, 'backup', 'serve', ...args], { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, BDSNAP_REPO_PASSWORD: PASSWORD } });
  t.after(() => {
    if (child.exitCode === null) child.kill('SIGKILL');
  });
  let stderr = '';
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`backup serve did not start in 20 s: ${stderr}`)), 20_000);
    child.stderr!.on('data', (d: Buffer) => {
      stderr += d.toString();
      if (/serving \d+ export/.test(stderr)) {
        clearTimeout(timer);
        resolve();
      }
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`backup serve exited (${code}): ${stderr}`));
    });
  });
  return child;
}

test('backup serve: exact bytes of the backup, holes as holes, read-only, damage refused', { timeout: 120_000 }, async (t) => {
  if (!needs(t, { tools: ['nbdcopy', 'nbdinfo'] })) return;
  const dir = makeTempDir(t, 'bdsnap-backup-serve-');
  const repoDir = path.join(dir, 'repo');
  const image = path.join(dir, 'disk.img');
  makeImage(image, 8 * MiB, 'mixed', 3);
  await Repository.init(new LocalDirStore(repoDir), { password: PASSWORD });
  const repo = await Repository.open(new LocalDirStore(repoDir), { password: () => PASSWORD });
  const provider = new ServeSnapshotProvider(dir);
  const first = await backupDevices(repo, provider, [image]);
  const atFirst = await sha256File(image);
  provider.write(image, 4096, Buffer.alloc(8192, 7));
  await backupDevices(repo, provider, [image]);
  assert.notEqual(await sha256File(image), atFirst);

  const socket = path.join(dir, 'b.sock');
  const server = await startBackupServe(t, ['--repo', repoDir, first.id, '--socket', socket]);
  const uri = nbdUri(socket, image);
  // Served as a backup reads: prune is refused meanwhile, so no pack goes from under a reader.
  await assert.rejects(repo.prune(), (e: unknown) => {
    assert.match((e as Error).message, /is being served .*prune once 'bdsnap backup serve' has stopped/);
    return true;
  });
  const copy = path.join(dir, 'copy.img');
  await run('nbdcopy', ['--', uri, copy], { timeoutMs: 30_000 });
  assert.equal(await sha256File(copy), atFirst, 'the export is the device at the first backup');

  const info = JSON.parse((await run('nbdinfo', ['--json', uri], { timeoutMs: 30_000 })).stdout) as { exports: Array<{ 'is_read_only': boolean; 'export-size': number }> };
  assert.equal(info.exports[0]!.is_read_only, true);
  assert.equal(info.exports[0]!['export-size'], 8 * MiB);
  const map = (await run('nbdinfo', ['--map', uri], { timeoutMs: 30_000 })).stdout;
  assert.match(map, /hole,zero/, `the zero quarter of the image is a hole:\n${map}`);
  assert.match(map, /\bdata\b/);

  // A damaged pack: the reads that need it fail; nothing else is returned in their place.
  const packsDir = path.join(repoDir, 'packs');
  const packs = fs.readdirSync(packsDir).flatMap((hh) => fs.readdirSync(path.join(packsDir, hh)).map((f) => path.join(packsDir, hh, f)));
  assert.ok(packs.length > 0, 'the backup is stored in packs');
  for (const file of packs) {
    const bytes = fs.readFileSync(file);
    bytes[bytes.length >> 1]! ^= 0xff;
    fs.writeFileSync(file, bytes);
  }
  server.kill('SIGTERM');
  await new Promise((resolve) => server.once('exit', resolve));
  assert.equal(server.exitCode, 0, 'SIGTERM stops it cleanly');
  await startBackupServe(t, ['--repo', repoDir, first.id, '--socket', socket]);
  const damaged = await run('nbdcopy', ['--', uri, path.join(dir, 'copy2.img')], { allowFailure: true, timeoutMs: 30_000 });
  assert.notEqual(damaged.exitCode, 0, 'a copy through a damaged piece must fail');
});

test('backup serve through the kernel: an ext4 backup mounts read-only, its files exact', { timeout: 180_000 }, async (t) => {
  if (!needs(t, { root: true, paths: ['/dev/fuse'], tools: ['nbdfuse', 'losetup', 'fusermount3', 'mkfs.ext4', 'mount', 'umount'] })) return;
  const dir = makeTempDir(t, 'bdsnap-backup-serve-kernel-');
  const repoDir = path.join(dir, 'repo');
  const image = path.join(dir, 'fs.img');
  const files = new Map<string, Buffer>(Array.from({ length: 8 }, (_, k) => [k % 2 === 0 ? `f${k}.bin` : `sub/f${k}.bin`, crypto.randomBytes(k * 2 * MiB + 1234 * k + 1)] as const));
  ext4WithFiles(image, 96 * MiB, files);
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  await Repository.init(new LocalDirStore(repoDir), { password: PASSWORD });
  const repo = await Repository.open(new LocalDirStore(repoDir), { password: () => PASSWORD });
  const backup = await backupDevices(repo, new ServeSnapshotProvider(dir), [image]);
  // The device moves on; the export is the backup's point, not the device.
  await run('mount', ['-o', 'loop', image, mnt]);
  try {
    fs.writeFileSync(path.join(mnt, 'f0.bin'), Buffer.alloc(4096, 1));
    fs.writeFileSync(path.join(mnt, 'later.bin'), Buffer.alloc(4096, 2));
  } finally {
    await run('umount', [mnt]);
  }

  const socket = path.join(dir, 'b.sock');
  await startBackupServe(t, ['--repo', repoDir, backup.id, '--socket', socket]);
  const attached = await attachKernel(socket, image, { readOnly: true });
  try {
    await run('mount', ['-t', 'ext4', '-o', 'ro', attached.loopDevice, mnt]);
    try {
      for (const [name, data] of files) assert.deepEqual(fs.readFileSync(path.join(mnt, name)), data, `${name} through the kernel`);
      assert.equal(fs.existsSync(path.join(mnt, 'later.bin')), false, 'a file made after the backup is not in it');
    } finally {
      await run('umount', [mnt]);
    }
  } finally {
    await attached.detach();
  }
});
