/**
 * Another process writing a device while the daemon holds it (dd, a VM that opened the image
 * after bdsnap did) writes around copy-before-write and the change map. The kernel reports
 * such writes (fanotify): the session in progress is failed with the writer named, so restore
 * refuses it instead of returning an image without that write undone; the device's change map
 * starts again (the next backup is full) and a snapshot that holds the device is void.
 */

import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { BDSNAP_MAIN } from '../../testkit/bdsnap-cli.js';
import { cleanupOf } from '../../testkit/cleanup.js';
import { TEST_PASSWORD, cli, ok, sandbox, startDaemon, type Sandbox } from '../../testkit/daemon.js';
import { makeImage, sha256File } from '../../testkit/files.js';
import { needs } from '../../testkit/needs.js';
import { nbdshEnv } from '../../testkit/process.js';
import { until } from '../helpers/poll.js';
import { heldNbdsh, sessionDirs } from './helpers.js';
import { mkfsExt4, mountPoint } from '../helpers/ext4.js';

const IMAGE_BYTES = 8 << 20;

/** dd writing one 4 KiB block of ones at block `block` of `file`, in place, as another process. */
function ddWrite(file: string, block: number): void {
  const r = spawnSync('sh', ['-c', `head -c 4096 /dev/zero | tr '\\0' '\\1' | dd of="$1" bs=4096 seek=${block} conv=notrunc status=none`, 'sh', file], { encoding: 'utf8', timeout: 10_000 });
  assert.equal(r.status, 0, r.stderr);
}

/** An NBD client of the daemon holding `device` open: it writes at 0, then waits until told to end. */
function heldClient(t: TestContext, box: Sandbox, device: string): Promise<{ end: () => Promise<void> }> {
  return heldNbdsh(t, box, device, 'h.pwrite(b"\\x07" * 65536, 0); h.flush(); print("written", flush=True)');
}

interface DeviceStatusJson { device: string; sessionState: string | null }

function sessionState(box: Sandbox, device: string): string | null | undefined {
  return (JSON.parse(ok(box, ['status', '--json'])) as { devices: DeviceStatusJson[] }).devices.find((d) => d.device === device)?.sessionState;
}

test('a write by another process during a session fails the session, naming the writer, and restore refuses it; the change map starts again', { timeout: 120_000 }, async (t) => {
  if (!needs(t, { root: true, tools: ['nbdsh'] })) return;
  const box = sandbox(t, 'bdsnap-around-');
  const image = fs.realpathSync(makeImage(path.join(box.top, 'disk.img'), IMAGE_BYTES, 'random', 5));
  const daemon = await startDaemon(t, { sandbox: box, password: false });
  ok(box, ['passwd', '--password-stdin'], `${TEST_PASSWORD}\n`);
  ok(box, ['activate', image, '--password-stdin'], `${TEST_PASSWORD}\n`);
  const before = sha256File(image);

  const client = await heldClient(t, box, image);
  assert.equal(sessionState(box, image), 'active', 'the client\'s write started a session');
  ddWrite(image, 100);
  await until('the session failed', () => sessionState(box, image) === 'failed');
  await client.end();

  const [dir] = sessionDirs(box);
  assert.ok(dir !== undefined, 'the session directory is kept');
  const manifest = JSON.parse(fs.readFileSync(path.join(box.snapshotRoot, dir, 'manifest.json'), 'utf8')) as { state: string; failedReason?: string };
  assert.equal(manifest.state, 'failed');
  assert.match(manifest.failedReason ?? '', new RegExp(`${image} was opened for writing by pid \\d+( \\(dd\\))? while bdsnap held it`));
  const restored = cli(box, ['restore', path.join(box.snapshotRoot, dir)]);
  assert.notEqual(restored.status, 0, 'a session written around is not restored');
  assert.match(restored.stderr, /failed/);
  assert.notEqual(sha256File(image), before, 'the image was left as it is (not half restored)');

  const events = ok(box, ['events', '--json']);
  assert.match(events, /"cbt-reset"/, 'the change map was reset');
  assert.match(events, /opened for writing by pid \d+/);
  assert.ok(daemon.logLines().some((l) => l.event === 'written-around' && typeof l.pid === 'number'), 'the daemon logged the write around it');
});

