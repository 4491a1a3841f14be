/**
 * Sessions as plain NBD clients see them, through the daemon's NBD socket with real libnbd
 * clients (nbdsh): only registered exports are served, an inactive device gets no session
 * but is flagged when written, connections to an active export share one session, and a
 * daemon killed with SIGKILL mid-session comes back with its activations and a recovered,
 * restorable session.
 */

import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { cleanupOf } from '../../testkit/cleanup.js';
import { TEST_PASSWORD, cli, daemonUri, ok, sandbox, startDaemon, type Sandbox } from '../../testkit/daemon.js';
import { makeImage, sha256File } from '../../testkit/files.js';
import { needs } from '../../testkit/needs.js';
import { until } from '../helpers/poll.js';
import { nbdshEnv } from '../../testkit/process.js';
import { nbdsh, restoreOnlySession, sessionDirs } from './helpers.js';

const IMAGE_BYTES = 8 << 20;

function pattern(buf: Buffer): void {
  for (let i = 0; i < buf.length; i += 4) buf.writeUInt32LE((i * 2654435761) >>> 0, i);
}

interface StatusJson {
  devices: Array<{ device: string; active: boolean; attached: boolean; dirtyOutsideSession: boolean; currentSession: string | null; inSession: boolean }>;
}

function statusOf(box: Sandbox, device: string): StatusJson['devices'][number] | undefined {
  return (JSON.parse(ok(box, ['status', '--json'])) as StatusJson).devices.find((d) => d.device === device);
}

test('only registered devices are served; an inactive one gets no session but is flagged when written', async (t) => {
  if (!needs(t, { tools: ['nbdsh', 'nbdinfo'] })) return;
  const box = sandbox(t);
  await startDaemon(t, { sandbox: box, password: false });
  ok(box, ['passwd', '--password-stdin'], `${TEST_PASSWORD}\n`);
  const image = fs.realpathSync(makeImage(path.join(box.top, 'disk.img'), IMAGE_BYTES, pattern));

  const unknown = nbdsh(box, image, 'print(h.get_size())');
  assert.notEqual(unknown.status, 0, 'an unregistered export is refused');
  assert.match(unknown.stderr, /export|NBD_REP_ERR/i, unknown.stderr);
  const other = nbdsh(box, '/etc/passwd', 'print(h.get_size())');
  assert.notEqual(other.status, 0, 'a file root never registered is refused');

  ok(box, ['activate', image, '--password-stdin'], `${TEST_PASSWORD}\n`);
  ok(box, ['deactivate', image, '--password-stdin'], `${TEST_PASSWORD}\n`);
  const info = spawnSync('nbdinfo', ['--json', daemonUri(box, image)], { encoding: 'utf8', timeout: 30000 });
  assert.equal(info.status, 0, info.stderr);
  assert.equal((JSON.parse(info.stdout) as { exports: Array<{ 'export-size': number }> }).exports[0]?.['export-size'], IMAGE_BYTES);
  const listed = spawnSync('nbdinfo', ['--list', '--json', daemonUri(box, '')], { encoding: 'utf8', timeout: 30000 });
  assert.equal(listed.status, 0, listed.stderr);
  assert.deepEqual((JSON.parse(listed.stdout) as { exports: Array<{ 'export-name': string }> }).exports.map((e) => e['export-name']), [image]);
  const read = nbdsh(box, image, 'print(h.get_size()); print(h.pread(512, 0).hex())');
  assert.equal(read.status, 0, read.stderr);
  assert.equal(read.stdout.split('\n')[0], String(IMAGE_BYTES));
  assert.equal(read.stdout.split('\n')[1], fs.readFileSync(image).subarray(0, 512).toString('hex'), 'the read returns the image bytes');
  assert.equal(statusOf(box, image)?.dirtyOutsideSession, false, 'reads do not flag the device');

  const write = nbdsh(box, image, 'h.pwrite(b"\\xab" * 4096, 65536); h.flush()');
  assert.equal(write.status, 0, write.stderr);
  assert.deepEqual(sessionDirs(box), [], 'no session for an inactive device');
  const st = statusOf(box, image);
  assert.equal(st?.dirtyOutsideSession, true);
  assert.equal(st?.attached, false, 'the device is released when the client leaves');
  const registry = JSON.parse(fs.readFileSync(path.join(box.stateDir, 'registry.json'), 'utf8')) as { devices: Array<{ dirtyOutsideSession: boolean }> };
  assert.equal(registry.devices[0]?.dirtyOutsideSession, true, 'the flag is persisted');
  assert.equal(fs.readFileSync(image).subarray(65536, 65536 + 4096).every((b) => b === 0xab), true);
});

