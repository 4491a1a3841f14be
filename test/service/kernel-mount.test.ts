/**
 * `bdsnap mount` / `umount` with a real kernel ext4 on the daemon's NBD export (nbdfuse, a
 * loop device, mount): one session directory per mount cycle, none for an inactive device,
 * deactivation mid-mount, restore refused while mounted, and a full cycle restored to a
 * byte-identical image. Needs root, FUSE and loop devices.
 */

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { BdsnapClient } from '../../src/service/client.js';
import { TEST_PASSWORD, cli, ok, sandbox, startDaemon, type Sandbox } from '../../testkit/daemon.js';
import { makeImage, sha256File } from '../../testkit/files.js';
import { mkfsExt4, mountPoint, unmountAll } from '../helpers/ext4.js';
import { cleanupOf } from '../../testkit/cleanup.js';
import { needs } from '../../testkit/needs.js';
import { isMounted } from '../../testkit/kernel.js';
import { runSync } from '../../testkit/process.js';
import { passwdAndActivate, restoreOnlySession, sessionDirs } from './helpers.js';

const IMAGE_MIB = 32;



/** An ext4 image with a few files; the mount point; and a cleanup that never leaves a mount behind. */
function ext4Fixture(t: TestContext, box: Sandbox): { image: string; mnt: string } {
  const seed = path.join(box.top, 'seed');
  fs.mkdirSync(path.join(seed, 'docs'), { recursive: true });
  fs.writeFileSync(path.join(seed, 'docs', 'a.txt'), 'first version\n'.repeat(1000));
  const image = path.join(box.top, 'disk.img');
  makeImage(image, IMAGE_MIB << 20, 'zero');
  mkfsExt4(image, seed);
  return { image: fs.realpathSync(image), mnt: mountPoint(t, box, path.join(box.top, 'mnt')) };
}

function currentSession(box: Sandbox, device: string): string | null {
  const st = JSON.parse(ok(box, ['status', '--json'])) as { devices: Array<{ device: string; currentSession: string | null }> };
  return st.devices.find((d) => d.device === device)?.currentSession ?? null;
}

const KERNEL_NEEDS = { root: true, paths: ['/dev/fuse'], tools: ['nbdfuse', 'fusermount3', 'mkfs.ext4', 'mount', 'umount'] };

test('full ext4 cycle through bdsnap mount/umount, restore refused while mounted, then byte-identical', async (t) => {
  if (!needs(t, KERNEL_NEEDS)) return;
  const box = sandbox(t);
  await startDaemon(t, { sandbox: box, password: false });
  const { image, mnt } = ext4Fixture(t, box);
  passwdAndActivate(box, image, TEST_PASSWORD);
  const before = await sha256File(image);

  assert.match(ok(box, ['mount', image, mnt, '-t', 'ext4']), /snapshot session/);
  assert.ok(isMounted(mnt));
  const again = cli(box, ['mount', image, path.join(box.top, 'seed')]);
  assert.equal(again.status, 1, 'a device already mounted is refused');
  assert.match(again.stderr, /already mounted/);
  const mountOf = (): [string | null, boolean] => {
    const st = JSON.parse(ok(box, ['status', '--json'])) as { devices: Array<{ device: string; mountpoint: string | null; loopDevice: string | null }> };
    const d = st.devices.find((e) => e.device === image);
    return [d?.mountpoint ?? null, (d?.loopDevice ?? null) !== null];
  };
  assert.deepEqual(mountOf(), [mnt, true], 'status shows where the device is mounted, and through which block device');

  fs.writeFileSync(path.join(mnt, 'docs', 'a.txt'), 'second version\n'.repeat(5000));
  fs.writeFileSync(path.join(mnt, 'big.bin'), Buffer.alloc(3 << 20, 0x5a));
  fs.rmSync(path.join(mnt, 'docs', 'a.txt'));
  spawnSync('sync');
  const sessionDir = currentSession(box, image);
  assert.ok(sessionDir, 'the mount has a session directory');

  const refused = cli(box, ['restore', sessionDir]);
  assert.notEqual(refused.status, 0, 'restore is refused while mounted');
  assert.equal((await sha256File(image)) === before, false);

  const umount = JSON.parse(ok(box, ['umount', mnt, '--json'])) as { sessionDir: string | null };
  assert.equal(umount.sessionDir, sessionDir);
  assert.equal(isMounted(mnt), false);
  assert.deepEqual(mountOf(), [null, false], 'status no longer shows a mount');
  const list = JSON.parse(ok(box, ['list', image, '--json'])) as { sessions: Array<{ dir: string; state: string }> };
  assert.deepEqual(list.sessions.map((s) => [s.dir, s.state]), [[sessionDir, 'complete']], 'umount returns after the session is complete');
  assert.notEqual(await sha256File(image), before);

  const restored = cli(box, ['restore', sessionDir]);
  assert.equal(restored.status, 0, restored.stderr);
  assert.equal(await sha256File(image), before, 'the restored image is byte-identical to the pre-mount one');
});

