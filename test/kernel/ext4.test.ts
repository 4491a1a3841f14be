/**
 * A real kernel ext4 on an export: nbdfuse + loop device over the NBD server, mkfs, files
 * written and deleted, e2fsck clean, remount and read back. Then the image file itself,
 * with the server gone, must hold the same clean filesystem: every block went through NBD.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { CleanupStack } from '../../testkit/cleanup.js';
import { fillRandom, makeImage, makeTempDir, sha256, sha256File } from '../../testkit/files.js';
import { attachKernel, mountDevice } from '../../testkit/kernel.js';
import { run } from '../../testkit/process.js';
import { needs } from '../../testkit/needs.js';
import { startServer } from '../../testkit/server.js';

const IMAGE_BYTES = 64 << 20;

interface FileSpec {
  name: string;
  sizeBytes: number;
  seed: number;
}

const FILES: FileSpec[] = [
  { name: 'small.txt', sizeBytes: 13, seed: 1 },
  { name: 'one-block.bin', sizeBytes: 4096, seed: 2 },
  { name: 'odd-size.bin', sizeBytes: 100_003, seed: 3 },
  { name: 'big.bin', sizeBytes: 8 << 20, seed: 4 },
  { name: 'sub/dir/nested.bin', sizeBytes: 70_000, seed: 5 },
  { name: 'doomed-1.bin', sizeBytes: 2 << 20, seed: 6 },
  { name: 'doomed-2.bin', sizeBytes: 5000, seed: 7 },
];
const DELETED = new Set(['doomed-1.bin', 'doomed-2.bin']);

function content(spec: FileSpec): Buffer {
  const data = Buffer.alloc(spec.sizeBytes);
  fillRandom(data, spec.seed * 7919);
  return data;
}

test('kernel ext4 through nbdfuse and a loop device: write, delete, fsck, remount, read back', { timeout: 300_000 }, async (t) => {
  if (!needs(t, { root: true, paths: ['/dev/fuse'], tools: ['nbdfuse', 'losetup', 'fusermount3', 'mkfs.ext4', 'e2fsck', 'mount', 'umount'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup, 'bdsnap-ext4-');
  const image = path.join(dir, 'ext4.img');
  makeImage(image, IMAGE_BYTES, 'zero');
  const server = await startServer(cleanup, { images: [image] });
  const mountPoint = path.join(dir, 'mnt');
  fs.mkdirSync(mountPoint);

  const attachment = await attachKernel(server.socketPath, server.exportNames[0]);
  cleanup.after(() => attachment.detach());
  const loop = attachment.loopDevice;
  assert.equal(fs.statSync(attachment.fuseFile).size, IMAGE_BYTES, 'the FUSE file has the export size');

  await run('mkfs.ext4', ['-q', '-F', '-b', '4096', '-L', 'bdsnap-test', loop]);

  // First mount: write everything, check, delete some, sync.
  let unmount = await mountDevice(loop, mountPoint);
  cleanup.after(() => unmount());
  const expected = new Map<string, string>();
  for (const spec of FILES) {
    const target = path.join(mountPoint, spec.name);
    fs.mkdirSync(path.dirname(target), { recursive: true });
    const data = content(spec);
    fs.writeFileSync(target, data);
    expected.set(spec.name, sha256(data));
  }
  // Overwrite part of a file in place so the filesystem rewrites blocks it already has.
  const patch = Buffer.alloc(10_000, 0x5a);
  const bigPath = path.join(mountPoint, 'big.bin');
  const fd = fs.openSync(bigPath, 'r+');
  fs.writeSync(fd, patch, 0, patch.length, 1_234_567);
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  const bigSpec = FILES.find((f) => f.name === 'big.bin') as FileSpec;
  const bigData = content(bigSpec);
  patch.copy(bigData, 1_234_567);
  expected.set('big.bin', sha256(bigData));

  for (const [name, digest] of expected) assert.equal(await sha256File(path.join(mountPoint, name)), digest, `${name} reads back on the first mount`);
  for (const name of DELETED) {
    fs.rmSync(path.join(mountPoint, name));
    expected.delete(name);
  }
  await run('sync', []);
  await unmount();

  // A forced full check, read-only: exit 0 means no problem at all.
  const fsck = await run('e2fsck', ['-fn', loop], { allowFailure: true });
  assert.equal(fsck.exitCode, 0, `e2fsck -fn on ${loop} is clean:\n${fsck.stdout}\n${fsck.stderr}`);

  // Remount: the files come back from the export, not from the first mount's cache.
  await run('sh', ['-c', 'echo 3 > /proc/sys/vm/drop_caches']);
  unmount = await mountDevice(loop, mountPoint);
  cleanup.after(() => unmount());
  for (const [name, digest] of expected) assert.equal(await sha256File(path.join(mountPoint, name)), digest, `${name} reads back after remount`);
  for (const name of DELETED) assert.equal(fs.existsSync(path.join(mountPoint, name)), false, `${name} stays deleted`);
  const names = fs.readdirSync(mountPoint).sort();
  assert.deepEqual(names, ['big.bin', 'lost+found', 'odd-size.bin', 'one-block.bin', 'small.txt', 'sub']);
  await unmount();

  await attachment.detach();
  const stopped = await server.stop();
  assert.equal(stopped.killed, false, `the server stopped on SIGTERM:\n${server.stderr()}`);

  // The image itself now holds the filesystem: check it without any server in between.
  const direct = await run('e2fsck', ['-fn', image], { allowFailure: true });
  assert.equal(direct.exitCode, 0, `e2fsck -fn on the image file is clean:\n${direct.stdout}\n${direct.stderr}`);
  const listing = await run('debugfs', ['-R', 'ls -l /', image]);
  assert.match(listing.stdout, /big\.bin/);
  assert.doesNotMatch(listing.stdout, /doomed-1\.bin/);
  const dumped = path.join(dir, 'odd-size.out');
  await run('debugfs', ['-R', `dump /odd-size.bin ${dumped}`, image]);
  assert.equal(await sha256File(dumped), expected.get('odd-size.bin'), 'the image file holds the bytes written through the kernel');
});
