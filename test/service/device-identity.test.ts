/**
 * A device is what it is, not what names it. Real daemon, real CLI, real kernel objects:
 * - a hard link and a bind-mounted path of a registered image are refused, at activation, at
 *   `bdsnap mount`, and at the NBD export's open when the link was made after both names were
 *   registered; one file gets one session chain;
 * - an image replaced (`mv new.img a.img`) while a snapshot holds it open resets its change map
 *   at the detach, so the next backup reads it; after a restart the snapshot is failed;
 * - a second node (mknod) of a registered block device is refused; a loop device pointed at
 *   another file while the daemon is stopped starts its map again.
 */

import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { formatDevT } from '../../src/host/dev-t.js';
import { NbdClient } from '../../src/nbd/client.js';
import { cleanupOf } from '../../testkit/cleanup.js';
import { TEST_PASSWORD, cli, ok, sandbox, startDaemon, type Sandbox } from '../../testkit/daemon.js';
import { makeImage, sha256File } from '../../testkit/files.js';
import { needs } from '../../testkit/needs.js';
import { sessionDirs } from './helpers.js';

const DEVICE_BYTES = 8 << 20;

interface Event {
  type: string;
  device?: string;
  snapshot?: string;
  details: { reason?: string; detail?: string };
}

function events(box: Sandbox): Event[] {
  return ok(box, ['events', '--json']).trim().split('\n').filter(Boolean).map((l) => JSON.parse(l) as Event);
}

function activate(box: Sandbox, device: string): ReturnType<typeof cli> {
  return cli(box, ['activate', device, '--password-stdin'], `${TEST_PASSWORD}\n`);
}

async function writeThroughDaemon(box: Sandbox, device: string, offsetBytes: number): Promise<void> {
  const client = await NbdClient.connect({ socketPath: path.join(box.runDir, 'nbd.sock'), exportName: device });
  try {
    await client.write(randomBytes(64 << 10), offsetBytes);
    await client.flush();
  } finally {
    await client.close();
  }
}

function generation(box: Sandbox, device: string): string {
  return (JSON.parse(ok(box, ['cbt', 'info', device, '--json'])) as { generation: string }).generation;
}

test('a hard link and a bind-mounted path of a registered image are the same device: refused with the registered name', { timeout: 120_000 }, async (t: TestContext) => {
  if (!needs(t, { root: true, tools: ['mount', 'umount'] })) return;
  const box = sandbox(t);
  const images = path.join(box.top, 'images');
  fs.mkdirSync(images);
  const a = makeImage(path.join(images, 'a.img'), DEVICE_BYTES, 'random', 1);
  const b = path.join(images, 'b.img');
  fs.linkSync(a, b);
  const bound = path.join(box.top, 'bound');
  fs.mkdirSync(bound);
  execFileSync('mount', ['--bind', images, bound]);
  cleanupOf(t).after(() => execFileSync('umount', ['-l', bound]));
  await startDaemon(t, { sandbox: box });

  assert.equal(activate(box, a).status, 0);
  for (const other of [b, path.join(bound, 'a.img')]) {
    const refused = activate(box, other);
    assert.equal(refused.status, 1, `activate ${other}: ${refused.stdout}`);
    assert.match(refused.stderr, new RegExp(`${other.replace(/[.]/g, '\\.')} is the same file as the registered ${a.replace(/[.]/g, '\\.')}; use that name`));
  }
  const mnt = path.join(box.top, 'mnt');
  fs.mkdirSync(mnt);
  const mount = cli(box, ['mount', b, mnt]);
  assert.equal(mount.status, 1, 'bdsnap mount of the second name is refused');
  assert.match(mount.stderr, /is the same file as the registered/);
  // Not registered, so not served either.
  await assert.rejects(writeThroughDaemon(box, b, 0));
  const status = JSON.parse(ok(box, ['status', '--json'])) as { devices: Array<{ device: string }> };
  assert.deepEqual(status.devices.map((d) => d.device), [a]);
});