test('one directory per mount cycle (two within a second), none after deactivation; deactivation mid-mount keeps the session', async (t) => {
  if (!needs(t, KERNEL_NEEDS)) return;
  const box = sandbox(t);
  await startDaemon(t, { sandbox: box, password: false });
  const { image, mnt } = ext4Fixture(t, box);
  ok(box, ['passwd', '--password-stdin'], `${TEST_PASSWORD}\n`);

  // Never activated: mounting it serves it with no session.
  assert.match(ok(box, ['mount', image, mnt]), /not active: no session/);
  fs.writeFileSync(path.join(mnt, 'x'), 'x');
  ok(box, ['umount', mnt]);
  assert.deepEqual(sessionDirs(box), [], 'no session for an inactive device');

  ok(box, ['activate', image, '--password-stdin'], `${TEST_PASSWORD}\n`);
  // Two mount cycles back to back (mounting ext4 writes its superblock, so each makes a
  // session). On a busy machine a pair can take longer than a second: up to three tries for a
  // pair whose mounts start within one second; every cycle must make its own directory.
  let pairs = 0;
  let gapMs = Infinity;
  while (pairs < 3 && gapMs >= 1000) {
    const known = sessionDirs(box).length;
    // Through the client library, so no process start-up sits between the two mounts.
    const client = await BdsnapClient.connect(box.runDir);
    try {
      for (let i = 0; i < 2; i++) {
        await client.mount(image, mnt);
        await client.umount(mnt);
      }
    } finally {
      client.close();
    }
    pairs++;
    const sessions = (JSON.parse(ok(box, ['list', image, '--json'])) as { sessions: Array<{ dir: string; mountTime: string }> }).sessions;
    assert.equal(sessions.length, known + 2, `one directory per mount cycle: ${sessions.map((s) => s.dir).join(', ')}`);
    assert.equal(new Set(sessions.map((s) => s.dir)).size, sessions.length);
    gapMs = Date.parse(sessions[sessions.length - 1]?.mountTime ?? '') - Date.parse(sessions[sessions.length - 2]?.mountTime ?? '');
  }
  assert.ok(gapMs < 1000, `two mounts within one second (closest pair: ${gapMs} ms apart)`);
  const cycles = sessionDirs(box).length;

  ok(box, ['mount', image, mnt]);
  fs.writeFileSync(path.join(mnt, 'before-deactivate'), 'a');
  spawnSync('sync');
  const deactivated = ok(box, ['deactivate', image, '--password-stdin'], `${TEST_PASSWORD}\n`);
  assert.match(deactivated, /carries on until unmount/);
  fs.writeFileSync(path.join(mnt, 'after-deactivate'), Buffer.alloc(1 << 20, 1));
  const umount = JSON.parse(ok(box, ['umount', mnt, '--json'])) as { sessionDir: string | null };
  assert.ok(umount.sessionDir, 'the session that was open at deactivation ran to the unmount');
  const three = sessionDirs(box);
  assert.equal(three.length, cycles + 1);

  ok(box, ['mount', image, mnt]);
  fs.writeFileSync(path.join(mnt, 'inactive'), 'b');
  ok(box, ['umount', mnt]);
  assert.deepEqual(sessionDirs(box), three, 'no new directory after deactivation');
  const st = JSON.parse(ok(box, ['status', '--json'])) as { devices: Array<{ dirtyOutsideSession: boolean }> };
  assert.equal(st.devices[0]?.dirtyOutsideSession, true, 'the write outside a session is recorded');
});

