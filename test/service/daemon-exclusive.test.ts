/**
 * A second `bdsnap daemon` on a running one's directories, as real processes with real kernel
 * mounts: with the same run directory, or the same state directory, it must refuse before it
 * touches anything, naming the running daemon; a daemon with directories of its own but the
 * same snapshot root must leave the running daemon's live session alone. The first daemon's
 * mounts stay mounted, its session stays active, and after its umount the session restores
 * the image exactly.
 */

import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { BdsnapError } from '../../src/errors.js';
import { BdsnapClient } from '../../src/service/client.js';
import { claimDaemonDirs } from '../../src/service/daemon-lock.js';
import { BDSNAP_MAIN } from '../../testkit/bdsnap-cli.js';
import { cleanupOf } from '../../testkit/cleanup.js';
import { TEST_PASSWORD, cli, ok, sandbox, startDaemon, type Sandbox } from '../../testkit/daemon.js';
import { makeImage, makeTempDir, sha256File } from '../../testkit/files.js';
import { isMounted } from '../../testkit/kernel.js';
import { mkfsExt4, mountPoint } from '../helpers/ext4.js';
import { needs } from '../../testkit/needs.js';
import { run } from '../../testkit/process.js';
import { passwdAndActivate } from './helpers.js';

const KERNEL_NEEDS = { root: true, paths: ['/dev/fuse'], tools: ['nbdfuse', 'fusermount3', 'mkfs.ext4', 'mount', 'umount'] };

/** An ext4 image and its mount point, never left mounted. */
function ext4(t: TestContext, box: Sandbox, name: string): { image: string; mnt: string } {
  const image = path.join(box.top, `${name}.img`);
  makeImage(image, 32 << 20, 'zero');
  mkfsExt4(image);
  return { image: fs.realpathSync(image), mnt: mountPoint(t, box, path.join(box.top, `${name}-mnt`)) };
}