test('two names registered apart, then made one file: the second name is refused at open, one session chain', { timeout: 120_000 }, async (t: TestContext) => {
  const box = sandbox(t);
  const a = makeImage(path.join(box.top, 'a.img'), DEVICE_BYTES, 'random', 1);
  const b = makeImage(path.join(box.top, 'b.img'), DEVICE_BYTES, 'random', 2);
  await startDaemon(t, { sandbox: box, activate: [a, b] });
  // b.img now names a.img's file.
  fs.rmSync(b);
  fs.linkSync(a, b);

  await writeThroughDaemon(box, a, 0);
  await assert.rejects(writeThroughDaemon(box, b, 1 << 20), 'the export of the second name is not opened');
  assert.equal(sessionDirs(box).length, 1, `one file, one chain: ${sessionDirs(box).join(', ')}`);
  const snap = cli(box, ['snapshot', 'create', b]);
  assert.equal(snap.status, 1);
  assert.match(snap.stderr, /is the same file as the registered/);
});

test('an image replaced while a snapshot holds it open: its map starts again at the detach, the next backup restores to it', { timeout: 180_000 }, async (t: TestContext) => {
  const box = sandbox(t);
  const image = makeImage(path.join(box.top, 'a.img'), DEVICE_BYTES, 'random', 3);
  const replacement = makeImage(path.join(box.top, 'new.img'), DEVICE_BYTES, 'random', 4);
  const daemon = await startDaemon(t, { sandbox: box, password: false });
  const repo = path.join(box.top, 'repo');
  ok(box, ['backup', 'init', '--repo', repo]);
  ok(box, ['backup', 'create', image, '--repo', repo]);
  const before = generation(box, image);

  const snapshot = (JSON.parse(ok(box, ['snapshot', 'create', image, '--json'])) as { id: string }).id;
  fs.renameSync(replacement, image);
  ok(box, ['snapshot', 'destroy', snapshot]);
  // The detach marks the snapshot failed, which writes its record: the destroy waits for that
  // write before it removes the directory, so neither fails and nothing is left.
  assert.equal(fs.existsSync(path.join(box.stateDir, 'snapshots', snapshot)), false, 'the snapshot directory is gone');
  assert.deepEqual(daemon.logLines().filter((l) => l.event === 'snapshot-record-write-failed'), [], 'no record write met the removal');

  assert.notEqual(generation(box, image), before, 'the map of the replaced file starts again');
  const reset = events(box).find((e) => e.type === 'cbt-reset' && e.device === image);
  assert.match(reset?.details.detail ?? '', /replaced while the daemon held it open/);
  const created = JSON.parse(ok(box, ['backup', 'create', image, '--repo', repo, '--json'])) as { id: string; devices: Array<{ kind: string }> };
  assert.equal(created.devices[0]?.kind, 'full');
  const out = path.join(box.top, 'restored.img');
  ok(box, ['backup', 'restore', '--repo', repo, created.id, image, '--output', out]);
  assert.equal(await sha256File(out), await sha256File(image));
});

test('an image replaced under a snapshot, then a daemon restart: the snapshot is failed with the reason and an event', { timeout: 120_000 }, async (t: TestContext) => {
  const box = sandbox(t);
  const image = makeImage(path.join(box.top, 'a.img'), DEVICE_BYTES, 'random', 5);
  const replacement = makeImage(path.join(box.top, 'new.img'), DEVICE_BYTES, 'random', 6);
  const first = await startDaemon(t, { sandbox: box, password: false });
  const snapshot = (JSON.parse(ok(box, ['snapshot', 'create', image, '--json'])) as { id: string }).id;
  fs.renameSync(replacement, image);
  await first.server.stop();
  await startDaemon(t, { sandbox: box, password: false });

  const info = JSON.parse(ok(box, ['snapshot', 'info', snapshot, '--json'])) as { state: string; reason: string | null };
  assert.equal(info.state, 'failed', `the snapshot of a replaced file does not serve the new one: ${JSON.stringify(info)}`);
  assert.match(info.reason ?? '', /a\.img/);
  assert.ok(events(box).some((e) => e.type === 'snapshot-failed' && e.snapshot === snapshot), 'an event says so');
});

