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
