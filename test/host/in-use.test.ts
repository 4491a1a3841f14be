/**
 * checkNotInUse decides by identity, with real loop devices: a loop device is matched by the
 * file the kernel holds (a hard link of it, even after the name it was attached by is
 * deleted); without the kernel's answer a deleted name is "cannot tell". A block device is
 * refused when a partition of it is mounted, when it or a partition has holders (crafted
 * sysfs: device-mapper may be missing here), and when it is open exclusively although no mount
 * shows in this mount table (a mount in another namespace). Needs root and losetup.
 */

import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';
import fs from 'node:fs';
import path from 'node:path';
import { formatDevT } from '../../src/host/dev-t.js';
import { checkNotInUse } from '../../src/host/in-use.js';
import { DisconnectedLoopError, listLoopDevices, loopBackingIdentity } from '../../src/host/loop-devices.js';
import { cleanupOf } from '../../testkit/cleanup.js';
import { makeImage, makeTempDir } from '../../testkit/files.js';
import { isMounted } from '../../testkit/kernel.js';
import { needs } from '../../testkit/needs.js';
import { runSync } from '../../testkit/process.js';
import { isError } from '../snapshot/helpers.js';

/** `losetup -f --show FILE`, detached after the test. */
function losetup(t: TestContext, file: string): string {
  const loop = runSync('losetup', ['-f', '--show', file]).trim();
  cleanupOf(t).after(() => {
    if (fs.existsSync(`/sys/block/${path.basename(loop)}/loop`)) spawnSync('losetup', ['-d', loop]);
  });
  return loop;
}

test('checkNotInUse: a loop device is matched by the file the kernel holds, not by the name sysfs shows', async (t) => {
  if (!needs(t, { root: true, tools: ['losetup'] })) return;
  const dir = makeTempDir(t, 'bdsnap-in-use-');
  const attached = makeImage(path.join(dir, 'attached.img'), 1 << 20, 'zero');
  const other = path.join(dir, 'other name.img');
  fs.linkSync(attached, other);
  const unrelated = makeImage(path.join(dir, 'unrelated.img'), 1 << 20, 'zero');
  const loop = losetup(t, attached);
  const noLoopNodes = path.join(dir, 'dev');
  fs.mkdirSync(noLoopNodes);

  await assert.rejects(checkNotInUse(other), isError('EBUSY', new RegExp(`${other} is the backing file of ${loop} \\(named ${attached} there\\); detach it first`)));
  await checkNotInUse(unrelated);

  // The name the loop device was attached by is gone; the file lives on as `other`.
  fs.rmSync(attached);
  await assert.rejects(checkNotInUse(other), isError('EBUSY', new RegExp(`backing file of ${loop} \\(named ${attached}, deleted there\\)`)));
  // Without the kernel's answer (no loop nodes to ask), a deleted name tells nothing: refused, whatever the image.
  // The refusal names the first such loop device, which may be another test's running beside this one.
  await assert.rejects(checkNotInUse(other, { dev: noLoopNodes }), isError('EIO', /cannot tell whether .* is in use.*\/dev\/loop\d+ .*was deleted/));
  await assert.rejects(checkNotInUse(unrelated, { dev: noLoopNodes }), isError('EIO', /cannot tell/));
  await checkNotInUse(unrelated);
});