test('a write by another process to a device a snapshot holds voids the snapshot', { timeout: 120_000 }, async (t) => {
  if (!needs(t, { root: true })) return;
  for (const tracking of [true, false]) {
    const box = sandbox(t, 'bdsnap-around-snap-');
    const image = fs.realpathSync(makeImage(path.join(box.top, 'disk.img'), IMAGE_BYTES, 'random', 6));
    await startDaemon(t, { sandbox: box, password: false, ...(tracking ? {} : { extraArgs: ['--no-change-tracking'] }) });
    ok(box, ['passwd', '--password-stdin'], `${TEST_PASSWORD}\n`);
    ok(box, ['activate', image, '--password-stdin'], `${TEST_PASSWORD}\n`);
    const id = ok(box, ['snapshot', 'create', image, '--json']);
    const snapshotId = (JSON.parse(id) as { id: string }).id;
    ddWrite(image, 7);
    // What a backup asks before it records what it read: current, without waiting for the watch's round.
    const info = JSON.parse(ok(box, ['snapshot', 'info', snapshotId, '--json'])) as { state: string; reason?: string };
    assert.equal(info.state, 'failed', `snapshot info right after the write (change tracking ${tracking ? 'on' : 'off'})`);
    assert.match(info.reason ?? '', /opened for writing by pid \d+/);
    const stateOf = (): string | undefined => (JSON.parse(ok(box, ['snapshot', 'list', '--json'])) as { snapshots: Array<{ id: string; state: string; error?: string }> })
      .snapshots.find((s) => s.id === snapshotId)?.state;
    await until(`the snapshot failed (change tracking ${tracking ? 'on' : 'off'})`, () => stateOf() === 'failed');
  }
});

test('bdsnap umount of a mount written around says its session failed, naming the writer; the unmount itself succeeds', { timeout: 120_000 }, async (t) => {
  if (!needs(t, { root: true, paths: ['/dev/fuse'], tools: ['nbdfuse', 'fusermount3', 'mkfs.ext4', 'mount', 'umount'] })) return;
  const box = sandbox(t, 'bdsnap-around-mount-');
  const image = path.join(box.top, 'disk.img');
  makeImage(image, 32 << 20, 'zero');
  mkfsExt4(image);
  const real = fs.realpathSync(image);
  const mnt = mountPoint(t, box, path.join(box.top, 'mnt'));
  await startDaemon(t, { sandbox: box, password: false });
  ok(box, ['passwd', '--password-stdin'], `${TEST_PASSWORD}\n`);
  ok(box, ['activate', real, '--password-stdin'], `${TEST_PASSWORD}\n`);
  const failedMount = async (name: string): Promise<void> => {
    ok(box, ['mount', real, mnt, '-t', 'ext4']);
    fs.writeFileSync(path.join(mnt, name), Buffer.alloc(1 << 20, 0x5a));
    spawnSync('sync');
    // The last block of the image: past what this small filesystem has used.
    ddWrite(real, (32 << 20) / 4096 - 1);
    await until(`the session of the ${name} mount failed`, () => sessionState(box, real) === 'failed');
  };

  await failedMount('first');
  const json = cli(box, ['umount', mnt, '--json']);
  assert.equal(json.status, 0, json.stderr);
  const result = JSON.parse(json.stdout) as { sessionDir: string | null; sessionFailed?: string };
  assert.ok(result.sessionDir !== null, 'the session directory is named');
  assert.match(result.sessionFailed ?? '', /opened for writing by pid \d+( \(dd\))? while bdsnap held it/);

  await failedMount('second');
  const text = cli(box, ['umount', mnt]);
  assert.equal(text.status, 0, text.stderr);
  assert.match(text.stdout, new RegExp(`^unmounted ${mnt}; session \\S+\\n$`));
  assert.match(text.stderr, /warning: session \S+ failed \(.*opened for writing by pid \d+.*\); restore refuses it and every older session/);

  // A mount nobody wrote around says nothing more.
  ok(box, ['mount', real, mnt, '-t', 'ext4']);
  fs.writeFileSync(path.join(mnt, 'third'), Buffer.alloc(4096, 1));
  const clean = cli(box, ['umount', mnt]);
  assert.equal(clean.status, 0, clean.stderr);
  assert.equal(clean.stderr, '');
  assert.match(clean.stdout, /; session \S+\n$/);
});