test('an active export: reads leave no directory, each client attach with writes is one session', async (t) => {
  if (!needs(t, { tools: ['nbdsh', 'nbdinfo'] })) return;
  const box = sandbox(t);
  await startDaemon(t, { sandbox: box, password: false });
  ok(box, ['passwd', '--password-stdin'], `${TEST_PASSWORD}\n`);
  const image = fs.realpathSync(makeImage(path.join(box.top, 'disk.img'), IMAGE_BYTES, pattern));
  const original = await sha256File(image);
  ok(box, ['activate', image, '--password-stdin'], `${TEST_PASSWORD}\n`);

  assert.equal(nbdsh(box, image, 'h.pread(65536, 0)').status, 0);
  assert.deepEqual(sessionDirs(box), [], 'a read-only attach leaves no session directory');

  // Two connections at once share one session: the first holds the export open while the second writes.
  const holder = spawn('nbdsh', ['-u', daemonUri(box, image), '-c', 'import time; h.pwrite(b"\\x01" * 4096, 0); h.flush(); time.sleep(2)'], { stdio: 'ignore', env: nbdshEnv() });
  const holderDone = new Promise<number | null>((resolve) => holder.once('exit', (code) => resolve(code)));
  cleanupOf(t).after(() => { holder.kill('SIGKILL'); });
  await until('the first writer', () => sessionDirs(box).length === 1);
  assert.equal(nbdsh(box, image, 'h.pwrite(b"\\x02" * 8192, 1 << 20); h.flush()').status, 0);
  assert.equal(await holderDone, 0, 'the first writer finished without an error');
  await until('the session to end', () => statusOf(box, image)?.attached === false);
  assert.equal(sessionDirs(box).length, 1, 'concurrent connections share one session');

  assert.equal(nbdsh(box, image, 'h.pwrite(b"\\x03" * 4096, 2 << 20); h.flush()').status, 0);
  await until('the second session to end', () => statusOf(box, image)?.attached === false);
  const dirs = sessionDirs(box);
  assert.equal(dirs.length, 2, 'a later attach is a new session');
  const list = JSON.parse(ok(box, ['list', image, '--json'])) as { sessions: Array<{ dir: string; state: string; preservedBytes: number }> };
  assert.deepEqual(list.sessions.map((s) => s.state), ['complete', 'complete']);
  assert.ok(list.sessions.every((s) => s.preservedBytes > 0));

  const first = list.sessions[0]?.dir as string;
  const restored = cli(box, ['restore', first]);
  assert.equal(restored.status, 0, restored.stderr);
  assert.equal(await sha256File(image), original, 'restoring the first session gives back the original bytes');
});

test('SIGKILL mid-session: activations kept, the session recovered as interrupted and restorable', async (t) => {
  if (!needs(t, { tools: ['nbdsh', 'nbdinfo'] })) return;
  const box = sandbox(t);
  const daemon = await startDaemon(t, { sandbox: box, password: false });
  ok(box, ['passwd', '--password-stdin'], `${TEST_PASSWORD}\n`);
  const image = fs.realpathSync(makeImage(path.join(box.top, 'disk.img'), IMAGE_BYTES, pattern));
  const other = fs.realpathSync(makeImage(path.join(box.top, 'other.img'), 1 << 20, 0));
  const original = await sha256File(image);
  ok(box, ['activate', image, '--password-stdin'], `${TEST_PASSWORD}\n`);
  ok(box, ['activate', other, '--password-stdin'], `${TEST_PASSWORD}\n`);
  ok(box, ['deactivate', other, '--password-stdin'], `${TEST_PASSWORD}\n`);

  const code = [
    'import sys, time',
    'for i in range(64): h.pwrite(bytes([i]) * 65536, i * 98304)',
    'print("written", flush=True)',
    'time.sleep(30)',
  ].join('\n');
  const writer = spawn('nbdsh', ['-u', daemonUri(box, image), '-c', code], { stdio: ['ignore', 'pipe', 'inherit'], env: nbdshEnv() });
  cleanupOf(t).after(() => { writer.kill('SIGKILL'); });
  let said = '';
  writer.stdout?.on('data', (d: Buffer) => { said += d.toString(); });
  await until('the writes', () => said.includes('written'));
  assert.notEqual(await sha256File(image), original);

  daemon.server.kill('SIGKILL');
  await daemon.server.stop();
  writer.kill('SIGKILL');
  const [dir] = sessionDirs(box);
  assert.ok(dir, 'the session directory exists');
  assert.equal(sessionDirs(box).length, 1);

  const restarted = await startDaemon(t, { sandbox: box, password: false });
  const devices = (JSON.parse(ok(box, ['status', '--json'])) as StatusJson).devices;
  assert.deepEqual(devices.map((d) => [d.device, d.active]).sort(), [[image, true], [other, false]].sort());
  const list = JSON.parse(ok(box, ['list', image, '--json'])) as { sessions: Array<{ dir: string; state: string }> };
  assert.deepEqual(list.sessions.map((s) => s.state), ['interrupted']);
  assert.ok(restarted.logLines().some((l) => l.event === 'session-recovered'), 'the recovery is logged');

  const restored = cli(box, ['restore', path.join(box.snapshotRoot, dir)]);
  assert.equal(restored.status, 0, restored.stderr);
  assert.equal(await sha256File(image), original, 'the recovered session restores the exact original');
  assert.equal((await restarted.server.stop()).exitCode, 0);
});