test('checkNotInUse: a block device with a mounted partition, or held by a stacked device, is refused', async (t) => {
  if (!needs(t, { root: true, tools: ['losetup'] })) return;
  const dir = makeTempDir(t, 'bdsnap-in-use-');
  const loop = losetup(t, makeImage(path.join(dir, 'disk.img'), 1 << 20, 'zero'));
  const majorMinor = formatDevT(fs.statSync(loop).rdev);
  // A crafted /sys/dev/block for the real node: one partition, no holders yet.
  const sysDevBlock = path.join(dir, 'sys-dev-block');
  const self = path.join(sysDevBlock, majorMinor);
  const part = path.join(self, `${path.basename(loop)}p1`);
  fs.mkdirSync(path.join(self, 'holders'), { recursive: true });
  fs.mkdirSync(path.join(part, 'holders'), { recursive: true });
  fs.writeFileSync(path.join(part, 'partition'), '1\n');
  fs.writeFileSync(path.join(part, 'dev'), '259:99\n');
  const mountinfo = path.join(dir, 'mountinfo');
  fs.writeFileSync(mountinfo, '22 1 8:1 / / rw - ext4 /dev/sda1 rw\n');
  const host = { sysDevBlock, mountinfo };
  await checkNotInUse(loop, host);

  fs.appendFileSync(mountinfo, '40 22 259:99 / /mnt/part rw - ext4 /dev/other-name rw\n');
  await assert.rejects(checkNotInUse(loop, host), isError('EBUSY', new RegExp(`${loop} is mounted at /mnt/part; unmount it first`)));
  fs.writeFileSync(mountinfo, '22 1 8:1 / / rw - ext4 /dev/sda1 rw\n');

  fs.mkdirSync(path.join(part, 'holders', 'md0'));
  await assert.rejects(checkNotInUse(loop, host), isError('EBUSY', /its partition loop\d+p1 is held by md0 .*remove that first/));
  fs.mkdirSync(path.join(self, 'holders', 'dm-3'));
  await assert.rejects(checkNotInUse(loop, host), isError('EBUSY', new RegExp(`${loop} is held by dm-3 \\(device-mapper, md or another stacked device\\)`)));

  await assert.rejects(checkNotInUse(loop, { ...host, sysDevBlock: path.join(dir, 'missing') }), isError('EIO', /cannot tell whether/));
});

test('checkNotInUse: a block device open exclusively is refused even when this mount table does not show the mount', async (t) => {
  if (!needs(t, { root: true, tools: ['losetup', 'mkfs.ext4', 'mount', 'umount'] })) return;
  const dir = makeTempDir(t, 'bdsnap-in-use-');
  const image = makeImage(path.join(dir, 'disk.img'), 8 << 20, 'zero');
  runSync('mkfs.ext4', ['-q', '-F', image]);
  const loop = losetup(t, image);
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  runSync('mount', [loop, mnt]);
  cleanupOf(t).after(() => {
    if (isMounted(mnt)) spawnSync('umount', ['-l', mnt]);
  });
  // As another mount namespace would see it: a table without that mount.
  const mountinfo = path.join(dir, 'mountinfo');
  fs.writeFileSync(mountinfo, '22 1 8:1 / / rw - ext4 /dev/sda1 rw\n');
  await assert.rejects(checkNotInUse(loop, { mountinfo }), isError('EBUSY', new RegExp(`${loop} is open exclusively by another user`)));
  await checkNotInUse(loop, { mountinfo }, { exclusiveProbe: false });
  runSync('umount', [mnt]);
  await checkNotInUse(loop);
});

