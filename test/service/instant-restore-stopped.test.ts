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
import { BackupRestoreRecord } from '../../src/device/interrupted-restore.js';
import { TEST_PASSWORD, sandbox, startDaemon, type RunningDaemon, type Sandbox } from '../../testkit/daemon.js';
import { makeImage } from '../../testkit/files.js';
import { run } from '../../testkit/process.js';
import { BDSNAP_MAIN, launchServer } from '../../testkit/server.js';
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

test('bdsnap serve, without the daemon, refuses the target of an instant restore the daemon has not finished (it would resume over what was written), and serves it once the restore is complete', { timeout: 120_000 }, async (t) => {
  const { daemon, device, repoDir, id, expected } = await stoppedRestore(t);
  assert.equal((await restoreOf(daemon, device))?.state, 'stopped');
  await daemon.server.stop();
  const serveSocket = path.join(daemon.sandbox.top, 'serve.sock');
  const serveArgs = [BDSNAP_MAIN, 'serve', '--socket', serveSocket, '--state-dir', daemon.stateDir, device];
  const before = fs.readFileSync(device);
  const refused = await run(process.execPath, serveArgs, { allowFailure: true, timeoutMs: 30_000 });
  assert.equal(refused.exitCode, 1, refused.stderr);
  assert.match(refused.stderr, new RegExp(`^bdsnap: ${device} is the target of an instant restore from backup ${id} \\(started at [^)]+\\) that is not complete: it holds neither its old content nor the backup's, .*; start the daemon \\(state directory ${daemon.stateDir}\\), which resumes it .*, or give it up there with 'bdsnap backup restore --repo ${repoDir} ${id} ${device} --instant --abandon'$`, 'm'));
  assert.equal(fs.existsSync(serveSocket), false, 'nothing was served');
  assert.ok(fs.readFileSync(device).equals(before), 'the target is as the daemon left it');

  // The daemon resumes it as it starts, its repository back; complete, the target is an ordinary image again.
  fs.renameSync(`${repoDir}.away`, repoDir);
  const again = await startDaemon(t, { sandbox: daemon.sandbox, password: false });
  await waitForRestore(again, device, 'the resumed restore to finish', (r) => r === undefined || r.state === 'complete', 60_000);
  await again.server.stop();
  assert.ok(fs.readFileSync(device).equals(expected), 'the target is the backup plus the write flushed before the stop');
  const served = await launchServer(t, { kind: 'bdsnap', command: process.execPath, args: serveArgs, socketPath: serveSocket, exportNames: [device], readyPattern: /^bdsnap: serving /m });
  const client = await NbdClient.connect({ socketPath: serveSocket, exportName: device });
  const head = Buffer.alloc(MiB);
  await client.read(head, 6 * MiB);
  await client.close();
  assert.ok(head.equals(expected.subarray(6 * MiB, 7 * MiB)), 'served: the backup with the write flushed through the restore');
  await served.stop();
});

test('bdsnap serve, without the daemon, refuses an image a backup restore in place left half way, naming the command that finishes it; the daemon, whose instant restores share the directory, takes the journal for none of them', async (t) => {
  const box = sandbox(t);
  const device = makeImage(path.join(box.top, 'b.img'), IMAGE_BYTES, 'random', 22);
  // Where root's journals and the daemon's instant restores both are by default (/var/lib/bdsnap/restores).
  fs.mkdirSync(box.stateDir, { recursive: true, mode: 0o700 });
  const restoreDir = path.join(box.stateDir, 'restores');
  const env = { ...process.env, BDSNAP_RESTORE_DIR: restoreDir };
  // What a restore in place killed after its first write leaves: its journal, by the target's identity.
  const st = fs.statSync(device);
  const saved = process.env.BDSNAP_RESTORE_DIR;
  process.env.BDSNAP_RESTORE_DIR = restoreDir;
  try {
    await BackupRestoreRecord.begin({ kind: 'file', dev: st.dev, ino: st.ino, rdev: 0 }, { backup: 'b1', command: `bdsnap backup restore --repo R b1 ${device}`, target: device });
  } finally {
    if (saved === undefined) delete process.env.BDSNAP_RESTORE_DIR;
    else process.env.BDSNAP_RESTORE_DIR = saved;
  }
  const r = await run(process.execPath, [BDSNAP_MAIN, 'serve', '--socket', path.join(box.top, 's.sock'), '--state-dir', box.stateDir, device], { allowFailure: true, timeoutMs: 30_000, env });
  assert.equal(r.exitCode, 1, r.stderr);
  assert.match(r.stderr, new RegExp(`^bdsnap: ${device} is half way through a restore of backup b1 \\(started at [^)]+, interrupted\\); finish it first: bdsnap backup restore --repo R b1 ${device}$`, 'm'));
  const daemon = await startDaemon(t, { sandbox: box, password: false });
  const events = (await daemon.cli(['events', '--json'])).stdout;
  assert.doesNotMatch(events, /restore-failed/, 'the journal is not taken for an instant restore that failed');
  assert.deepEqual(fs.readdirSync(restoreDir).filter((n) => n.startsWith('file-')).length, 1, 'the journal stays');
});
