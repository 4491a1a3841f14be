/**
 * A device changed while the daemon did not serve it must not keep its change map: the next
 * backup has to read the change, or the backup it records holds content the device does not.
 * Real daemon, real CLI, real loop device: full backup, a write through the daemon, an
 * incremental, then the device is put back to the full backup behind the daemon's back
 * (`bdsnap backup restore` in place); the next backup must restore to exactly the device.
 * Also an image file changed outside bdsnap whose mtime is then set back (its ctime moved).
 */

import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { NbdClient } from '../../src/nbd/client.js';
import { cleanupOf } from '../../testkit/cleanup.js';
import { ok, sandbox, startDaemon, type RunningDaemon, type Sandbox } from '../../testkit/daemon.js';
import { makeImage, sha256, sha256File } from '../../testkit/files.js';
import { needs } from '../../testkit/needs.js';

const DEVICE_BYTES = 16 << 20;

interface Created {
  id: string;
  devices: Array<{ device: string; kind: 'full' | 'incremental'; why: string; readBytes: number; sizeBytes: number }>;
}

interface Event {
  type: string;
  device?: string;
  details: { reason?: string; detail?: string };
}

function backupCreate(box: Sandbox, repo: string, device: string): Created['devices'][number] & { id: string } {
  const created = JSON.parse(ok(box, ['backup', 'create', device, '--repo', repo, '--json'])) as Created;
  return { id: created.id, ...created.devices[0]! };
}

/** 64 KiB of fresh bytes written through the daemon's NBD export, flushed. */
async function writeThroughDaemon(box: Sandbox, device: string, offsetBytes: number): Promise<void> {
  const client = await NbdClient.connect({ socketPath: path.join(box.runDir, 'nbd.sock'), exportName: device });
  await client.write(randomBytes(64 << 10), offsetBytes);
  await client.flush();
  await client.close();
}

function cbtResets(box: Sandbox, device: string): Event[] {
  return ok(box, ['events', '--json']).trim().split('\n').filter(Boolean).map((l) => JSON.parse(l) as Event)
    .filter((e) => e.type === 'cbt-reset' && e.device === device);
}

/**
 * The last backup must have read the change (a full backup, or some bytes), and restore to
 * exactly what the device holds.
 */
async function assertBackupIsDevice(box: Sandbox, repo: string, device: string, last: Created['devices'][number] & { id: string }): Promise<void> {
  const out = path.join(box.top, `restored-${last.id}.img`);
  ok(box, ['backup', 'restore', '--repo', repo, last.id, device, '--output', out]);
  assert.equal(await sha256File(out), await sha256File(device), `the backup restores to exactly what the device holds (${last.kind}, ${last.why}, read ${last.readBytes} bytes)`);
  assert.ok(last.kind === 'full' || last.readBytes > 0, `the backup after the change read nothing: ${last.kind}, ${last.why}, ${last.readBytes} bytes`);
}

for (const stopDaemon of [false, true]) {
  test(`a loop device put back by backup restore${stopDaemon ? ' while the daemon is stopped' : ' while the daemon runs idle'}: the next backup reads it`, { timeout: 180_000 }, async (t: TestContext) => {
    if (!needs(t, { root: true, tools: ['losetup'] })) return;
    const box = sandbox(t);
    const image = makeImage(path.join(box.top, 'disk.img'), DEVICE_BYTES, 'random', 7);
    const loop = execFileSync('losetup', ['--find', '--show', image], { encoding: 'utf8' }).trim();
    // Pushed before the daemon starts, so it runs after the daemon has stopped.
    cleanupOf(t).after(() => execFileSync('losetup', ['-d', loop]));
    let daemon: RunningDaemon = await startDaemon(t, { sandbox: box, password: false });
    const repo = path.join(box.top, 'repo');
    ok(box, ['backup', 'init', '--repo', repo]);

    const b1 = backupCreate(box, repo, loop);
    assert.equal(b1.kind, 'full');
    await writeThroughDaemon(box, loop, 1 << 20);
    const b2 = backupCreate(box, repo, loop);
    assert.equal(b2.kind, 'incremental', `${b2.why} ${JSON.stringify(cbtResets(box, loop))}`);
    assert.ok(b2.readBytes > 0);

    if (stopDaemon) await daemon.server.stop();
    ok(box, ['backup', 'restore', '--repo', repo, b1.id, loop]);
    if (stopDaemon) daemon = await startDaemon(t, { sandbox: box, password: false });

    const b3 = backupCreate(box, repo, loop);
    await assertBackupIsDevice(box, repo, loop, b3);
    const resets = cbtResets(box, loop);
    assert.ok(resets.some((e) => e.details.reason === 'changed-outside'), `a cbt-reset event says why: ${JSON.stringify(resets)}`);
  });
}

