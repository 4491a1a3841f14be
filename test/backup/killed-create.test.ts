/**
 * A `backup create` killed (SIGKILL) after it took its snapshot leaves no snapshot behind: the
 * daemon removes a snapshot a backup took for itself once the backup's control connection is
 * gone, and at its next start when the daemon itself was killed with it. A snapshot a user took
 * is kept through both. A daemon killed under a create, while it reads or before the handshake
 * of its NBD connection, gets one message that says so, that nothing was recorded, and what to
 * do. Against the real daemon and the real CLI.
 */

import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { BDSNAP_MAIN } from '../../testkit/bdsnap-cli.js';
import { ok, sandbox, startDaemon, type RunningDaemon, type Sandbox } from '../../testkit/daemon.js';
import { makeImage } from '../../testkit/files.js';
import { needs } from '../../testkit/needs.js';

/** Random data, so the backup is still reading and storing it when it is killed. */
const BYTES = 128 << 20;
const POLL_MS = 100;

interface Listed {
  id: string;
  state: string;
  owner: { pid: number } | null;
}

async function listSnapshots(daemon: RunningDaemon): Promise<Listed[]> {
  const out = await daemon.cli(['snapshot', 'list', '--json']);
  return (JSON.parse(out.stdout) as { snapshots: Listed[] }).snapshots;
}

/** `backup create` in its own process; `exited` resolves when it ends. */
function startBackup(t: TestContext, box: Sandbox, device: string, repo: string): { child: ChildProcess; exited: Promise<unknown> } {
  const child = spawn(process.execPath, [BDSNAP_MAIN, 'backup', 'create', device, '--repo', repo, '--full'], { env: box.env, stdio: 'ignore' });
  const exited = new Promise((resolve) => child.once('exit', resolve));
  t.after(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  return { child, exited };
}

/** Poll until `done` holds of the listing, or fail naming what it last was. */
async function listingUntil(daemon: RunningDaemon, done: (list: Listed[]) => boolean, timeoutMs: number, what: string): Promise<Listed[]> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const list = await listSnapshots(daemon);
    if (done(list)) return list;
    if (Date.now() > deadline) assert.fail(`${what} within ${timeoutMs} ms; the snapshots: ${JSON.stringify(list)}`);
    await sleep(POLL_MS);
  }
}

/** A daemon, a repository and a device; `mine`: a snapshot of it a user took, or null. */
async function setUp(t: TestContext, userSnapshot: boolean): Promise<{ box: Sandbox; daemon: RunningDaemon; device: string; repo: string; mine: string | null }> {
  const box = sandbox(t);
  const device = makeImage(path.join(box.top, 'c.img'), BYTES, 'random');
  const repo = path.join(box.top, 'repo');
  const daemon = await startDaemon(t, { sandbox: box, password: false });
  ok(box, ['backup', 'init', '--repo', repo]);
  const mine = userSnapshot ? (JSON.parse(ok(box, ['snapshot', 'create', device, '--json'])) as { id: string }).id : null;
  return { box, daemon, device, repo, mine };
}

test('a backup create killed after its snapshot: the daemon destroys the snapshot at once; a user\'s snapshot stays', { timeout: 90_000 }, async (t) => {
  const { box, daemon, device, repo, mine } = await setUp(t, true);
  const backup = startBackup(t, box, device, repo);
  const during = await listingUntil(daemon, (l) => l.length === 2, 20_000, 'the backup took no snapshot');
  const theirs = during.find((s) => s.id !== mine)!;
  backup.child.kill('SIGKILL');
  await backup.exited;
  const after = await listingUntil(daemon, (l) => !l.some((s) => s.id === theirs.id), 8_000, 'the killed backup\'s snapshot was not destroyed');
  assert.deepEqual(after.map((s) => s.id), [mine], 'the user\'s snapshot is kept');
  assert.equal(theirs.owner?.pid, backup.child.pid, 'the listing showed the backup as the owner');
  assert.equal(during.find((s) => s.id === mine)?.owner, null, 'a user\'s snapshot has no owner');
  const destroyed = (await daemon.cli(['events', '--json'])).stdout.split('\n').filter((l) => l.trim())
    .map((l) => JSON.parse(l) as { type: string; snapshot?: string; details: Record<string, unknown> })
    .find((e) => e.type === 'snapshot-destroyed' && e.snapshot === theirs.id);
  assert.match(String(destroyed?.details.reason), /owner/, 'the event says why');
});

