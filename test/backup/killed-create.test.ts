/**
 * A `backup create` killed (SIGKILL) after it took its snapshot leaves no snapshot behind: the
 * daemon removes a snapshot a backup took for itself once the backup's control connection is
 * gone, and at its next start when the daemon itself was killed with it. A snapshot a user took
 * is kept through both. Against the real daemon and the real CLI.
 */

import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { BDSNAP_MAIN } from '../../testkit/bdsnap-cli.js';
import { ok, sandbox, startDaemon, type RunningDaemon, type Sandbox } from '../../testkit/daemon.js';
import { makeImage } from '../../testkit/files.js';

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
