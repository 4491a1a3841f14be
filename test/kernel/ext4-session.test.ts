/**
 * The product's promise with a real kernel filesystem: an ext4 image, activated in the
 * daemon, is attached through nbdfuse + loop (one session), files are written, changed and
 * deleted by the kernel, and `bdsnap restore` puts the image back bit for bit.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { CleanupStack } from '../../testkit/cleanup.js';
import { startDaemon } from '../../testkit/daemon.js';
import { fillRandom, makeImage, makeTempDir, sha256, sha256File } from '../../testkit/files.js';
import { attachKernel, mountDevice } from '../../testkit/kernel.js';
import { run } from '../../testkit/process.js';
import { needs } from '../../testkit/needs.js';

const IMAGE_BYTES = 64 << 20;

test('kernel ext4 changes made during a session are undone exactly by restore', { timeout: 300_000 }, async (t) => {
  if (!needs(t, { root: true, paths: ['/dev/fuse'], tools: ['nbdfuse', 'losetup', 'fusermount3', 'mkfs.ext4', 'e2fsck', 'debugfs', 'mount', 'umount'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup, 'bdsnap-ext4s-');
  const image = path.join(dir, 'fs.img');
  makeImage(image, IMAGE_BYTES, 'zero');
  // The filesystem and its first files are made offline, before protection starts.
  await run('mkfs.ext4', ['-q', '-F', '-b', '4096', image]);
  const keep = Buffer.alloc(300_000);
  fillRandom(keep, 11);
  const keepFile = path.join(dir, 'keep.bin');
  fs.writeFileSync(keepFile, keep);
  await run('debugfs', ['-w', '-R', `write ${keepFile} keep.bin`, image]);
  const original = await sha256File(image);

  const daemon = await startDaemon(cleanup, { activate: [image] });
  const device = daemon.server.exportNames[0] as string;
  const attachment = await attachKernel(daemon.server.socketPath, device);
  cleanup.after(() => attachment.detach());
  const mountPoint = path.join(dir, 'mnt');
  fs.mkdirSync(mountPoint);
  const unmount = await mountDevice(attachment.loopDevice, mountPoint);
  cleanup.after(() => unmount());

  assert.equal(await sha256File(path.join(mountPoint, 'keep.bin')), sha256(keep), 'the file made offline is there');
  const fresh = Buffer.alloc(5 << 20);
  fillRandom(fresh, 12);
  fs.writeFileSync(path.join(mountPoint, 'fresh.bin'), fresh);
  const fd = fs.openSync(path.join(mountPoint, 'keep.bin'), 'r+');
  fs.writeSync(fd, Buffer.alloc(5000, 0x42), 0, 5000, 100_000);
  fs.closeSync(fd);
  fs.mkdirSync(path.join(mountPoint, 'a/b/c'), { recursive: true });
  for (let i = 0; i < 50; i++) fs.writeFileSync(path.join(mountPoint, 'a/b/c', `f${i}`), `file ${i}\n`.repeat(i + 1));
  await run('sync', []);
  await unmount();
  await attachment.detach();

  assert.notEqual(await sha256File(image), original, 'the kernel changed the image');
  const fsck = await run('e2fsck', ['-fn', image], { allowFailure: true });
  assert.equal(fsck.exitCode, 0, `the changed filesystem is clean:\n${fsck.stdout}${fsck.stderr}`);

  // The session closes once the last NBD connection is gone.
  let sessions: { dir: string; state: string }[] = [];
  const deadlineMs = Date.now() + 15_000;
  while (Date.now() < deadlineMs) {
    sessions = (JSON.parse((await daemon.cli(['list', device, '--json'])).stdout) as { sessions: typeof sessions }).sessions;
    if (sessions.length > 0 && sessions.every((s) => s.state === 'complete')) break;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  assert.equal(sessions.length, 1, `one session for one attach: ${JSON.stringify(sessions)}`);
  assert.equal(sessions[0]?.state, 'complete');

  await daemon.cli(['restore', (sessions[0] as { dir: string }).dir]);
  assert.equal(await sha256File(image), original, 'restore gave back the image as it was before the mount');
  const listing = await run('debugfs', ['-R', 'ls /', image]);
  assert.doesNotMatch(listing.stdout, /fresh\.bin/);
});
