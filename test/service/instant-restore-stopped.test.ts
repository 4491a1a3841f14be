/**
 * An instant restore recorded as running that cannot resume when the daemon starts (here: its
 * repository moved away, as a disk not mounted yet at boot) is stopped, never dropped: status
 * lists it with the reason and what to do, clients of the target are refused (the slots not
 * copied yet are neither the backup nor the old content), and the same `backup restore
 * --instant` resumes it once the repository is back, where its map says: the target ends as the
 * backup plus every write a client flushed. `--abandon` gives it up and removes its state (the
 * saved password too). A backup an instant restore copies from cannot be forgotten. All through
 * the real daemon and CLI.
 */

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import { TEST_PASSWORD, sandbox, startDaemon, type RunningDaemon, type Sandbox } from '../../testkit/daemon.js';
import { makeImage } from '../../testkit/files.js';
import { instantRestoreOfImage, restoreOf, waitForRestore } from '../helpers/instant-restore.js';
import { until } from '../helpers/poll.js';
import { passwdAndActivate } from './helpers.js';

const MiB = 1024 * 1024;
const IMAGE_BYTES = 8 * MiB;
const RATE = ['--restore-rate', '1M'];

interface Stopped {
  box: Sandbox;
  daemon: RunningDaemon;
  device: string;
  repoDir: string;
  id: string;
  /** What the device must end as: the backup, with the client's flushed write over it. */
  expected: Buffer;
  socketPath: string;
}

/**
 * A registered device backed up, then overwritten through the daemon; an instant restore of the
 * backup onto it, a client write of 1 MiB flushed through the restore; then `cause` (by default
 * the repository moved away) and the daemon killed and started again.
 */
async function stoppedRestore(t: TestContext, cause = (repoDir: string, _daemon: RunningDaemon): Promise<void> | void => fs.renameSync(repoDir, `${repoDir}.away`)): Promise<Stopped> {
  const box = sandbox(t);
  const device = makeImage(path.join(box.top, 'a.img'), IMAGE_BYTES, 'random', 21);
  let daemon = await startDaemon(t, { sandbox: box, password: false, extraArgs: RATE });
  passwdAndActivate(box, device, TEST_PASSWORD);
  const repoDir = path.join(box.top, 'repo');
  await daemon.cli(['backup', 'init', '--repo', repoDir]);
  const { id } = JSON.parse((await daemon.cli(['backup', 'create', device, '--repo', repoDir, '--json'])).stdout) as { id: string };
  const expected = fs.readFileSync(device);
  const socketPath = path.join(box.runDir, 'nbd.sock');

  const other = await NbdClient.connect({ socketPath, exportName: device });
  await other.write(randomBytes(IMAGE_BYTES), 0);
  await other.flush();
  await other.close();
  // The client's hold goes once the daemon has seen it leave.
  await until('the overwrite client to let go', async () => (await daemon.cli(['backup', 'restore', '--repo', repoDir, id, device, '--instant'], undefined, true)).exitCode === 0, 10_000, 100);

  const write = randomBytes(MiB);
  const client = await NbdClient.connect({ socketPath, exportName: device });
  await client.write(write, 6 * MiB);
  await client.flush();
  await client.close();
  write.copy(expected, 6 * MiB);
  const running = await restoreOf(daemon, device);
  assert.equal(running?.state, 'running');
  assert.ok(running.doneBytes < IMAGE_BYTES, `the copy is not done yet: ${JSON.stringify(running)}`);

  await cause(repoDir, daemon);
  daemon.server.kill('SIGKILL');
  await daemon.server.waitForExit(10_000);
  daemon = await startDaemon(t, { sandbox: box, password: false, extraArgs: RATE });
  return { box, daemon, device, repoDir, id, expected, socketPath };
}