test('SIGTERM with a client attached: requests finished, the session closed complete, exit 0', async (t) => {
  if (!needs(t, { tools: ['nbdsh', 'nbdinfo'] })) return;
  const box = sandbox(t);
  const daemon = await startDaemon(t, { sandbox: box, password: false, logLevel: 'info' });
  ok(box, ['passwd', '--password-stdin'], `${TEST_PASSWORD}\n`);
  const image = fs.realpathSync(makeImage(path.join(box.top, 'disk.img'), IMAGE_BYTES, pattern));
  const original = await sha256File(image);
  ok(box, ['activate', image, '--password-stdin'], `${TEST_PASSWORD}\n`);
  const code = 'import time\nfor i in range(16): h.pwrite(bytes([i + 1]) * 65536, i * 131072)\nprint("written", flush=True)\ntime.sleep(30)';
  const writer = spawn('nbdsh', ['-u', daemonUri(box, image), '-c', code], { stdio: ['ignore', 'pipe', 'ignore'], env: nbdshEnv() });
  cleanupOf(t).after(() => { writer.kill('SIGKILL'); });
  let said = '';
  writer.stdout?.on('data', (d: Buffer) => { said += d.toString(); });
  await until('the writes', () => said.includes('written'));

  assert.equal((await daemon.server.stop()).exitCode, 0, 'SIGTERM exits 0');
  const stopped = daemon.logLines();
  assert.ok(stopped.some((l) => l.event === 'session-end' && l.state === 'complete'));
  assert.ok(stopped.some((l) => l.event === 'daemon-stopped'));
  for (const line of stopped) assert.ok(!JSON.stringify(line).includes(TEST_PASSWORD), 'the password is never logged');
  assert.equal(restoreOnlySession(box), 'complete');
  assert.equal(await sha256File(image), original);
});

test('daemon session options: --chunk-size sets the chunk of every session, --size-limit fails one that outgrows it, bad values are refused', async (t) => {
  if (!needs(t, { tools: ['nbdsh', 'nbdinfo'] })) return;
  const box = sandbox(t);
  await startDaemon(t, { sandbox: box, password: false, extraArgs: ['--chunk-size', '4K', '--size-limit', '64K'] });
  ok(box, ['passwd', '--password-stdin'], `${TEST_PASSWORD}\n`);
  const image = fs.realpathSync(makeImage(path.join(box.top, 'disk.img'), IMAGE_BYTES, pattern));
  ok(box, ['activate', image, '--password-stdin'], `${TEST_PASSWORD}\n`);

  // 4 KiB at 0 and 4 KiB at 1 MiB: two 4 KiB chunks, well under the limit.
  assert.equal(nbdsh(box, image, 'h.pwrite(b"\\x01" * 4096, 0); h.pwrite(b"\\x02" * 4096, 1 << 20); h.flush()').status, 0);
  await until('the session to end', () => statusOf(box, image)?.attached === false);
  // 128 KiB of first writes: past the 64 KiB limit, so the session fails and the device still gets every byte.
  assert.equal(nbdsh(box, image, 'h.pwrite(b"\\x03" * 131072, 2 << 20); h.flush()').status, 0);
  await until('the second session to end', () => statusOf(box, image)?.attached === false);
  const list = JSON.parse(ok(box, ['list', image, '--json'])) as { sessions: Array<{ dir: string; state: string; preservedBytes: number }> };
  assert.deepEqual(list.sessions.map((s) => s.state), ['complete', 'failed']);
  assert.equal(list.sessions[0]?.preservedBytes, 8192, 'two 4 KiB chunks');
  const manifest = JSON.parse(fs.readFileSync(path.join(list.sessions[0]!.dir, 'manifest.json'), 'utf8')) as { chunkSize: number };
  assert.equal(manifest.chunkSize, 4096);
  const written = Buffer.alloc(131072);
  const fd = fs.openSync(image, 'r');
  fs.readSync(fd, written, 0, written.length, 2 << 20);
  fs.closeSync(fd);
  assert.ok(written.equals(Buffer.alloc(131072, 3)), 'the device got the writes of the failed session');

  for (const [flag, value, message] of [['--chunk-size', '3000', /bad --chunk-size: chunk size must be a power of two/], ['--durability', 'sometimes', /bad --durability "sometimes"/]] as const) {
    const r = cli(box, ['daemon', '--run-dir', path.join(box.top, 'x'), flag, value]);
    assert.equal(r.status, 1, r.stderr);
    assert.match(r.stderr, message);
  }
});
