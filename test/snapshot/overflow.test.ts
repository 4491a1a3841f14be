/**
 * Overflow never harms the device: a session that hits its size limit or a full snapshot disk is
 * marked failed with the reason, writes go on to the device untouched, and restore refuses it.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { FileDevice } from '../../src/device/file-device.js';
import { readManifest } from '../../src/snapshot/format.js';
import { CowDevice, restore, type SessionEvent } from '../../src/snapshot/index.js';
import { needs } from '../../testkit/needs.js';
import { makeImage } from '../../testkit/files.js';
import { isError, tempDir } from './helpers.js';

async function writeMany(cow: CowDevice, model: Buffer, count: number, maxLength: number): Promise<void> {
  for (let i = 0; i < count; i++) {
    const length = 1 + ((i * 7777) % maxLength);
    const offset = (i * 1_234_567) % (model.length - length);
    const data = randomBytes(length);
    await cow.write(data, offset, { fua: i % 5 === 0 });
    data.copy(model, offset);
    if (i % 3 === 0) {
      await cow.zero(offset, Math.min(4096, length));
      model.fill(0, offset, offset + Math.min(4096, length));
    }
  }
}

test('a tiny size limit fails the session; the device gets exactly what was written; restore refuses', async (t) => {
  const dir = tempDir(t);
  const image = makeImage(path.join(dir, 'disk.img'), 8 << 20, 'random', 1);
  const model = fs.readFileSync(image);
  const root = path.join(dir, 'snap');
  const events: SessionEvent[] = [];
  const dev = await FileDevice.open(image);
  const cow = CowDevice.create(dev, { devicePath: image, snapshotRoot: root, chunkSize: 16384, sizeLimitBytes: 200_000, onEvent: (e) => events.push(e) });
  await writeMany(cow, model, 60, 100_000);
  assert.equal(cow.state, 'failed');
  assert.match(cow.stats().failedReason ?? '', /size limit/);
  assert.ok(cow.stats().storeBytes <= 200_000);
  const summary = await cow.close();
  await dev.close();
  assert.equal(summary?.state, 'failed');
  assert.deepEqual(fs.readFileSync(image), model);
  const manifest = await readManifest(cow.sessionDir!);
  assert.equal(manifest.state, 'failed');
  assert.match(manifest.failedReason ?? '', /size limit/);
  assert.deepEqual(events.map((e) => e.type), ['session-start', 'session-failed', 'session-end']);
  await assert.rejects(restore(cow.sessionDir!), isError('ESESSION', /failed \(size limit/));
  await assert.rejects(restore(cow.sessionDir!, { force: true }), isError('ESESSION'));
  assert.deepEqual(fs.readFileSync(image), model, 'a refused restore writes nothing');
});

test('a full snapshot disk fails the session and leaves the device fine', async (t) => {
  if (!needs(t, { root: true, tools: ['losetup', 'mkfs.ext4', 'mount', 'umount'] })) return;
  // One hook, undone in reverse: device, mount, loop device, then the directory.
  const undo: Array<() => unknown> = [];
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-full-'));
  undo.push(() => fs.rmSync(dir, { recursive: true, force: true }));
  t.after(async () => {
    for (const step of undo.reverse()) await step();
  });
  const fsImage = path.join(dir, 'small-fs.img');
  makeImage(fsImage, 4 << 20, 'zero');
  execFileSync('mkfs.ext4', ['-q', '-F', '-m', '0', fsImage]);
  const loop = execFileSync('losetup', ['-f', '--show', fsImage], { encoding: 'utf8' }).trim();
  undo.push(() => execFileSync('losetup', ['-d', loop]));
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  execFileSync('mount', [loop, mnt]);
  undo.push(() => execFileSync('umount', [mnt]));

  const image = makeImage(path.join(dir, 'disk.img'), 32 << 20, 'random', 2);
  const model = fs.readFileSync(image);
  const snapshotRoot = path.join(mnt, 'snapshot');
  const dev = await FileDevice.open(image);
  undo.push(() => dev.close());
  const cow = CowDevice.create(dev, { devicePath: image, snapshotRoot, chunkSize: 65536, durability: 'strict' });
  await writeMany(cow, model, 80, 1 << 20);
  assert.equal(cow.state, 'failed');
  assert.match(cow.stats().failedReason ?? '', /disk is full/);
  const summary = await cow.close();
  assert.equal(summary?.state, 'failed');
  assert.deepEqual(fs.readFileSync(image), model);
  const manifest = await readManifest(cow.sessionDir!);
  assert.equal(manifest.state, 'failed');
  await dev.close();
  await assert.rejects(restore(cow.sessionDir!), isError('ESESSION', /disk is full/));
  assert.deepEqual(fs.readFileSync(image), model);
});
