/**
 * A device the daemon holds open (a snapshot keeps it open between clients) can be changed
 * under it by name: replaced with mv, or attached to a loop device that writes around bdsnap.
 * A new hold must then be refused with what to do, never served from the old, unnamed file nor
 * beside another writer. Through the real daemon, CLI and NBD clients.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { NbdClient } from '../../src/nbd/client.js';
import { cleanupOf } from '../../testkit/cleanup.js';
import { cli, ok, sandbox, startDaemon, type Sandbox } from '../../testkit/daemon.js';
import { makeImage } from '../../testkit/files.js';
import { needs } from '../../testkit/needs.js';

const DEVICE_BYTES = 8 << 20;

function connect(box: Sandbox, device: string): Promise<NbdClient> {
  return NbdClient.connect({ socketPath: path.join(box.runDir, 'nbd.sock'), exportName: device, timeoutMs: 15_000 });
}

function snapshotCreate(box: Sandbox, device: string): string {
  return (JSON.parse(ok(box, ['snapshot', 'create', device, '--json'])) as { id: string }).id;
}

test('an image replaced while a snapshot holds it: new clients and snapshots are refused until the snapshot ends, then the new file is served', { timeout: 120_000 }, async (t) => {
  const box = sandbox(t);
  const image = fs.realpathSync(makeImage(path.join(box.top, 'a.img'), DEVICE_BYTES, 'random', 1));
  const replacement = makeImage(path.join(box.top, 'new.img'), DEVICE_BYTES, 'random', 2);
  const newContent = fs.readFileSync(replacement);
  await startDaemon(t, { sandbox: box, activate: [image] });
  const snapshot = snapshotCreate(box, image);
  fs.renameSync(replacement, image);

  await assert.rejects(connect(box, image), /refused/, 'a client of the replaced name is refused');
  const second = cli(box, ['snapshot', 'create', image]);
  assert.equal(second.status, 1, 'a snapshot of the replaced name is refused');
  assert.match(second.stderr, /was replaced while held.*end those holds/);
  assert.match(second.stderr, /1 snapshot\(s\)/);
  assert.deepEqual(fs.readFileSync(image), newContent, 'nothing reached the new file');

  ok(box, ['snapshot', 'destroy', snapshot]);
  const client = await connect(box, image);
  const data = randomBytes(4096);
  await client.write(data, 1 << 20);
  await client.flush();
  const back = Buffer.alloc(4096);
  await client.read(back, 0);
  await client.close();
  assert.ok(back.equals(newContent.subarray(0, 4096)), 'the client reads the new file');
  assert.ok(fs.readFileSync(image).subarray(1 << 20, (1 << 20) + 4096).equals(data), 'and its write is in the file the name names');
});

test('an image that is a loop device\'s backing file: clients and snapshots are refused, naming the loop device', { timeout: 120_000 }, async (t) => {
  if (!needs(t, { root: true, tools: ['losetup'] })) return;
  const box = sandbox(t);
  const image = fs.realpathSync(makeImage(path.join(box.top, 'a.img'), DEVICE_BYTES, 'random', 3));
  await startDaemon(t, { sandbox: box, activate: [image] });

  // Attached before the daemon opens the image: the first open is refused.
  let loop = execFileSync('losetup', ['--find', '--show', image], { encoding: 'utf8' }).trim();
  let attached = true;
  const detach = (): void => {
    if (attached) execFileSync('losetup', ['-d', loop]);
    attached = false;
  };
  cleanupOf(t).after(detach);
  await assert.rejects(connect(box, image), /refused/);
  const refused = cli(box, ['snapshot', 'create', image]);
  assert.equal(refused.status, 1);
  assert.match(refused.stderr, new RegExp(`is the backing file of ${loop}.*losetup -d ${loop}`));
  detach();

  // Attached while a snapshot holds the image open: the next hold is refused.
  const snapshot = snapshotCreate(box, image);
  loop = execFileSync('losetup', ['--find', '--show', image], { encoding: 'utf8' }).trim();
  attached = true;
  await assert.rejects(connect(box, image), /refused/);
  const again = cli(box, ['snapshot', 'create', image]);
  assert.equal(again.status, 1);
  assert.match(again.stderr, new RegExp(`is the backing file of ${loop}`));
  detach();
  const client = await connect(box, image);
  await client.write(randomBytes(4096), 0);
  await client.close();
  ok(box, ['snapshot', 'destroy', snapshot]);
});

interface SnapshotInfo { state: string; reason: string | null }

function snapshotInfo(box: Sandbox, id: string): SnapshotInfo {
  return JSON.parse(ok(box, ['snapshot', 'info', id, '--json'])) as SnapshotInfo;
}

function generationOf(box: Sandbox, device: string): string {
  return (JSON.parse(ok(box, ['cbt', 'info', device, '--json'])) as { generation: string }).generation;
}

/** Write 4 KiB into the image file around bdsnap, then set its mtime back to what it was (the kernel moves the ctime). */
function writeAroundAndSetBack(image: string, at: number): void {
  const before = fs.statSync(image);
  const fd = fs.openSync(image, 'r+');
  fs.writeSync(fd, randomBytes(4096), 0, 4096, at);
  fs.closeSync(fd);
  fs.utimesSync(image, before.atime, before.mtime);
}

