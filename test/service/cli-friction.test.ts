/**
 * What a newcomer meets first, through the real CLI and a real daemon: the version, one error
 * prefix, a stale control socket, `cbt map` without --since and with one in the future,
 * `snapshot extend` asked to lower a limit, a device held by a snapshot, the live size of a
 * session in `list`, the overflow reason, and `events --follow` across a daemon restart.
 */

import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import { BDSNAP_MAIN, PROJECT_ROOT } from '../../testkit/bdsnap-cli.js';
import { cleanupOf } from '../../testkit/cleanup.js';
import { TEST_PASSWORD, cli, ok, sandbox, startDaemon, type Sandbox } from '../../testkit/daemon.js';
import { makeImage } from '../../testkit/files.js';
import { passwdAndActivate } from './helpers.js';

function createSnapshot(box: Sandbox, devices: string[], extra: string[] = []): { id: string } {
  return JSON.parse(ok(box, ['snapshot', 'create', ...devices, '--json', ...extra])) as { id: string };
}

function connect(box: Sandbox, exportName: string): Promise<NbdClient> {
  return NbdClient.connect({ socketPath: path.join(box.runDir, 'nbd.sock'), exportName });
}

test('--version prints the package version; usage and operational errors share the bdsnap: prefix', (t) => {
  const box = sandbox(t);
  const version = (JSON.parse(fs.readFileSync(path.join(PROJECT_ROOT, 'package.json'), 'utf8')) as { version: string }).version;
  for (const flag of ['--version', '-V']) {
    const r = cli(box, [flag]);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, `${version}\n`);
  }
  const unknown = cli(box, ['no-such-command']);
  assert.equal(unknown.status, 2);
  assert.match(unknown.stderr, /^bdsnap: unknown command 'no-such-command'/);
  const missing = cli(box, ['snapshot', 'extend']);
  assert.equal(missing.status, 2);
  assert.match(missing.stderr, /^bdsnap: missing required argument 'id'/);
  const noDaemon = cli(box, ['status']);
  assert.equal(noDaemon.status, 1);
  assert.match(noDaemon.stderr, /^bdsnap: the bdsnap daemon is not running \(no control socket at /);
});

test('--version is read from the package.json installed beside the program, not built in', (t) => {
  const top = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-version-'));
  cleanupOf(t).after(() => fs.rmSync(top, { recursive: true, force: true }));
  fs.cpSync(path.join(PROJECT_ROOT, 'dist', 'src'), path.join(top, 'dist', 'src'), { recursive: true });
  fs.symlinkSync(path.join(PROJECT_ROOT, 'node_modules'), path.join(top, 'node_modules'));
  const meta = JSON.parse(fs.readFileSync(path.join(PROJECT_ROOT, 'package.json'), 'utf8')) as Record<string, unknown>;
  fs.writeFileSync(path.join(top, 'package.json'), JSON.stringify({ ...meta, version: '97.53.1-installed' }));
  const main = path.join(top, 'dist', 'src', 'cli', 'main.js');
  const r = spawnSync(process.execPath, [main, '--version'], { encoding: 'utf8', timeout: 30_000, cwd: os.tmpdir() });
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stdout, '97.53.1-installed\n');
});