function escape(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

function manifestState(sessionDir: string): string {
  return (JSON.parse(fs.readFileSync(path.join(sessionDir, 'manifest.json'), 'utf8')) as { state: string }).state;
}

/** `bdsnap daemon` on these directories, expected to refuse: its exit and stderr (a daemon that starts is killed and reported). */
async function secondDaemon(dirs: { runDir: string; stateDir: string; snapshotRoot: string }): Promise<{ exitCode: number | null; stderr: string }> {
  const args = [BDSNAP_MAIN, 'daemon', '--run-dir', dirs.runDir, '--state-dir', dirs.stateDir, '--snapshot-root', dirs.snapshotRoot, '--log-level', 'warn'];
  const r = await run(process.execPath, args, { allowFailure: true, timeoutMs: 20_000 }).catch((err: unknown) => {
    throw new Error(`the second daemon did not refuse to start: ${(err as Error).message}`);
  });
  return { exitCode: r.exitCode, stderr: r.stderr };
}

test('a second daemon on the same run or state directory refuses, naming the first; one sharing only the snapshot root leaves its session alone', { timeout: 180_000 }, async (t) => {
  if (!needs(t, KERNEL_NEEDS)) return;
  const box = sandbox(t);
  const withSession = ext4(t, box, 'session');
  const busy = ext4(t, box, 'busy');
  const before = await sha256File(withSession.image);

  // A daemon with its own run and state directories and the same snapshot root, which knows the
  // image from an earlier run, so its start-up looks for that image's open sessions.
  const other: Sandbox = { ...box, runDir: path.join(box.top, 'run-other'), stateDir: path.join(box.top, 'state-other') };
  const otherDaemon = await startDaemon(t, { sandbox: other, password: false });
  const otherClient = await BdsnapClient.connect(other.runDir);
  try {
    await otherClient.register(withSession.image);
  } finally {
    otherClient.close();
  }
  await otherDaemon.server.stop();

  const first = await startDaemon(t, { sandbox: box, password: false });
  passwdAndActivate(box, withSession.image, TEST_PASSWORD);
  ok(box, ['mount', withSession.image, withSession.mnt, '-t', 'ext4']);
  ok(box, ['mount', busy.image, busy.mnt, '-t', 'ext4']);
  fs.writeFileSync(path.join(withSession.mnt, 'data.bin'), Buffer.alloc(2 << 20, 0x5a));
  fs.writeFileSync(path.join(busy.mnt, 'note.txt'), 'still here\n');
  spawnSync('sync');
  // A process sitting in the second mount: only a lazy unmount would take it away.
  const sitter = spawn('sleep', ['600'], { cwd: busy.mnt, stdio: 'ignore' });
  cleanupOf(t).after(() => sitter.kill('SIGKILL'));
  const status = JSON.parse(ok(box, ['status', '--json'])) as { devices: Array<{ device: string; currentSession: string | null }> };
  const sessionDir = status.devices.find((d) => d.device === withSession.image)?.currentSession;
  assert.ok(sessionDir, 'the mount has a session');
  assert.equal(manifestState(sessionDir), 'active');

  const stillIntact = (when: string): void => {
    assert.ok(isMounted(withSession.mnt), `${when}: the session's mount is still mounted`);
    assert.ok(isMounted(busy.mnt), `${when}: the busy mount is still mounted`);
    assert.equal(fs.readFileSync(path.join(busy.mnt, 'note.txt'), 'utf8'), 'still here\n', `${when}: the busy mount still serves`);
    assert.equal(manifestState(sessionDir), 'active', `${when}: the live session is still active`);
    assert.ok(first.server.running(), `${when}: the first daemon still runs`);
  };

  const holder = new RegExp(`pid ${first.server.pid}\\b.*run dir ${escape(box.runDir)}`);
  const sameRun = await secondDaemon(box);
  stillIntact('same run directory');
  assert.notEqual(sameRun.exitCode, 0, 'same run directory: refused');
  assert.match(sameRun.stderr, /is in use by another bdsnap daemon/);
  assert.match(sameRun.stderr, holder, `names the holder: ${sameRun.stderr}`);
  assert.match(sameRun.stderr, /stop that daemon first/);

  const sameState = await secondDaemon({ ...box, runDir: path.join(box.top, 'run-second') });
  stillIntact('same state directory');
  assert.notEqual(sameState.exitCode, 0, 'same state directory: refused');
  assert.match(sameState.stderr, new RegExp(`state directory ${escape(box.stateDir)} is in use by another bdsnap daemon`));
  assert.match(sameState.stderr, holder, `names the holder: ${sameState.stderr}`);

  const sameRunOnly = await secondDaemon({ ...box, stateDir: path.join(box.top, 'state-second') });
  stillIntact('same run directory, another state directory');
  assert.notEqual(sameRunOnly.exitCode, 0, 'same run directory, another state directory: refused');
  assert.match(sameRunOnly.stderr, new RegExp(`run directory ${escape(box.runDir)} is in use by another bdsnap daemon`));
  assert.match(sameRunOnly.stderr, holder, `names the holder: ${sameRunOnly.stderr}`);
  assert.match(sameRunOnly.stderr, /--run-dir/);

  // Directories of its own: it may run, but the session it finds 'active' is alive.
  const sharing = await startDaemon(t, { sandbox: other, password: false });
  const reported = (): boolean => sharing.logLines().some((l) => l.event === 'session-in-use' && l.sessionDir === sessionDir);
  for (const deadline = Date.now() + 5000; !reported() && Date.now() < deadline;) await new Promise((resolve) => setTimeout(resolve, 20));
  await sharing.server.stop();
  stillIntact('same snapshot root');
  assert.ok(reported(), `the live session is reported, not recovered: ${JSON.stringify(sharing.logLines())}`);

  fs.writeFileSync(path.join(withSession.mnt, 'after.bin'), Buffer.alloc(1 << 20, 0x33));
  sitter.kill('SIGKILL');
  ok(box, ['umount', busy.mnt]);
  ok(box, ['umount', withSession.mnt]);
  assert.equal(manifestState(sessionDir), 'complete');
  const restored = cli(box, ['restore', sessionDir]);
  assert.equal(restored.status, 0, restored.stderr);
  assert.equal(await sha256File(withSession.image), before, 'the session restores the image exactly');
});

test('a server answering on the run directory\'s socket without holding its lock is in the way too; a planted link is never the lock file', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-claim-');
  const dirs = { runDir: path.join(dir, 'run'), stateDir: path.join(dir, 'state'), snapshotRoot: path.join(dir, 'snap') };
  fs.mkdirSync(dirs.runDir, { mode: 0o700 });
  fs.mkdirSync(dirs.stateDir, { mode: 0o700 });
  const socket = path.join(dirs.runDir, 'nbd.sock');
  const server = net.createServer((c) => c.destroy());
  await new Promise<void>((resolve) => server.listen(socket, resolve));
  t.after(() => server.close());
  await assert.rejects(claimDaemonDirs(dirs, [socket]), (e: unknown) => e instanceof BdsnapError && e.code === 'EBUSY' && /nbd\.sock is served by another process/.test(e.message));
  // Refused means nothing held: once the server is gone, a daemon gets both locks.
  await new Promise((resolve) => server.close(resolve));
  const claim = await claimDaemonDirs(dirs, [socket]);
  await assert.rejects(claimDaemonDirs(dirs, []), (e: unknown) => e instanceof BdsnapError && e.code === 'EBUSY' && new RegExp(`pid ${process.pid}\\b`).test(e.message));
  claim.release();
  (await claimDaemonDirs(dirs, [])).release();

  const target = path.join(dir, 'target');
  fs.writeFileSync(target, 'keep me\n');
  fs.rmSync(path.join(dirs.stateDir, 'daemon.lock'));
  fs.symlinkSync(target, path.join(dirs.stateDir, 'daemon.lock'));
  await assert.rejects(claimDaemonDirs(dirs, []), (e: unknown) => e instanceof BdsnapError && e.code === 'EPERM' && /symbolic link/.test(e.message));
  assert.equal(fs.readFileSync(target, 'utf8'), 'keep me\n', 'nothing written through the link');
});
