import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { FileDevice } from '../../src/device/file-device.js';
import { BdsnapError } from '../../src/errors.js';
import { needs } from '../helpers/needs.js';

function tempDir(t: { after: (fn: () => void) => void }): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-filedev-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

test('FileDevice reads back what it wrote and refuses ranges past the end', async (t) => {
  const dir = tempDir(t);
  const image = path.join(dir, 'a.img');
  fs.writeFileSync(image, Buffer.alloc(1 << 20));
  const dev = await FileDevice.open(image);
  t.after(() => dev.close());
  assert.equal(dev.size, 1 << 20);
  const data = Buffer.alloc(8192, 0xab);
  await dev.write(data, 4096, { fua: true });
  const back = Buffer.alloc(8192);
  await dev.read(back, 4096);
  assert.deepEqual(back, data);
  await dev.zero(4096, 4096);
  await dev.read(back, 4096);
  assert.equal(back.subarray(0, 4096).every((b) => b === 0), true);
  assert.equal(back.subarray(4096).every((b) => b === 0xab), true);
  await assert.rejects(dev.write(data, (1 << 20) - 4096), (e: unknown) => e instanceof BdsnapError && e.code === 'ENOSPC');
  await assert.rejects(dev.read(back, (1 << 20) - 4096), (e: unknown) => e instanceof BdsnapError && e.code === 'EINVAL');
});

test('a second open of the same image fails with EBUSY until the first is closed', async (t) => {
  const dir = tempDir(t);
  const image = path.join(dir, 'b.img');
  fs.writeFileSync(image, Buffer.alloc(65536));
  const first = await FileDevice.open(image);
  await assert.rejects(FileDevice.open(image), (e: unknown) => e instanceof BdsnapError && e.code === 'EBUSY' && /already open/.test(e.message));
  // A hard link is the same file: still refused.
  fs.linkSync(image, path.join(dir, 'link.img'));
  await assert.rejects(FileDevice.open(path.join(dir, 'link.img')), (e: unknown) => e instanceof BdsnapError && e.code === 'EBUSY');
  await first.close();
  const second = await FileDevice.open(image);
  await second.close();
});

test('opening a directory or a missing path says what is wrong', async (t) => {
  const dir = tempDir(t);
  await assert.rejects(FileDevice.open(dir), (e: unknown) => e instanceof BdsnapError && e.code === 'EINVAL');
  await assert.rejects(FileDevice.open(path.join(dir, 'nope.img')), (e: unknown) => e instanceof BdsnapError && e.code === 'ENOENT');
});

test('a block device (loop) reports its size from sysfs', async (t) => {
  if (!needs(t, { root: true, tools: ['losetup'] })) return;
  const { execFileSync } = await import('node:child_process');
  const dir = tempDir(t);
  const image = path.join(dir, 'c.img');
  fs.writeFileSync(image, Buffer.alloc(3 << 20));
  const loop = execFileSync('losetup', ['-f', '--show', image], { encoding: 'utf8' }).trim();
  t.after(() => execFileSync('losetup', ['-d', loop]));
  const dev = await FileDevice.open(loop);
  try {
    assert.equal(dev.size, 3 << 20);
    await dev.write(Buffer.alloc(4096, 7), 0, { fua: true });
  } finally {
    await dev.close();
  }
  assert.equal(fs.readFileSync(image)[0], 7);
});