test('a stale control socket is reported as such, not as a missing one', async (t) => {
  const box = sandbox(t);
  fs.mkdirSync(box.runDir, { mode: 0o700 });
  const socketPath = path.join(box.runDir, 'control.sock');
  // What a killed daemon leaves: a socket file nobody listens on (a clean close would remove it).
  const listener = spawn(process.execPath, ['-e', `require('node:net').createServer().listen(${JSON.stringify(socketPath)}, () => console.log('ready'))`], { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise<void>((resolve) => listener.stdout.once('data', () => resolve()));
  listener.kill('SIGKILL');
  await new Promise<void>((resolve) => listener.once('exit', () => resolve()));
  assert.ok(fs.lstatSync(socketPath).isSocket(), 'the stale socket file is there');
  const r = cli(box, ['status']);
  assert.equal(r.status, 1);
  assert.equal(r.stderr.trim(), `bdsnap: the bdsnap daemon is not running (stale socket at ${socketPath}; start the daemon, which replaces it)`);
});

test('cbt map defaults to --since 0 and refuses a number in the future; extend refuses to lower a limit', async (t) => {
  const box = sandbox(t);
  const device = makeImage(path.join(box.top, 'a.img'), 4 << 20, 0);
  await startDaemon(t, { sandbox: box, password: false });
  const snap = createSnapshot(box, [device], ['--limit', '2M']);

  const map = JSON.parse(ok(box, ['cbt', 'map', device, '--json'])) as { since: number; number: number };
  assert.equal(map.since, 0);
  assert.equal(map.number, 2);
  assert.equal(cli(box, ['cbt', 'map', device, '--since', '2']).status, 0, 'the current number is not in the future');
  const future = cli(box, ['cbt', 'map', device, '--since', '3']);
  assert.equal(future.status, 1);
  assert.match(future.stderr, /^bdsnap: since 3 is in the future: .*a\.img is at number 2 of generation \w+/);

  const lower = cli(box, ['snapshot', 'extend', snap.id, '--limit', '1M']);
  assert.equal(lower.status, 1);
  assert.equal(lower.stderr.trim(), `bdsnap: a limit of 1 MiB is below snapshot ${snap.id}'s current limit of 2 MiB; extend only raises it`);
  const info = JSON.parse(ok(box, ['snapshot', 'info', snap.id, '--json'])) as { storage: { limitBytes: number } };
  assert.equal(info.storage.limitBytes, 2 << 20, 'the limit is unchanged');
  ok(box, ['snapshot', 'extend', snap.id, '--limit', '2M']);
  ok(box, ['snapshot', 'extend', snap.id, '--limit', '3M']);
});

test('a device the daemon holds for a snapshot: serve names the snapshot to destroy', async (t) => {
  const box = sandbox(t);
  const device = makeImage(path.join(box.top, 'a.img'), 1 << 20, 0);
  await startDaemon(t, { sandbox: box, password: false });
  const snap = createSnapshot(box, [device]);
  const r = cli(box, ['serve', '--socket', path.join(box.top, 'other.sock'), device]);
  assert.equal(r.status, 1);
  assert.equal(r.stderr.trim(), `bdsnap: ${device} is in use: held by bdsnap snapshot ${snap.id}; destroy it first (bdsnap snapshot destroy ${snap.id})`);
});

test('list shows the live preserved bytes of a session in progress; an overflow says which write did not fit', async (t) => {
  const box = sandbox(t);
  const device = makeImage(path.join(box.top, 'a.img'), 8 << 20, 0);
  await startDaemon(t, { sandbox: box, password: false });
  passwdAndActivate(box, device, TEST_PASSWORD);
  const snap = createSnapshot(box, [device], ['--limit', '1M']);
  const client = await connect(box, device);
  cleanupOf(t).after(() => client.close());
  await client.write(randomBytes(256 << 10), 0);
  await client.write(randomBytes(2 << 20), 4 << 20);
  await client.flush();

  const status = JSON.parse(ok(box, ['status', '--json'])) as { devices: Array<{ currentSession: string | null; bytesPreserved: number }> };
  const live = status.devices[0]!;
  assert.ok(live.currentSession !== null && live.bytesPreserved >= (2 << 20) + (256 << 10), JSON.stringify(live));
  const list = JSON.parse(ok(box, ['list', '--json'])) as { sessions: Array<{ dir: string; state: string; preservedBytes: number }> };
  assert.deepEqual(list.sessions.map((s) => [s.dir, s.state, s.preservedBytes]), [[live.currentSession, 'active', live.bytesPreserved]]);

  const info = JSON.parse(ok(box, ['snapshot', 'info', snap.id, '--json'])) as { state: string; reason: string };
  assert.equal(info.state, 'overflowed');
  assert.match(info.reason, /^the difference storage reached its limit: the originals of [\d.]+ [KM]iB at offset 4 MiB did not fit \([\d.]+ KiB of 1 MiB used, \d+%\)$/);
});

test('events --follow reconnects when the daemon restarts and goes on after the last event it printed', { timeout: 90_000 }, async (t) => {
  const box = sandbox(t);
  const device = makeImage(path.join(box.top, 'a.img'), 1 << 20, 0);
  const first = await startDaemon(t, { sandbox: box, password: false });
  ok(box, ['snapshot', 'destroy', createSnapshot(box, [device]).id]);

  const follower = spawn(process.execPath, [BDSNAP_MAIN, 'events', '--follow', '--json'], { env: box.env, stdio: ['ignore', 'pipe', 'pipe'] });
  cleanupOf(t).after(() => {
    follower.kill('SIGKILL');
  });
  let stdout = '';
  let stderr = '';
  const waiters: Array<() => void> = [];
  const changed = (): void => {
    for (const w of waiters.splice(0)) w();
  };
  follower.stdout.on('data', (d: Buffer) => {
    stdout += d.toString('utf8');
    changed();
  });
  follower.stderr.on('data', (d: Buffer) => {
    stderr += d.toString('utf8');
    changed();
  });
  let exited: number | null | undefined;
  follower.on('exit', (code) => {
    exited = code;
    changed();
  });
  const until = async (what: string, done: () => boolean): Promise<void> => {
    while (!done()) {
      if (exited !== undefined) assert.fail(`events --follow exited (${exited}) while waiting for ${what}: ${stderr}`);
      await new Promise<void>((resolve) => waiters.push(resolve));
    }
  };
  const types = (): string[] => stdout.trim().split('\n').filter((l) => l).map((l) => (JSON.parse(l) as { type: string }).type);
  await until('the first two events', () => types().length >= 2);
  assert.deepEqual(types(), ['snapshot-created', 'snapshot-destroyed']);

  await first.server.stop();
  await startDaemon(t, { sandbox: box, password: false });
  await until('the reconnection line', () => /reconnected/.test(stderr));
  assert.equal(stderr, 'bdsnap: reconnected to the daemon; following events after #2\n');
  ok(box, ['cbt', 'reset', device]);
  await until('the event after the restart', () => types().length >= 3);
  assert.deepEqual(types(), ['snapshot-created', 'snapshot-destroyed', 'cbt-reset'], 'nothing printed twice, nothing lost');
});

test('list shows a session undone by a restore', async (t) => {
  const box = sandbox(t);
  const device = makeImage(path.join(box.top, 'a.img'), 4 << 20, 0);
  await startDaemon(t, { sandbox: box, password: false });
  passwdAndActivate(box, device, TEST_PASSWORD);
  const client = await connect(box, device);
  await client.write(randomBytes(64 << 10), 0);
  await client.flush();
  await client.close();
  const before = JSON.parse(ok(box, ['list', '--json'])) as { sessions: Array<{ dir: string; undoneAt: string | null }> };
  assert.equal(before.sessions.length, 1);
  assert.equal(before.sessions[0]!.undoneAt, null);
  ok(box, ['restore', before.sessions[0]!.dir]);
  const after = JSON.parse(ok(box, ['list', '--json'])) as { sessions: Array<{ dir: string; undoneAt: string | null }> };
  assert.match(after.sessions[0]!.undoneAt ?? '', /^\d{4}-\d\d-\d\dT/);
  assert.match(ok(box, ['list']), /complete, undone by a restore/);
});