test('serve --snapshot-root: a write by another process during the session fails it, naming the writer', { timeout: 60_000 }, async (t) => {
  if (!needs(t, { root: true, tools: ['nbdsh'] })) return;
  const box = sandbox(t, 'bdsnap-around-serve-');
  const image = fs.realpathSync(makeImage(path.join(box.top, 'disk.img'), IMAGE_BYTES, 'random', 7));
  const root = path.join(box.top, 'sessions');
  const socket = path.join(box.top, 'serve.sock');
  const child = spawn(process.execPath, [BDSNAP_MAIN, 'serve', '--snapshot-root', root, '--socket', socket, image], { stdio: ['ignore', 'ignore', 'pipe'] });
  cleanupOf(t).after(() => void child.kill('SIGKILL'));
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); });
  const exited = new Promise<number | null>((resolve) => child.once('exit', resolve));
  await until(() => `serve ready: ${stderr}`, () => /serving/.test(stderr) || child.exitCode !== null);
  const wrote = spawnSync('nbdsh', ['-u', `nbd+unix:///?socket=${socket}`, '-c', 'h.pwrite(b"\\x05" * 65536, 0); h.flush()'], { encoding: 'utf8', timeout: 30_000, env: nbdshEnv() });
  assert.equal(wrote.status, 0, wrote.stderr);
  ddWrite(image, 50);
  await until(() => `the session failed: ${stderr}`, () => /session FAILED \(.* was opened for writing by pid \d+/.test(stderr));
  child.kill('SIGTERM');
  assert.equal(await exited, 0, stderr);
  const [dir] = fs.readdirSync(root);
  assert.ok(dir !== undefined, stderr);
  const manifest = JSON.parse(fs.readFileSync(path.join(root, dir, 'manifest.json'), 'utf8')) as { state: string; failedReason?: string };
  assert.equal(manifest.state, 'failed');
  assert.match(manifest.failedReason ?? '', /was opened for writing by pid \d+.* while bdsnap served it/);
});

test('during a session: readers and a refused second server are let be; a process that keeps the image open for writing, or a loop device set up on it, fails the session', { timeout: 120_000 }, async (t) => {
  if (!needs(t, { root: true, tools: ['nbdsh', 'losetup'] })) return;
  const box = sandbox(t, 'bdsnap-around-held-');
  await startDaemon(t, { sandbox: box, password: false });
  ok(box, ['passwd', '--password-stdin'], `${TEST_PASSWORD}\n`);
  const images = ['held', 'loop'].map((name, i) => fs.realpathSync(makeImage(path.join(box.top, `${name}.img`), IMAGE_BYTES, 'random', 10 + i)));
  for (const image of images) ok(box, ['activate', image, '--password-stdin'], `${TEST_PASSWORD}\n`);
  const [held, looped] = images as [string, string];

  const client = await heldClient(t, box, held);
  const read = spawnSync('sh', ['-c', 'cat "$1" > /dev/null; dd if="$1" of=/dev/null bs=1M status=none', 'sh', held], { encoding: 'utf8', timeout: 10_000 });
  assert.equal(read.status, 0, read.stderr);
  // A second server refused for the daemon's lock never had the image open for writing.
  const second = spawnSync(process.execPath, [BDSNAP_MAIN, 'serve', '--socket', path.join(box.top, 'second.sock'), held], { encoding: 'utf8', timeout: 30_000 });
  assert.notEqual(second.status, 0, 'a second server of the held image is refused');
  assert.match(second.stderr, /in use|busy|held|lock/i, second.stderr);
  await new Promise((resolve) => setTimeout(resolve, 2500));
  assert.equal(sessionState(box, held), 'active', 'readers, and a server refused for the lock, leave the session alone');
  // Opened for writing and kept open, writing nothing yet: found through its descriptors.
  const writer = spawn('sh', ['-c', 'exec 3<>"$1"; echo ready; exec sleep 60', 'sh', held], { stdio: ['ignore', 'pipe', 'ignore'] });
  cleanupOf(t).after(() => void writer.kill('SIGKILL'));
  await new Promise((resolve) => writer.stdout!.once('data', resolve));
  await until('the session of the image held open for writing failed', () => sessionState(box, held) === 'failed');
  writer.kill('SIGKILL');
  await client.end();

  const loopClient = await heldClient(t, box, looped);
  const loop = spawnSync('losetup', ['-f', '--show', looped], { encoding: 'utf8', timeout: 10_000 });
  assert.equal(loop.status, 0, loop.stderr);
  cleanupOf(t).after(() => void spawnSync('losetup', ['-d', loop.stdout.trim()]));
  await until('the session of the image behind a new loop device failed', () => sessionState(box, looped) === 'failed');
  await loopClient.end();
  const reasons = sessionDirs(box).map((d) => (JSON.parse(fs.readFileSync(path.join(box.snapshotRoot, d, 'manifest.json'), 'utf8')) as { failedReason?: string }).failedReason ?? '');
  t.diagnostic(reasons.join('\n'));
  assert.ok(reasons.some((r) => new RegExp(`^${held} was opened for writing by pid \\d+ \\(sleep\\)`).test(r)), reasons.join('\n'));
  assert.ok(reasons.some((r) => new RegExp(`^${looped} was opened by pid \\d+.* while bdsnap held it, and writes through what it left go around copy-before-write and the change map: .*/dev/loop\\d+`).test(r)), reasons.join('\n'));
});