test('the daemon killed during a backup create: its snapshot is gone after the restart, a user\'s snapshot is kept', { timeout: 90_000 }, async (t) => {
  const { box, daemon, device, repo, mine } = await setUp(t, true);
  const backup = startBackup(t, box, device, repo);
  await listingUntil(daemon, (l) => l.length === 2, 20_000, 'the backup took no snapshot');
  daemon.server.kill('SIGKILL');
  assert.ok(await daemon.server.waitForExit(10_000), 'the daemon ends on SIGKILL');
  // The backup fails without its daemon; at the restart its process is gone.
  const ended = await Promise.race([backup.exited.then(() => true), sleep(20_000).then(() => false)]);
  assert.ok(ended, 'the backup ends once its daemon is gone');
  const again = await startDaemon(t, { sandbox: box, password: false });
  const list = await listSnapshots(again);
  assert.deepEqual(list.map((s) => [s.id, s.state]), [[mine, 'ok']], 'only the user\'s snapshot is back');
});

test('after a daemon restart, a backup\'s snapshot is kept while its process still runs and destroyed once it ends', { timeout: 90_000 }, async (t) => {
  const { box, daemon, device, repo } = await setUp(t, false);
  const backup = startBackup(t, box, device, repo);
  const [theirs] = await listingUntil(daemon, (l) => l.length === 1, 20_000, 'the backup took no snapshot');
  // Stopped, the backup outlives its daemon: at the restart its owner still runs.
  backup.child.kill('SIGSTOP');
  daemon.server.kill('SIGKILL');
  assert.ok(await daemon.server.waitForExit(10_000), 'the daemon ends on SIGKILL');
  const again = await startDaemon(t, { sandbox: box, password: false });
  // Two checks of its owner pass (OWNER_CHECK_MS): nothing may happen.
  await sleep(4500);
  assert.deepEqual((await listSnapshots(again)).map((s) => s.id), [theirs!.id], 'kept while its owner runs');
  backup.child.kill('SIGKILL');
  await backup.exited;
  await listingUntil(again, (l) => l.length === 0, 8_000, 'the backup\'s snapshot was not destroyed once its owner ended');
});

interface Ended {
  code: number | null;
  stdout: string;
  stderr: string;
}

/**
 * `backup create` in its own process (under `prefix`, e.g. strace), with its output so far and
 * its exit. It says on stderr which kind of backup each device gets just before it reads.
 */
