/**
 * What the commands say of a device while an instant restore writes it, through the real daemon
 * and CLI: each names the restore (its backup, how far it is) and what to do, wait for it or
 * resume it, instead of sending the user to activate, umount or snapshot destroy. A mount goes
 * through the restore and says that is why it has no session; activate says when mounts get
 * sessions; snapshot create, backup create and serve are refused naming the restore.
 */

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { TEST_PASSWORD, startDaemon, type RunningDaemon } from '../../testkit/daemon.js';
import { makeImage } from '../../testkit/files.js';
import { needs } from '../../testkit/needs.js';
import { ext4WithFiles } from '../helpers/ext4.js';
import { restoreOf } from '../helpers/instant-restore.js';

const MiB = 1024 * 1024;

interface Running {
  daemon: RunningDaemon;
  device: string;
  repoDir: string;
  id: string;
}

/**
 * An active device, backed up, then restored onto itself with --instant while the copy is held
 * to 1 MiB/s (so it runs for the whole test). `make` makes the device's image.
 */
async function restoreRunning(t: TestContext, make: (image: string) => void): Promise<Running> {
  const daemon = await startDaemon(t, { extraArgs: ['--restore-rate', '1M'] });
  const image = path.join(fs.realpathSync(daemon.sandbox.top), 'disk.img');
  make(image);
  await daemon.cli(['activate', image, '--password-stdin'], `${TEST_PASSWORD}\n`);
  const repoDir = path.join(daemon.sandbox.top, 'repo');
  await daemon.cli(['backup', 'init', '--repo', repoDir]);
  const { id } = JSON.parse((await daemon.cli(['backup', 'create', image, '--repo', repoDir, '--json'])).stdout) as { id: string };
  await daemon.cli(['backup', 'restore', '--repo', repoDir, id, image, '--instant']);
  assert.equal((await restoreOf(daemon, image))?.state, 'running');
  return { daemon, device: image, repoDir, id };
}

test('a device under a running instant restore: activate, snapshot create, backup create and serve name the restore and say to wait for it', { timeout: 120_000 }, async (t) => {
  const { daemon, device, repoDir, id } = await restoreRunning(t, (image) => makeImage(image, 24 * MiB, 'random', 31));
  const restore = new RegExp(`being restored by an instant restore from backup ${id} \\(running, [\\d.]+ \\w+ of 24 MiB copied.*\\).*: wait for it \\('bdsnap status' shows its progress`);

  // Activation does not promise sessions the restore will not give.
  const again = await daemon.cli(['activate', device, '--password-stdin'], `${TEST_PASSWORD}\n`);
  assert.match(again.stdout, new RegExp(`is already active; its mounts go through the instant restore from backup ${id} into it \\(running, .*\\), without a session, until that restore is complete`), again.stdout);
  await daemon.cli(['deactivate', device, '--password-stdin'], `${TEST_PASSWORD}\n`);
  const activated = await daemon.cli(['activate', device, '--password-stdin'], `${TEST_PASSWORD}\n`);
  assert.match(activated.stdout, new RegExp(`^activated .*disk\\.img; its mounts go through the instant restore from backup ${id}`), activated.stdout);
  assert.doesNotMatch(activated.stdout, /each mount from now on gets a snapshot session/);

  for (const args of [['snapshot', 'create', device], ['backup', 'create', device, '--repo', repoDir], ['serve', '--socket', path.join(daemon.sandbox.top, 'serve.sock'), device]]) {
    const refused = await daemon.cli(args, undefined, true);
    assert.notEqual(refused.exitCode, 0, `${args[0]} of a device under restore is refused`);
    assert.equal(refused.stderr.trim().split('\n').length, 1, `one line: ${refused.stderr}`);
    assert.match(refused.stderr, restore, `${args.join(' ')}: ${refused.stderr}`);
    assert.doesNotMatch(refused.stderr, /umount MOUNTPOINT|snapshot destroy|served as .* by the restore until then/, refused.stderr);
  }
  assert.equal((await restoreOf(daemon, device))?.state, 'running', 'the restore ran throughout');
});

test('a device mounted through its running instant restore says it has no session because of the restore, not that it is not active', { timeout: 120_000 }, async (t) => {
  if (!needs(t, { root: true, paths: ['/dev/fuse'], tools: ['nbdfuse', 'losetup', 'fusermount3', 'mkfs.ext4', 'mount', 'umount'] })) return;
  // fill.bin keeps the copy, held to 1 MiB/s, running for the whole test.
  const { daemon, device, id } = await restoreRunning(t, (image) => ext4WithFiles(image, 32 * MiB, new Map([['fill.bin', randomBytes(20 * MiB)]])));
  const mnt = path.join(daemon.sandbox.top, 'mnt');
  fs.mkdirSync(mnt);
  const mounted = await daemon.cli(['mount', device, mnt]);
  try {
    assert.match(mounted.stdout, new RegExp(`^mounted .*disk\\.img on .*mnt \\(\\S+; no session: the mount goes through the instant restore from backup ${id} \\(running, .*\\), which keeps no session; the first mount after that restore is complete gets one\\)`), mounted.stdout);
    assert.doesNotMatch(mounted.stdout, /not active/);
    // Until the restore lets go, the mount is the restore's: the refusal names the restore, not the mount alone.
    const refused = await daemon.cli(['snapshot', 'create', device], undefined, true);
    assert.notEqual(refused.exitCode, 0);
    assert.match(refused.stderr, new RegExp(`being restored by an instant restore from backup ${id} .*: wait for it .*, then bdsnap umount ${mnt}: the device is an ordinary device again when the restore's last client lets go`), refused.stderr);
  } finally {
    await daemon.cli(['umount', mnt]);
  }
});
