import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { FileDevice } from '../../src/device/file-device.js';
import { BdsnapError } from '../../src/errors.js';
import { mkfs, mkfsImage } from '../../src/fs/singlefilefs/mkfs.js';
import { makeImage } from '../../testkit/files.js';
import { tempDir } from './helpers.js';

const isCode = (code: string) => (e: unknown) => e instanceof BdsnapError && e.code === code;

/** The image the layout table describes, built field by field without the encoder. */
function expectedImage(blocks: number): Buffer {
  const image = Buffer.alloc(blocks * 4096);
  image.writeBigUInt64LE(1n, 0); // version
  image.writeBigUInt64LE(0x42424242n, 8); // magic
  image.writeBigUInt64LE(4096n, 16); // block size
  image.writeBigUInt64LE(BigInt((blocks - 2) * 4096), 40); // max file size
  image.writeUInt32LE(0x8000, 4096); // mode
  image.writeBigUInt64LE(1n, 4096 + 8); // inode number
  image.writeBigUInt64LE(33n, 4096 + 24); // file size
  image.write('Wathever content you would like.\n', 8192, 'latin1');
  return image;
}

test('mkfsImage writes the layout byte for byte (default 100 blocks)', async (t) => {
  const dir = tempDir(t);
  const image = path.join(dir, 'image');
  await mkfsImage(image);
  const bytes = fs.readFileSync(image);
  assert.equal(bytes.length, 409600);
  assert.deepEqual(bytes, expectedImage(100));
});

test('mkfsImage overwrites an existing file and honours the block count', async (t) => {
  const dir = tempDir(t);
  const image = path.join(dir, 'image');
  makeImage(image, 50 * 4096, 0xee);
  await mkfsImage(image, 7);
  assert.deepEqual(fs.readFileSync(image), expectedImage(7));
  await mkfsImage(image, 3);
  assert.deepEqual(fs.readFileSync(image), expectedImage(3));
});

test('mkfsImage refuses fewer than 3 blocks, fractions and non-files', async (t) => {
  const dir = tempDir(t);
  for (const blocks of [2, 0, -1, 3.5, Number.NaN]) {
    await assert.rejects(mkfsImage(path.join(dir, 'x'), blocks), (e: unknown) => isCode('EINVAL')(e) && /at least 3/.test((e as Error).message));
  }
  assert.equal(fs.existsSync(path.join(dir, 'x')), false);
  await assert.rejects(mkfsImage(dir, 10), isCode('EINVAL'));
  await assert.rejects(mkfsImage(path.join(dir, 'no', 'such', 'dir'), 10), isCode('ENOENT'));
});

test('mkfs over a device writes blocks 0 to 2 and leaves the rest alone', async (t) => {
  const dir = tempDir(t);
  const image = path.join(dir, 'dev');
  makeImage(image, 10 * 4096, 0xcd);
  const device = await FileDevice.open(image);
  t.after(() => device.close());
  await mkfs(device);
  const bytes = fs.readFileSync(image);
  assert.deepEqual(bytes.subarray(0, 3 * 4096), expectedImage(10).subarray(0, 3 * 4096));
  assert.ok(bytes.subarray(3 * 4096).every((b) => b === 0xcd));
});

test('mkfs refuses a device that is not a whole number of blocks or too small', async (t) => {
  const dir = tempDir(t);
  for (const [name, sizeBytes, pattern] of [['odd', 3 * 4096 + 512, /whole number/], ['small', 2 * 4096, /at least 3 blocks/]] as const) {
    const image = path.join(dir, name);
    makeImage(image, sizeBytes, 0x11);
    const device = await FileDevice.open(image);
    await assert.rejects(mkfs(device), (e: unknown) => isCode('EINVAL')(e) && pattern.test((e as Error).message));
    await device.close();
    assert.ok(fs.readFileSync(image).every((b) => b === 0x11), 'nothing written on refusal');
  }
});