function startCreate(t: TestContext, box: Sandbox, device: string, repo: string, prefix: string[] = []): { child: ChildProcess; stderr(): string; ended: Promise<Ended> } {
  const [cmd, ...args] = [...prefix, process.execPath, BDSNAP_MAIN, 'backup', 'create', device, '--repo', repo];
  const child = spawn(cmd!, args, { env: box.env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const ended = new Promise<Ended>((resolve) => child.once('close', (code) => resolve({ code, stdout, stderr })));
  t.after(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  return { child, stderr: () => stderr, ended };
}

/** Poll until `done`, or fail saying `what`. */
async function until(done: () => boolean, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!done()) {
    if (Date.now() > deadline) assert.fail(`${what} within ${timeoutMs} ms`);
    await sleep(10);
  }
}

/** Bytes a process has read so far, sockets included (/proc/PID/io rchar). */
function bytesRead(pid: number): number {
  return Number(/^rchar: (\d+)$/m.exec(fs.readFileSync(`/proc/${pid}/io`, 'utf8'))?.[1] ?? 0);
}

/** The create's one error line on stderr (after its plan, if it got that far), and the repository without a backup of it. */
function assertEndedAndNothingRecorded(box: Sandbox, ended: Ended, device: string, repo: string, doing: string): void {
  assert.equal(ended.code, 1, ended.stderr);
  assert.equal(ended.stdout, '');
  const lines = ended.stderr.trim().split('\n');
  assert.deepEqual(lines.slice(0, -1).filter((l) => l !== `${device}: full backup (first backup of this device)`), [], `one error line on stderr: ${ended.stderr}`);
  assert.match(lines.at(-1)!, new RegExp(`^bdsnap: the daemon's connection ended ${doing}: the daemon stopped or died; nothing of this backup was recorded in ${repo}; check that the daemon is running \\('bdsnap status' answers when it is\\), then run the backup again$`));
  assert.deepEqual(JSON.parse(ok(box, ['backup', 'list', '--repo', repo, '--json'])), [], 'the backup is not listed');
}

test('the daemon killed while a backup create reads the device: the create says the daemon\'s connection ended, that nothing was recorded and what to do; once the daemon runs again, the backup does', { timeout: 90_000 }, async (t) => {
  const { box, daemon, device, repo } = await setUp(t, false);
  const create = startCreate(t, box, device, repo);
  // Reading: what the create takes in once it said its plan is the image's, from the NBD socket.
  await until(() => create.stderr().includes(`${device}: full backup`), 30_000, 'the backup did not start reading');
  const before = bytesRead(create.child.pid!);
  await until(() => bytesRead(create.child.pid!) - before >= 16 << 20, 20_000, 'the backup read no 16 MiB of the image');
  daemon.server.kill('SIGKILL');
  assertEndedAndNothingRecorded(box, await create.ended, device, repo, `while the backup read ${device} \\(at \\d+(\\.\\d+)? MiB of 128 MiB\\)`);
  await daemon.server.waitForExit(10_000);
  await startDaemon(t, { sandbox: box, password: false });
  const { id } = JSON.parse(ok(box, ['backup', 'create', device, '--repo', repo, '--json'])) as { id: string };
  assert.deepEqual((JSON.parse(ok(box, ['backup', 'list', '--repo', repo, '--json'])) as Array<{ id: string }>).map((b) => b.id), [id]);
});

test('the daemon killed before the handshake of a backup create\'s NBD connection: the same message, nothing recorded', { timeout: 90_000 }, async (t) => {
  if (!needs(t, { root: true, tools: ['strace'] })) return;
  const { box, daemon, device, repo } = await setUp(t, false);
  // The create stops itself (SIGSTOP) as its second connect, the one to the NBD socket, returns:
  // the daemon is killed before it can answer the greeting, and then the create goes on.
  const log = path.join(box.top, 'strace.log');
  const create = startCreate(t, box, device, repo, ['strace', '-f', '-qq', '-o', log, '-e', 'trace=connect', '-e', 'inject=connect:signal=SIGSTOP:when=2']);
  const stopped = (): number | undefined => {
    const pid = fs.existsSync(log) ? /^(\d+)\s+--- stopped by SIGSTOP ---$/m.exec(fs.readFileSync(log, 'utf8'))?.[1] : undefined;
    return pid === undefined ? undefined : Number(pid);
  };
  t.after(() => {
    // Left stopped if the test fails before it lets it go on: the tracer's end does not end it.
    const pid = stopped();
    if (pid !== undefined && create.child.exitCode === null) process.kill(pid, 'SIGKILL');
  });
  await until(() => stopped() !== undefined, 30_000, 'the create did not reach its NBD connect');
  assert.match(fs.readFileSync(log, 'utf8'), /connect\(\d+, \{sa_family=AF_UNIX, sun_path="[^"]+\/nbd\.sock"\}/, 'the second connect is the NBD one');
  daemon.server.kill('SIGKILL');
  assert.ok(await daemon.server.waitForExit(10_000), 'the daemon ends on SIGKILL');
  process.kill(stopped()!, 'SIGCONT');
  assertEndedAndNothingRecorded(box, await create.ended, device, repo, `as the backup connected to read ${device}`);
});
