/**
 * `bdsnap mount` refuses a device that is in use outside bdsnap, by identity, through the real
 * kernel: an image mounted with `mount -o loop` (named as mounted, by a hard link, by a bind
 * mount), an image only attached with `losetup`, and a block device mounted or open O_EXCL by
 * another process (device-mapper holders are covered against a crafted sysfs in
 * test/host/in-use.test.ts: this kernel may lack device-mapper). The refusal leaves the outside mount untouched and nothing registered;
 * the loop devices bdsnap makes for its own mounts never trip the check. Needs root, FUSE and
 * loop devices.
 */

import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { cleanupOf } from '../../testkit/cleanup.js';
import { cli, ok, sandbox, startDaemon, type Sandbox } from '../../testkit/daemon.js';
import { makeImage } from '../../testkit/files.js';
import { isMounted } from '../../testkit/kernel.js';
import { needs } from '../../testkit/needs.js';
import { runSync } from '../../testkit/process.js';

const IMAGE_MIB = 16;
const KERNEL_NEEDS = { root: true, paths: ['/dev/fuse'], tools: ['nbdfuse', 'fusermount3', 'losetup', 'mkfs.ext4', 'mount', 'umount'] };

/** A fresh ext4 image holding `hello`, and an empty directory to mount on. */
function ext4Image(box: Sandbox, name: string): { image: string; mnt: string } {
  const image = path.join(box.top, `${name}.img`);
  makeImage(image, IMAGE_MIB << 20, 'zero');
  const seed = path.join(box.top, `${name}-seed`);
  fs.mkdirSync(seed);
  fs.writeFileSync(path.join(seed, 'hello'), `${name}\n`);
  runSync('mkfs.ext4', ['-q', '-F', '-d', seed, image]);
  const mnt = path.join(box.top, `${name}-mnt`);
  fs.mkdirSync(mnt);
  return { image: fs.realpathSync(image), mnt };
}

/** Mount outside bdsnap; unmounted (lazily if need be) after the test. */
function outsideMount(t: TestContext, args: string[], mnt: string): void {
  runSync('mount', [...args, mnt]);
  cleanupOf(t).after(() => {
    if (isMounted(mnt)) spawnSync('umount', [mnt]);
    if (isMounted(mnt)) spawnSync('umount', ['-l', mnt]);
  });
}

/** `losetup -f --show FILE`, detached after the test. */
function losetup(t: TestContext, file: string): string {
  const loop = runSync('losetup', ['-f', '--show', file]).trim();
  cleanupOf(t).after(() => {
    if (fs.existsSync(`/sys/block/${path.basename(loop)}/loop`)) spawnSync('losetup', ['-d', loop]);
  });
  return loop;
}

/** Unmount whatever bdsnap mounted on `mnt` once the test ends, while the daemon still runs. */
function bdsnapUnmountAfter(t: TestContext, box: Sandbox, mnt: string): void {
  cleanupOf(t).after(() => {
    if (isMounted(mnt)) cli(box, ['umount', mnt]);
    if (isMounted(mnt)) spawnSync('umount', ['-l', mnt]);
  });
}

/** A refusal: exit 1, one line on stderr matching `reason`. */
function refused(box: Sandbox, args: string[], reason: RegExp): void {
  const r = cli(box, args);
  assert.equal(r.status, 1, `bdsnap ${args.join(' ')} must be refused; stdout: ${r.stdout}`);
  assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  assert.match(r.stderr, reason);
}

function registered(box: Sandbox): string[] {
  return (JSON.parse(ok(box, ['status', '--json'])) as { devices: Array<{ device: string }> }).devices.map((d) => d.device);
}

test('an image mounted with mount -o loop is refused by its name, a hard link and a bind mount; the outside mount stays intact', async (t) => {
  if (!needs(t, KERNEL_NEEDS)) return;
  const box = sandbox(t);
  await startDaemon(t, { sandbox: box, password: false });
  const { image, mnt } = ext4Image(box, 'disk');
  outsideMount(t, ['-o', 'loop', image], mnt);
  const hardLink = path.join(box.top, 'hard-link.img');
  fs.linkSync(image, hardLink);
  const bindName = path.join(box.top, 'bind.img');
  fs.writeFileSync(bindName, '');
  outsideMount(t, ['--bind', image], bindName);

  const ours = path.join(box.top, 'ours');
  fs.mkdirSync(ours);
  bdsnapUnmountAfter(t, box, ours);
  for (const name of [image, hardLink, bindName]) {
    refused(box, ['mount', name, ours, '-t', 'ext4'], new RegExp(`${name} is the backing file of /dev/loop\\d+.*mounted at ${mnt}; unmount it first`));
    assert.equal(isMounted(ours), false);
  }
  assert.deepEqual(registered(box), [], 'a refused mount leaves nothing registered');
  assert.equal(fs.readFileSync(path.join(mnt, 'hello'), 'utf8'), 'disk\n', 'the outside mount still reads');
  fs.writeFileSync(path.join(mnt, 'still-writable'), 'yes');
});