function withLoop(t: TestContext, file: string): string {
  const loop = execFileSync('losetup', ['--find', '--show', file], { encoding: 'utf8' }).trim();
  cleanupOf(t).after(() => {
    spawnSync('losetup', ['-d', loop]);
  });
  return loop;
}

test('a second device node of a registered block device is the same device: refused', { timeout: 120_000 }, async (t: TestContext) => {
  if (!needs(t, { root: true, tools: ['losetup'] })) return;
  const box = sandbox(t);
  const loop = withLoop(t, makeImage(path.join(box.top, 'disk.img'), DEVICE_BYTES, 'random', 7));
  const rdev = fs.statSync(loop).rdev;
  const second = path.join(box.top, 'second-node');
  execFileSync('mknod', [second, 'b', ...formatDevT(rdev).split(':')]);
  assert.equal(fs.statSync(second).rdev, rdev);
  await startDaemon(t, { sandbox: box });

  assert.equal(activate(box, loop).status, 0);
  const refused = activate(box, second);
  assert.equal(refused.status, 1, refused.stdout);
  assert.match(refused.stderr, new RegExp(`second-node is the same block device \\(\\d+:\\d+\\) as the registered ${loop}; use that name`));
});

test('a loop device pointed at another file while the daemon is stopped: its map starts again', { timeout: 120_000 }, async (t: TestContext) => {
  if (!needs(t, { root: true, tools: ['losetup'] })) return;
  const box = sandbox(t);
  const first = makeImage(path.join(box.top, 'first.img'), DEVICE_BYTES, 'random', 8);
  const other = makeImage(path.join(box.top, 'other.img'), DEVICE_BYTES, 'random', 9);
  const loop = withLoop(t, first);
  let daemon = await startDaemon(t, { sandbox: box });
  assert.equal(activate(box, loop).status, 0);
  await writeThroughDaemon(box, loop, 0);
  const before = generation(box, loop);
  await daemon.server.stop();
  execFileSync('losetup', ['-d', loop]);
  execFileSync('losetup', [loop, other]);
  daemon = await startDaemon(t, { sandbox: box, password: false });

  assert.notEqual(generation(box, loop), before);
  const reset = events(box).find((e) => e.type === 'cbt-reset' && e.device === loop);
  assert.match(reset?.details.detail ?? '', /backing file/);
});

test('a loop device and the image behind it are one device: whichever is registered second is refused', { timeout: 120_000 }, async (t: TestContext) => {
  if (!needs(t, { root: true, tools: ['losetup'] })) return;
  const box = sandbox(t);
  const image = fs.realpathSync(makeImage(path.join(box.top, 'disk.img'), DEVICE_BYTES, 'random', 8));
  const loop = withLoop(t, image);
  await startDaemon(t, { sandbox: box });

  assert.equal(activate(box, image).status, 0);
  const loopRefused = activate(box, loop);
  assert.equal(loopRefused.status, 1, loopRefused.stdout);
  assert.match(loopRefused.stderr, new RegExp(`${loop} is a loop device over ${image}, and the other one is registered already: the two are one device; use ${image}`));

  // The other way round, on a fresh daemon.
  const box2 = sandbox(t);
  const image2 = fs.realpathSync(makeImage(path.join(box2.top, 'disk.img'), DEVICE_BYTES, 'random', 9));
  const loop2 = withLoop(t, image2);
  await startDaemon(t, { sandbox: box2 });
  assert.equal(activate(box2, loop2).status, 0);
  const imageRefused = activate(box2, image2);
  assert.equal(imageRefused.status, 1, imageRefused.stdout);
  assert.match(imageRefused.stderr, /is a loop device over .*; use \/dev\/loop\d+/);
});