test('an image written around bdsnap while a snapshot holds it idle: the snapshot fails and the change map starts again, within seconds', { timeout: 60_000 }, async (t) => {
  const box = sandbox(t);
  const image = fs.realpathSync(makeImage(path.join(box.top, 'a.img'), DEVICE_BYTES, 'random', 4));
  await startDaemon(t, { sandbox: box, activate: [image] });
  const snapshot = snapshotCreate(box, image);
  const generation = generationOf(box, image);
  writeAroundAndSetBack(image, 1 << 20);

  const deadline = Date.now() + 10_000;
  let info = snapshotInfo(box, snapshot);
  while (info.state !== 'failed' && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 200));
    info = snapshotInfo(box, snapshot);
  }
  assert.equal(info.state, 'failed', `the snapshot no longer holds its point: ${JSON.stringify(info)}`);
  assert.notEqual(generationOf(box, image), generation, 'a new change-map generation: the next backup is full');
});

test('a daemon killed while it held an image idle, the image written at once with its mtime set back: the restart sees it', { timeout: 60_000 }, async (t) => {
  const box = sandbox(t);
  const image = fs.realpathSync(makeImage(path.join(box.top, 'a.img'), DEVICE_BYTES, 'random', 5));
  const first = await startDaemon(t, { sandbox: box, activate: [image] });
  const snapshot = snapshotCreate(box, image);
  const generation = generationOf(box, image);
  first.server.kill('SIGKILL');
  await first.server.stop();
  writeAroundAndSetBack(image, 2 << 20);
  await startDaemon(t, { sandbox: box, password: false });
  assert.equal(snapshotInfo(box, snapshot).state, 'failed', 'the snapshot of a file changed around bdsnap is failed');
  assert.notEqual(generationOf(box, image), generation, 'a new change-map generation');
});

test('a failed snapshot takes no more originals: its storage does not grow while the device is written, live and after a restart', { timeout: 120_000 }, async (t) => {
  const box = sandbox(t);
  const bytes = 32 << 20;
  const failing = fs.realpathSync(makeImage(path.join(box.top, 'a.img'), bytes, 'random', 6));
  const healthy = fs.realpathSync(makeImage(path.join(box.top, 'b.img'), bytes, 'random', 7));
  let daemon = await startDaemon(t, { sandbox: box, activate: [failing, healthy] });
  const failed = snapshotCreate(box, failing);
  const kept = snapshotCreate(box, healthy);
  writeAroundAndSetBack(failing, 1 << 20);
  const deadline = Date.now() + 10_000;
  while (snapshotInfo(box, failed).state !== 'failed') {
    assert.ok(Date.now() < deadline, 'the snapshot of the image written around bdsnap fails');
    await new Promise((resolve) => setTimeout(resolve, 200));
  }

  /** Write 8 MiB of new data at `at` to both devices; how much each snapshot's storage grew. */
  const writeBoth = async (at: number): Promise<{ failed: number; kept: number }> => {
    const before = { failed: usedBytes(box, failed), kept: usedBytes(box, kept) };
    for (const device of [failing, healthy]) {
      const client = await connect(box, device);
      for (let offset = at; offset < at + (8 << 20); offset += 1 << 20) await client.write(randomBytes(1 << 20), offset);
      await client.flush();
      await client.close();
    }
    return { failed: usedBytes(box, failed) - before.failed, kept: usedBytes(box, kept) - before.kept };
  };
  const checkGrowth = (grown: { failed: number; kept: number }, when: string): void => {
    assert.ok(grown.kept >= 8 << 20, `${when}: the healthy snapshot keeps the 8 MiB of originals (grew ${grown.kept} bytes)`);
    assert.equal(grown.failed, 0, `${when}: the failed snapshot's storage does not grow`);
  };

  checkGrowth(await writeBoth(8 << 20), 'live');
  await assert.rejects(readImage(box, failing, failed), /EIO|failed/, 'its image answers EIO');

  await daemon.server.stop();
  daemon = await startDaemon(t, { sandbox: box, password: false });
  assert.equal(snapshotInfo(box, failed).state, 'failed');
  checkGrowth(await writeBoth(16 << 20), 'after a restart');

  // A snapshot recorded failed whose storage does not say so (its state file gone): still no originals.
  const dir = (JSON.parse(ok(box, ['snapshot', 'info', failed, '--json'])) as { storage: { dirs: string[] } }).storage.dirs[0]!;
  await daemon.server.stop();
  fs.rmSync(path.join(dir, `${failed}.state`), { force: true });
  await startDaemon(t, { sandbox: box, password: false });
  assert.equal(snapshotInfo(box, failed).state, 'failed');
  checkGrowth(await writeBoth(24 << 20), 'after a restart with the storage not marked');
  await assert.rejects(readImage(box, failing, failed), /EIO|failed/, 'its image still answers EIO');
  ok(box, ['snapshot', 'destroy', failed]);
  ok(box, ['snapshot', 'destroy', kept]);
});

function usedBytes(box: Sandbox, id: string): number {
  return (JSON.parse(ok(box, ['snapshot', 'info', id, '--json'])) as { storage: { usedBytes: number } }).storage.usedBytes;
}

async function readImage(box: Sandbox, device: string, id: string): Promise<void> {
  const client = await connect(box, `${device}@${id}`);
  try {
    await client.read(Buffer.alloc(4096), 0);
  } finally {
    await client.close();
  }
}