test('an image attached with losetup only (not mounted) is refused, and mounts once detached', async (t) => {
  if (!needs(t, KERNEL_NEEDS)) return;
  const box = sandbox(t);
  await startDaemon(t, { sandbox: box, password: false });
  const { image, mnt } = ext4Image(box, 'disk');
  bdsnapUnmountAfter(t, box, mnt);
  const loop = losetup(t, image);
  refused(box, ['mount', image, mnt], new RegExp(`backing file of ${loop}; detach it first \\(losetup -d ${loop}\\)`));
  runSync('losetup', ['-d', loop]);
  ok(box, ['mount', image, mnt, '-t', 'ext4']);
  assert.equal(fs.readFileSync(path.join(mnt, 'hello'), 'utf8'), 'disk\n');
  ok(box, ['umount', mnt]);
});

test('the loop devices of bdsnap\'s own mounts do not trip the check: a second image and a snapshot image mount beside the first', async (t) => {
  if (!needs(t, KERNEL_NEEDS)) return;
  const box = sandbox(t);
  await startDaemon(t, { sandbox: box, password: false });
  const a = ext4Image(box, 'a');
  const b = ext4Image(box, 'b');
  const imnt = path.join(box.top, 'image-mnt');
  fs.mkdirSync(imnt);
  for (const m of [imnt, b.mnt, a.mnt]) bdsnapUnmountAfter(t, box, m);
  ok(box, ['mount', a.image, a.mnt, '-t', 'ext4']);
  ok(box, ['mount', b.image, b.mnt, '-t', 'ext4']);
  const snap = JSON.parse(ok(box, ['snapshot', 'create', a.image, '--json'])) as { id: string };
  ok(box, ['mount', `${a.image}@${snap.id}`, imnt, '-t', 'ext4']);
  assert.equal(fs.readFileSync(path.join(imnt, 'hello'), 'utf8'), 'a\n');
  // The device stays held by its snapshot after the unmount: mounting it again is still ours.
  ok(box, ['umount', a.mnt]);
  ok(box, ['mount', a.image, a.mnt, '-t', 'ext4']);
});

/** A process that holds `device` open with O_EXCL until killed (after the test at the latest). */
async function exclusiveHolder(t: TestContext, device: string): Promise<ChildProcess> {
  const code = `require('fs').openSync(${JSON.stringify(device)}, require('fs').constants.O_RDONLY | require('fs').constants.O_EXCL); console.log('held'); setInterval(() => {}, 1e6);`;
  const child = spawn(process.execPath, ['-e', code], { stdio: ['ignore', 'pipe', 'inherit'] });
  const exited = new Promise((resolve) => child.once('exit', resolve));
  cleanupOf(t).after(async () => {
    child.kill('SIGKILL');
    await exited;
  });
  const held = await new Promise<boolean>((resolve) => {
    child.stdout.on('data', (d: Buffer) => { if (d.toString().includes('held')) resolve(true); });
    child.once('exit', () => resolve(false));
  });
  assert.ok(held, `the holder could not open ${device} exclusively`);
  return child;
}

test('a block device mounted outside bdsnap, or open exclusively by another process, is refused', async (t) => {
  if (!needs(t, KERNEL_NEEDS)) return;
  const box = sandbox(t);
  await startDaemon(t, { sandbox: box, password: false });
  const { image, mnt } = ext4Image(box, 'disk');
  const loop = losetup(t, image);
  const ours = path.join(box.top, 'ours');
  fs.mkdirSync(ours);
  bdsnapUnmountAfter(t, box, ours);

  outsideMount(t, [loop], mnt);
  refused(box, ['mount', loop, ours], new RegExp(`${loop} is mounted at ${mnt}; unmount it first`));
  runSync('umount', [mnt]);

  const holder = await exclusiveHolder(t, loop);
  refused(box, ['mount', loop, ours], new RegExp(`${loop} is open exclusively by another user.*stop that first`));
  const gone = new Promise((resolve) => holder.once('exit', resolve));
  holder.kill('SIGKILL');
  await gone;

  ok(box, ['mount', loop, ours, '-t', 'ext4']);
  assert.equal(fs.readFileSync(path.join(ours, 'hello'), 'utf8'), 'disk\n');
  ok(box, ['umount', ours]);
});