test('SIGTERM while mounted: the daemon unmounts, closes the session complete and exits 0', async (t) => {
  if (!needs(t, KERNEL_NEEDS)) return;
  const box = sandbox(t);
  const daemon = await startDaemon(t, { sandbox: box, password: false });
  const { image, mnt } = ext4Fixture(t, box);
  passwdAndActivate(box, image, TEST_PASSWORD);
  const before = await sha256File(image);
  ok(box, ['mount', image, mnt, '-t', 'ext4']);
  fs.writeFileSync(path.join(mnt, 'new.txt'), 'written just before shutdown\n'.repeat(100));
  assert.equal((await daemon.server.stop()).exitCode, 0);
  assert.equal(isMounted(mnt), false, 'the filesystem was unmounted at shutdown');
  assert.equal(restoreOnlySession(box), 'complete');
  assert.equal(await sha256File(image), before);
});

test('the loop device of a mount does direct I/O, and what a file fsync returned for is already in the image', async (t) => {
  if (!needs(t, KERNEL_NEEDS)) return;
  const box = sandbox(t);
  await startDaemon(t, { sandbox: box, password: false });
  const { image, mnt } = ext4Fixture(t, box);
  passwdAndActivate(box, image, TEST_PASSWORD);
  const mounted = JSON.parse(ok(box, ['mount', image, mnt, '-t', 'ext4', '--json'])) as { loopDevice: string };
  // A buffered loop device over the FUSE file keeps a second page cache of the device.
  const dio = fs.readFileSync(`/sys/block/${path.basename(mounted.loopDevice)}/loop/dio`, 'utf8').trim();
  assert.equal(dio, '1', `${mounted.loopDevice} does direct I/O`);

  const marker = Buffer.alloc(256 << 10);
  for (let i = 0; i < marker.length; i += 32) marker.write(`bdsnap-fsync-marker-${String(i).padStart(10, '0')}`, i, 'latin1');
  const fd = fs.openSync(path.join(mnt, 'marker.bin'), 'w');
  try {
    fs.writeSync(fd, marker);
    fs.fsyncSync(fd);
    // Still mounted: nothing but the fsync can have sent the data down the route.
    const onImage = fs.readFileSync(image);
    assert.ok(onImage.includes(marker.subarray(0, 64 << 10)), 'the fsynced data reached the image through the daemon');
  } finally {
    fs.closeSync(fd);
  }
  ok(box, ['umount', mnt]);
});

test('a mount that fails leaves no session, no loop device and nothing attached', async (t) => {
  if (!needs(t, KERNEL_NEEDS)) return;
  const box = sandbox(t);
  await startDaemon(t, { sandbox: box, password: false });
  const { image, mnt } = ext4Fixture(t, box);
  passwdAndActivate(box, image, TEST_PASSWORD);
  const loopsBefore = runSync('losetup', ['-a']);
  const wrongType = cli(box, ['mount', image, mnt, '-t', 'vfat']);
  assert.equal(wrongType.status, 1);
  assert.equal(wrongType.stderr.trim().split('\n').length, 1, wrongType.stderr);
  assert.match(wrongType.stderr, /mount/);
  const noDir = cli(box, ['mount', image, path.join(box.top, 'missing')]);
  assert.equal(noDir.status, 1);
  assert.match(noDir.stderr, /does not exist/);
  const notMounted = cli(box, ['umount', mnt]);
  assert.equal(notMounted.status, 1);
  assert.match(notMounted.stderr, /nothing mounted/);
  assert.deepEqual(sessionDirs(box), []);
  assert.equal(runSync('losetup', ['-a']), loopsBefore, 'the loop device was detached');
  const st = JSON.parse(ok(box, ['status', '--json'])) as { devices: Array<{ attached: boolean }> };
  assert.equal(st.devices[0]?.attached, false);
  // And the device still mounts fine afterwards.
  ok(box, ['mount', image, mnt, '-t', 'ext4']);
  ok(box, ['umount', mnt]);
  assert.equal(sessionDirs(box).length, 1);
});