test('an image file changed outside bdsnap with its mtime set back: the next backup reads it', { timeout: 120_000 }, async (t: TestContext) => {
  if (!needs(t, { tools: ['touch'] })) return;
  const box = sandbox(t);
  const image = fs.realpathSync(makeImage(path.join(box.top, 'disk.img'), DEVICE_BYTES, 'random', 9));
  const daemon = await startDaemon(t, { sandbox: box, password: false });
  const repo = path.join(box.top, 'repo');
  ok(box, ['backup', 'init', '--repo', repo]);
  const b1 = backupCreate(box, repo, image);
  assert.equal(b1.kind, 'full');
  await writeThroughDaemon(box, image, 2 << 20);
  const b2 = backupCreate(box, repo, image);
  assert.equal(b2.kind, 'incremental', b2.why);
  await daemon.server.stop();

  const before = fs.statSync(image, { bigint: true });
  const fd = fs.openSync(image, 'r+');
  const change = randomBytes(4096);
  fs.writeSync(fd, change, 0, change.length, 5 << 20);
  fs.closeSync(fd);
  const mtime = `@${before.mtimeNs / 1_000_000_000n}.${(before.mtimeNs % 1_000_000_000n).toString().padStart(9, '0')}`;
  const touched = spawnSync('touch', ['-m', '-d', mtime, image], { encoding: 'utf8' });
  assert.equal(touched.status, 0, touched.stderr);
  const after = fs.statSync(image, { bigint: true });
  assert.equal(after.mtimeNs, before.mtimeNs, 'the mtime is back where it was');
  assert.equal(after.size, before.size);
  assert.notEqual(sha256(fs.readFileSync(image)), '', 'the image reads');

  await startDaemon(t, { sandbox: box, password: false });
  const b3 = backupCreate(box, repo, image);
  await assertBackupIsDevice(box, repo, image, b3);
  const resets = cbtResets(box, image);
  assert.ok(resets.some((e) => e.details.reason === 'changed-outside' && /ctime/.test(e.details.detail ?? '')), `a cbt-reset event names the ctime: ${JSON.stringify(resets)}`);
});

test('a loop device served when the daemon was killed: its map starts again, and the next backup restores to the device', { timeout: 180_000 }, async (t: TestContext) => {
  if (!needs(t, { root: true, tools: ['losetup'] })) return;
  const box = sandbox(t);
  const image = makeImage(path.join(box.top, 'disk.img'), DEVICE_BYTES, 'random', 11);
  const loop = execFileSync('losetup', ['--find', '--show', image], { encoding: 'utf8' }).trim();
  cleanupOf(t).after(() => execFileSync('losetup', ['-d', loop]));
  const daemon = await startDaemon(t, { sandbox: box, password: false });
  const repo = path.join(box.top, 'repo');
  ok(box, ['backup', 'init', '--repo', repo]);
  assert.equal(backupCreate(box, repo, loop).kind, 'full');

  // Killed while a client holds the device: the counters at its last clean close are stale.
  const client = await NbdClient.connect({ socketPath: path.join(box.runDir, 'nbd.sock'), exportName: loop });
  await client.write(randomBytes(64 << 10), 3 << 20);
  await client.flush();
  daemon.server.kill('SIGKILL');
  await daemon.server.stop();
  await client.close().catch(() => undefined);
  // Meanwhile someone else writes the device.
  const fd = fs.openSync(loop, 'r+');
  fs.writeSync(fd, randomBytes(4096), 0, 4096, 9 << 20);
  fs.fsyncSync(fd);
  fs.closeSync(fd);

  await startDaemon(t, { sandbox: box, password: false });
  const after = backupCreate(box, repo, loop);
  await assertBackupIsDevice(box, repo, loop, after);
  const resets = cbtResets(box, loop);
  assert.ok(resets.some((e) => e.details.reason === 'cannot-verify' && /without closing the map/.test(e.details.detail ?? '')), `a cbt-reset event says why: ${JSON.stringify(resets)}`);
});