test('an instant restore that cannot resume at start is listed as stopped, its target refused, and resumes where it was once asked', { timeout: 120_000 }, async (t) => {
  const { daemon, device, repoDir, id, expected, socketPath } = await stoppedRestore(t);
  const stopped = await restoreOf(daemon, device);
  assert.equal(stopped?.state, 'stopped', `status lists the restore: ${JSON.stringify(stopped)}`);
  assert.match(stopped.error ?? '', /not a backup repository/);
  assert.match(stopped.error ?? '', /resume it where it stopped with 'bdsnap backup restore --repo .* --instant'.*--abandon/);
  assert.match((await daemon.cli(['status'])).stdout, /restore of .*a\.img from backup .*: stopped, .*refused to every client/);

  // Neither the backup nor the old content: no client gets it.
  await assert.rejects(NbdClient.connect({ socketPath, exportName: device }), (err: Error) => {
    t.diagnostic(`a client of the target: ${err.message}`);
    return /refused/.test(err.message);
  });
  const snapshot = await daemon.cli(['snapshot', 'create', device], undefined, true);
  assert.notEqual(snapshot.exitCode, 0, 'a snapshot of the target is refused');
  assert.match(snapshot.stderr, /instant restore from backup .* that is stopped/);
  // Neither activation nor a mount sends the user elsewhere: both name the stopped restore and how to resume it.
  const activate = await daemon.cli(['activate', device, '--password-stdin'], `${TEST_PASSWORD}\n`);
  assert.match(activate.stdout, new RegExp(`is already active; an instant restore from backup ${id} into it is stopped, so it is refused to every mount and client, session or not, until that restore is resumed and complete, or given up: .*not a backup repository.*resume it where it stopped with 'bdsnap backup restore`), activate.stdout);
  const mnt = path.join(daemon.sandbox.top, 'mnt');
  fs.mkdirSync(mnt);
  const mount = await daemon.cli(['mount', device, mnt], undefined, true);
  assert.notEqual(mount.exitCode, 0, 'a mount of the target is refused');
  assert.match(mount.stderr, new RegExp(`part way through an instant restore from backup ${id} that is stopped, .*resume it where it stopped with 'bdsnap backup restore --repo .* --instant'.*--abandon`), mount.stderr);
  assert.doesNotMatch(mount.stderr, /not active|bdsnap activate/);

  // Asked again while the repository is still away: it stays stopped, saying why.
  const early = await daemon.cli(['backup', 'restore', '--repo', repoDir, id, device, '--instant'], undefined, true);
  assert.notEqual(early.exitCode, 0);
  assert.match(early.stderr, /stays stopped: .*not a backup repository/);
  assert.equal((await restoreOf(daemon, device))?.state, 'stopped');

  fs.renameSync(`${repoDir}.away`, repoDir);
  await daemon.cli(['backup', 'restore', '--repo', repoDir, id, device, '--instant']);
  await waitForRestore(daemon, device, 'the resumed restore to finish', (r) => r === undefined || r.state === 'complete', 60_000);
  assert.ok(fs.readFileSync(device).equals(expected), 'the target is the backup plus the write flushed before the stop');
  assert.deepEqual(fs.readdirSync(path.join(daemon.stateDir, 'restores')), [], 'nothing of it is kept, the password neither');
});

test('an instant restore stopped by a repository password changed meanwhile resumes with the new password given to the same command', { timeout: 120_000 }, async (t) => {
  let newPasswordFile = '';
  const { daemon, device, repoDir, id, expected } = await stoppedRestore(t, async (repoDir, daemon) => {
    newPasswordFile = path.join(daemon.sandbox.top, 'new-password');
    fs.writeFileSync(newPasswordFile, 'the new repository password\n', { mode: 0o600 });
    const keys = JSON.parse((await daemon.cli(['backup', 'key', 'list', '--repo', repoDir, '--json'])).stdout) as Array<{ id: string; current: boolean }>;
    await daemon.cli(['backup', 'key', 'add', '--repo', repoDir, '--new-password-file', newPasswordFile]);
    await daemon.cli(['backup', 'key', 'remove', '--repo', repoDir, '--password-file', newPasswordFile, keys.find((k) => k.current)!.id]);
  });
  const stopped = await restoreOf(daemon, device);
  assert.equal(stopped?.state, 'stopped', `status lists the restore: ${JSON.stringify(stopped)}`);
  assert.match(stopped.error ?? '', /wrong password/);
  await daemon.cli(['backup', 'restore', '--repo', repoDir, '--password-file', newPasswordFile, id, device, '--instant']);
  await waitForRestore(daemon, device, 'the resumed restore to finish', (r) => r === undefined || r.state === 'complete', 60_000);
  assert.ok(fs.readFileSync(device).equals(expected), 'the target is the backup plus the write flushed before the stop');
});

test('a stopped instant restore can be given up: its state and saved password go, and the target is said to be incomplete', { timeout: 120_000 }, async (t) => {
  const { daemon, device, repoDir, id } = await stoppedRestore(t);
  assert.equal((await restoreOf(daemon, device))?.state, 'stopped');
  const other = await daemon.cli(['backup', 'restore', '--repo', repoDir, 'another-id', device, '--instant'], undefined, true);
  assert.notEqual(other.exitCode, 0, 'another restore onto the target is refused');
  assert.match(other.stderr, /stopped instant restore of device .* of backup .*, not the one asked for/);
  const abandoned = await daemon.cli(['backup', 'restore', '--repo', repoDir, id, device, '--instant', '--abandon']);
  assert.match(abandoned.stdout, /gave up the instant restore of .*a\.img: .* is left incomplete: .*it is a copy of neither/);
  assert.equal(await restoreOf(daemon, device), undefined);
  assert.deepEqual(fs.readdirSync(path.join(daemon.stateDir, 'restores')), [], 'its map and saved password are gone');
});

test('backup forget of a backup an instant restore is copying from is refused, saying so', { timeout: 60_000 }, async (t) => {
  const { daemon, repoDir, id } = await instantRestoreOfImage(t, { rate: '1M', imageBytes: 16 * MiB, seed: 22 });
  const forget = await daemon.cli(['backup', 'forget', '--repo', repoDir, id], undefined, true);
  assert.notEqual(forget.exitCode, 0, `forget is refused: ${forget.stdout}`);
  assert.match(forget.stderr, new RegExp(`backup ${id} is being restored by an instant restore .*; forget it once that restore is complete`));
  const listed = JSON.parse((await daemon.cli(['backup', 'list', '--repo', repoDir, '--json'])).stdout) as Array<{ id: string }> | { backups: Array<{ id: string }> };
  const ids = (Array.isArray(listed) ? listed : listed.backups).map((b) => b.id);
  assert.ok(ids.includes(id), 'the backup is still there');
});