test('a mount point another user can change is refused: a link planted there does not put the filesystem over a directory of root\'s', async (t) => {
  if (!needs(t, { ...KERNEL_NEEDS, tools: [...KERNEL_NEEDS.tools, 'runuser'] })) return;
  const box = sandbox(t);
  await startDaemon(t, { sandbox: box, password: false });
  const { image } = ext4Fixture(t, box);
  fs.chmodSync(box.top, 0o711);
  // A root directory the link points at, and a directory of another user's (as a home is).
  const rootDir = path.join(box.top, 'root-only');
  fs.mkdirSync(rootDir, { mode: 0o700 });
  fs.writeFileSync(path.join(rootDir, 'config'), 'root\n');
  const theirs = path.join(box.top, 'theirs');
  fs.mkdirSync(theirs, { mode: 0o755 });
  runSync('chown', ['nobody', theirs]);
  const asNobody = (...args: string[]): void => { runSync('runuser', ['-u', 'nobody', '--', ...args]); };
  const linked = path.join(theirs, 'mnt');
  asNobody('ln', '-s', rootDir, linked);
  const own = path.join(theirs, 'own');
  asNobody('mkdir', own);
  cleanupOf(t).after(() => unmountAll(box, [linked, own, rootDir]));
  const loopsBefore = runSync('losetup', ['-a']);

  const throughLink = cli(box, ['mount', image, linked, '-t', 'ext4']);
  assert.equal(isMounted(rootDir), false, 'nothing is mounted over the directory the link points at');
  assert.equal(throughLink.status, 1, throughLink.stdout);
  assert.match(throughLink.stderr, /^bdsnap: refusing to mount on .*theirs\/mnt: another user could put a link to any directory in its place .*\(.*theirs belongs to uid \d+\)/);
  // Their own directory, which they could swap for such a link while it is being mounted.
  const intoTheirs = cli(box, ['mount', image, own, '-t', 'ext4']);
  assert.equal(isMounted(own), false);
  assert.equal(intoTheirs.status, 1, intoTheirs.stdout);
  assert.match(intoTheirs.stderr, /refusing to mount on .*theirs\/own/);
  assert.equal(runSync('losetup', ['-a']), loopsBefore, 'no loop device was attached');
  assert.deepEqual(fs.readdirSync(rootDir), ['config']);
});

test('daemon killed with SIGKILL while mounted: the restarted daemon cleans the dead mount up, recovers the session, restore is exact', async (t) => {
  if (!needs(t, KERNEL_NEEDS)) return;
  const box = sandbox(t);
  const daemon = await startDaemon(t, { sandbox: box, password: false });
  const { image, mnt } = ext4Fixture(t, box);
  passwdAndActivate(box, image, TEST_PASSWORD);
  const before = await sha256File(image);
  const mountedOn = JSON.parse(ok(box, ['mount', image, mnt, '-t', 'ext4', '--json'])) as { loopDevice: string };
  fs.writeFileSync(path.join(mnt, 'data.bin'), Buffer.alloc(2 << 20, 0x33));
  spawnSync('sync', ['-f', path.join(mnt, 'data.bin')]);

  daemon.server.kill('SIGKILL');
  await daemon.server.stop();
  const restarted = await startDaemon(t, { sandbox: box, password: false });
  assert.equal(isMounted(mnt), false, 'the dead mount is gone');
  assert.ok(!runSync('losetup', ['-a']).includes(`${mountedOn.loopDevice}:`), 'its loop device is detached');
  assert.ok(restarted.logLines().some((l) => l.event === 'stale-mount-cleaned'));
  const list = JSON.parse(ok(box, ['list', image, '--json'])) as { sessions: Array<{ dir: string; state: string }> };
  assert.deepEqual(list.sessions.map((s) => s.state), ['interrupted']);
  assert.equal((await restarted.server.stop()).exitCode, 0);
  const restored = cli(box, ['restore', list.sessions[0]?.dir as string]);
  assert.equal(restored.status, 0, restored.stderr);
  assert.equal(await sha256File(image), before, 'the pre-mount image comes back byte for byte');
});
