/**
 * SIGTERM while a `bdsnap mount` is kept busy (a process with its cwd in it): the unmount
 * fails, so the daemon must flush the filesystem while it still serves it, exit within a bound
 * saying what it left behind (never hang, never exit 0 with a filesystem still on the device),
 * leave the session for the next start to recover (never 'complete'), and lose nothing: the
 * file written just before the signal is in the image afterwards. Real daemon, real kernel
 * ext4 through nbdfuse and a loop device, a real `sleep` holding the mount.
 */

import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { cleanUpStaleMount, readMountRecords } from '../../src/service/mount.js';
import { cleanupOf } from '../../testkit/cleanup.js';
import { ok, sandbox, startDaemon } from '../../testkit/daemon.js';
import { makeImage } from '../../testkit/files.js';
import { isMounted } from '../../testkit/kernel.js';
import { needs } from '../../testkit/needs.js';
import { runSync } from '../../testkit/process.js';

const IMAGE_BYTES = 32 << 20;
/** Well inside the daemon's own shutdown deadline, well past its unmount retries and flush. */
const EXIT_BOUND_MS = 60_000;

test('SIGTERM with a busy bdsnap mount: flushed, exits non-zero naming it, session left for recovery, no data lost', { timeout: 180_000 }, async (t: TestContext) => {
  if (!needs(t, { root: true, paths: ['/dev/fuse'], tools: ['nbdfuse', 'losetup', 'fusermount3', 'mkfs.ext4', 'mount', 'umount', 'sleep'] })) return;
  const box = sandbox(t);
  const image = fs.realpathSync(makeImage(path.join(box.top, 'fs.img'), IMAGE_BYTES, 'zero'));
  runSync('mkfs.ext4', ['-q', '-F', '-E', 'lazy_itable_init=0,lazy_journal_init=0', image]);
  const mnt = path.join(box.top, 'mnt');
  fs.mkdirSync(mnt);
  const daemon = await startDaemon(t, { sandbox: box, activate: [image] });
  ok(box, ['mount', image, mnt, '-t', 'ext4']);
  // Whatever the daemon left (a build that exits without unmounting): its loop device and FUSE mount.
  cleanupOf(t).after(async () => {
    for (const m of await readMountRecords(path.join(box.runDir, 'mounts.json')).catch(() => [])) await cleanUpStaleMount(m);
  });
  cleanupOf(t).after(() => {
    if (isMounted(mnt)) spawnSync('umount', ['-l', mnt]);
  });
  const sleeper = spawn('sleep', ['600'], { cwd: mnt, stdio: 'ignore' });
  cleanupOf(t).after(() => {
    sleeper.kill('SIGKILL');
  });

  const content = randomBytes(300_000).toString('hex');
  fs.writeFileSync(path.join(mnt, 'late.txt'), content);
  daemon.server.kill('SIGTERM');
  const exit = await daemon.server.waitForExit(EXIT_BOUND_MS);
  assert.ok(exit, `the daemon exits within ${EXIT_BOUND_MS} ms of SIGTERM`);
  assert.notEqual(exit.exitCode, 0, 'a filesystem left on the device is no clean stop');
  assert.match(daemon.server.stderr(), new RegExp(`${mnt.replace(/[.]/g, '\\.')} .*still in use and was left mounted`));
  const manifests = fs.readdirSync(box.snapshotRoot).map((d) => JSON.parse(fs.readFileSync(path.join(box.snapshotRoot, d, 'manifest.json'), 'utf8')) as { state: string });
  assert.deepEqual(manifests.map((m) => m.state), ['active'], 'the session is not marked complete under a mounted filesystem');

  // Let go of the mount; the next start takes down what was left and recovers the session.
  sleeper.kill('SIGKILL');
  await new Promise((resolve) => sleeper.once('exit', resolve));
  const again = await startDaemon(t, { sandbox: box, password: false });
  assert.equal(isMounted(mnt), false, 'the next start took the left mount down');
  const list = JSON.parse(ok(box, ['list', image, '--json'])) as { sessions: Array<{ state: string }> };
  assert.deepEqual(list.sessions.map((s) => s.state), ['interrupted']);
  await again.server.stop();

  // The file written just before SIGTERM reached the image (a copy is mounted: the kernel replays its journal).
  const copy = path.join(box.top, 'copy.img');
  fs.copyFileSync(image, copy);
  const check = path.join(box.top, 'check');
  fs.mkdirSync(check);
  runSync('mount', ['-o', 'loop', copy, check]);
  try {
    assert.equal(fs.readFileSync(path.join(check, 'late.txt'), 'utf8'), content);
  } finally {
    runSync('umount', [check]);
  }
});