test('checkNotInUse: a loop device left over a FUSE file whose server died does not hold up every image file; a block device is still "cannot tell", with what to do', { timeout: 60_000 }, async (t) => {
  if (!needs(t, { root: true, paths: ['/dev/fuse'], tools: ['losetup', 'nbdkit', 'nbdfuse', 'fusermount3'] })) return;
  const dir = makeTempDir(t, 'bdsnap-in-use-fuse-');
  const socket = path.join(dir, 'nbd.sock');
  const fuseDir = path.join(dir, 'fuse');
  fs.mkdirSync(fuseDir);
  // Each writes its pid file once ready (nbdkit listening, nbdfuse connected and mounted):
  // nbdfuse started before nbdkit listens would exit at once.
  const nbdkitPid = path.join(dir, 'nbdkit.pid');
  const nbdkit = spawn('nbdkit', ['--foreground', '--exit-with-parent', '-P', nbdkitPid, '-U', socket, 'memory', '1M'], { stdio: 'ignore' });
  cleanupOf(t).after(() => void nbdkit.kill('SIGKILL'));
  await untilPidFile(nbdkitPid, nbdkit, 'nbdkit');
  const nbdfusePid = path.join(dir, 'nbdfuse.pid');
  const nbdfuse = spawn('nbdfuse', ['-P', nbdfusePid, path.join(fuseDir, 'disk'), `nbd+unix:///?socket=${socket}`], { stdio: ['ignore', 'ignore', 'pipe'] });
  cleanupOf(t).after(() => {
    nbdfuse.kill('SIGKILL');
    spawnSync('fusermount3', ['-u', '-z', fuseDir]);
  });
  await untilPidFile(nbdfusePid, nbdfuse, 'nbdfuse');
  const stale = losetup(t, path.join(fuseDir, 'disk'));
  const exited = new Promise((resolve) => nbdfuse.once('exit', resolve));
  nbdfuse.kill('SIGKILL');
  await exited;
  assert.equal(spawnSync('losetup', ['--list', '--noheadings', '-O', 'NAME', stale]).status, 0, 'the loop device is still attached');
  // The kernel answers for the open file from its cache of the attributes for about a second.
  const loop = (await listLoopDevices()).find((l) => l.devicePath === stale)!;
  for (let i = 0; ; i++) {
    const answer = await loopBackingIdentity(loop).then((b) => `answered ${JSON.stringify(b, (_k, v: unknown) => (typeof v === 'bigint' ? String(v) : v))}`, (err: unknown) => err);
    if (answer instanceof DisconnectedLoopError) break;
    if (i > 100) throw new Error(`the kernel still tells the file of ${stale} 10 s after nbdfuse was killed: ${String(answer)}`);
    await sleep(100);
  }

  const image = makeImage(path.join(dir, 'image.img'), 1 << 20, 'zero');
  await checkNotInUse(image);
  const device = losetup(t, makeImage(path.join(dir, 'backing.img'), 1 << 20, 'zero'));
  await assert.rejects(checkNotInUse(device), isError('EIO', new RegExp(`cannot tell whether ${device} is in use.*ENOTCONN.*if ${stale} is left over .*losetup -d ${stale}`)));
});

/** Wait (10 s at most) for `child` to write its pid file; fails at once, with its stderr, if it exits first. */
async function untilPidFile(pidFile: string, child: ChildProcess, name: string): Promise<void> {
  let stderr = '';
  child.stderr?.on('data', (b: Buffer) => (stderr += b.toString('utf8')));
  for (let i = 0; !(fs.existsSync(pidFile) && fs.readFileSync(pidFile, 'utf8').trim() !== ''); i++) {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`${name} exited (${child.exitCode ?? child.signalCode}) before it was ready: ${stderr}`);
    if (i > 200) throw new Error(`${name} was not ready within 10 s: ${stderr}`);
    await sleep(50);
  }
}

/** A process (sh, then sleep) holding `file` open on descriptor 3 with `redirect` ('<>' to write, '<' to read); killed after the test. */
async function holder(t: TestContext, file: string, redirect: '<>' | '<'): Promise<number> {
  const child = spawn('sh', ['-c', `exec 3${redirect}"$1"; echo ready; exec sleep 60`, 'sh', file], { stdio: ['ignore', 'pipe', 'ignore'] });
  cleanupOf(t).after(() => void child.kill('SIGKILL'));
  await new Promise<void>((resolve, reject) => {
    child.stdout!.once('data', () => resolve());
    child.once('exit', (code) => reject(new Error(`the holder of ${file} exited (${code})`)));
  });
  return child.pid!;
}

test('checkNotInUse: an image or a block device another process has open for writing is refused, naming it; one open for reading is not', { timeout: 60_000 }, async (t) => {
  if (!needs(t, { root: true, tools: ['losetup'] })) return;
  const dir = makeTempDir(t, 'bdsnap-in-use-writer-');
  const image = makeImage(path.join(dir, 'image.img'), 1 << 20, 'zero');
  const alias = path.join(dir, 'alias.img');
  fs.linkSync(image, alias);
  const reader = await holder(t, alias, '<');
  await checkNotInUse(image);
  const writer = await holder(t, alias, '<>');
  await assert.rejects(checkNotInUse(image), isError('EBUSY', new RegExp(`^${image} is open for writing by pid ${writer} \\(sleep\\); stop that process first`)));
  assert.ok(reader > 0);

  const device = losetup(t, makeImage(path.join(dir, 'backing.img'), 1 << 20, 'zero'));
  await checkNotInUse(device);
  const deviceWriter = await holder(t, device, '<>');
  await assert.rejects(checkNotInUse(device), isError('EBUSY', new RegExp(`^${device} is open for writing by pid ${deviceWriter} \\(sleep\\)`)));
});
