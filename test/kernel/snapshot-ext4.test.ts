/**
 * Snapshots of a kernel ext4 that stays mounted and busy: the image taken with the freeze
 * passes `e2fsck -n` and holds exactly the files finished by the take; one taken with
 * --no-freeze mounts (its journal replays into the image, never into the device); and the
 * difference storage may not live on the device it protects. Needs root, FUSE, loop devices.
 */

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { needs } from '../../testkit/needs.js';
import { cli, daemonUri, ok, sandbox, startDaemon, type Sandbox } from '../../testkit/daemon.js';
import { checkFinishedFiles, highestFile, mkfsExt4, startFileWorkload, unmountAll } from '../helpers/ext4.js';
import { makeImage } from '../../testkit/files.js';
import { runSync } from '../../testkit/process.js';

const IMAGE_MIB = 64;
const KERNEL_NEEDS = { root: true, paths: ['/dev/fuse'], tools: ['nbdfuse', 'fusermount3', 'losetup', 'mkfs.ext4', 'e2fsck', 'fsfreeze', 'nbdcopy', 'mount', 'umount'] };

test('a busy ext4: the frozen image is clean and holds the files finished by the take; --no-freeze images replay their journal', { timeout: 300_000 }, async (t) => {
  if (!needs(t, KERNEL_NEEDS)) return;
  const box = sandbox(t);
  await startDaemon(t, { sandbox: box, password: false });
  const image = path.join(box.top, 'disk.img');
  makeImage(image, IMAGE_MIB << 20, 'zero');
  mkfsExt4(image);
  const device = fs.realpathSync(image);
  const mnt = path.join(box.top, 'mnt');
  const imnt = path.join(box.top, 'image-mnt');
  fs.mkdirSync(mnt);
  fs.mkdirSync(imnt);
  try {
    await busyFilesystem(box, device, mnt, imnt);
  } finally {
    unmountAll(box, [imnt, mnt]);
  }
});

async function busyFilesystem(box: Sandbox, device: string, mnt: string, imnt: string): Promise<void> {
  ok(box, ['mount', device, mnt, '-t', 'ext4']);
  fs.mkdirSync(path.join(mnt, 'w'));

  const workload = startFileWorkload(path.join(mnt, 'w'));
  try {
    await new Promise((r) => setTimeout(r, 700));
    await takeAndCheck(box, device, mnt, imnt, workload);
  } finally {
    await workload.stop();
  }
}

async function takeAndCheck(box: Sandbox, device: string, mnt: string, imnt: string, workload: { stop(): Promise<void> }): Promise<void> {

  // Storage on the very device being snapshotted is refused.
  const onDevice = cli(box, ['snapshot', 'create', device, '--storage', path.join(mnt, 'w')]);
  assert.notEqual(onDevice.status, 0);
  assert.match(onDevice.stderr, /is on .* itself/);

  const doneBefore = highestFile(path.join(mnt, 'w')) - 1;
  const snap = JSON.parse(ok(box, ['snapshot', 'create', device, '--json'])) as { id: string; frozen: string[]; stallMs: number };
  const startedAfter = highestFile(path.join(mnt, 'w'));
  assert.deepEqual(snap.frozen, [mnt], 'the filesystem was frozen around the take');
  const loose = JSON.parse(ok(box, ['snapshot', 'create', device, '--no-freeze', '--json'])) as { id: string; frozen: string[] };
  assert.deepEqual(loose.frozen, []);
  await new Promise((r) => setTimeout(r, 300));
  await workload.stop();

  // The frozen image, copied out by a standard tool, is a clean filesystem.
  const copy = path.join(box.top, 'frozen.img');
  runSync('nbdcopy', [daemonUri(box, `${device}@${snap.id}`), copy]);
  const fsck = spawnSync('e2fsck', ['-fn', copy], { encoding: 'utf8' });
  assert.equal(fsck.status, 0, `e2fsck -fn of the frozen image:\n${fsck.stdout}${fsck.stderr}`);

  // Mounted through bdsnap, it holds every file finished before the take, complete, and none started after.
  ok(box, ['mount', `${device}@${snap.id}`, imnt, '-t', 'ext4']);
  // The last file may have been cut by the take; every earlier one is whole.
  checkFinishedFiles(path.join(imnt, 'w'), doneBefore, startedAfter, 'the image');
  ok(box, ['umount', imnt]);

  // The --no-freeze image is writable: mounting it replays its journal into the image only.
  const deviceBefore = runSync('sha256sum', [device]);
  ok(box, ['umount', mnt]);
  const deviceIdle = runSync('sha256sum', [device]);
  ok(box, ['mount', `${device}@${loose.id}`, imnt, '-t', 'ext4']);
  assert.ok(fs.existsSync(path.join(imnt, 'w', 'f1')));
  ok(box, ['umount', imnt]);
  assert.equal(runSync('sha256sum', [device]), deviceIdle, 'mounting the image did not touch the device');
  assert.notEqual(deviceBefore, '', 'sha256sum ran');
  const looseCopy = path.join(box.top, 'loose.img');
  runSync('nbdcopy', [daemonUri(box, `${device}@${loose.id}`), looseCopy]);
  const fsck2 = spawnSync('e2fsck', ['-fn', looseCopy], { encoding: 'utf8' });
  assert.equal(fsck2.status, 0, `e2fsck -fn of the replayed image:\n${fsck2.stdout}${fsck2.stderr}`);
  ok(box, ['snapshot', 'destroy', snap.id]);
  ok(box, ['snapshot', 'destroy', loose.id]);
}
