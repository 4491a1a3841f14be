import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { FileDevice } from '../../src/device/file-device.js';
import { BdsnapError } from '../../src/errors.js';
import { SingleFileFs } from '../../src/fs/singlefilefs/file.js';
import { INITIAL_CONTENT } from '../../src/fs/singlefilefs/layout.js';
import { mkfsImage } from '../../src/fs/singlefilefs/mkfs.js';
import { makeImage } from '../../testkit/files.js';
import { RecordingDevice, tempDir } from './helpers.js';

const isCode = (code: string) => (e: unknown) => e instanceof BdsnapError && e.code === code;

async function freshFs(t: { after: (fn: () => unknown) => void }, blocks = 100, minimumBytes?: number): Promise<{ image: string; sffs: SingleFileFs; device: RecordingDevice }> {
  const dir = tempDir(t);
  const image = path.join(dir, 'image');
  await mkfsImage(image, blocks);
  const device = new RecordingDevice(await FileDevice.open(image), minimumBytes);
  t.after(() => device.close());
  return { image, sffs: await SingleFileFs.open(device), device };
}

const fileSizeOnDisk = (image: string): number => Number(fs.readFileSync(image).readBigUInt64LE(4096 + 24));

test('open reads the formatted file: size, max size, content', async (t) => {
  const { sffs } = await freshFs(t);
  assert.equal(sffs.size, 33);
  assert.equal(sffs.maxFileSize, 98 * 4096);
  assert.equal((await sffs.readAll()).toString('latin1'), INITIAL_CONTENT);
  assert.equal((await sffs.read(9, 7)).toString(), 'content');
  // Nothing past the end of the file.
  assert.equal((await sffs.read(30, 100)).toString(), 'e.\n');
  assert.equal((await sffs.read(33, 10)).length, 0);
  assert.equal((await sffs.read(5000, 10)).length, 0);
  await assert.rejects(sffs.read(-1, 1), isCode('EINVAL'));
});

test('open refuses a device that is not singlefilefs, or whose metadata cannot be right', async (t) => {
  const dir = tempDir(t);
  const zeros = path.join(dir, 'zeros');
  makeImage(zeros, 10 * 4096, 0);
  const dev = await FileDevice.open(zeros);
  await assert.rejects(SingleFileFs.open(dev), (e: unknown) => isCode('EINVAL')(e) && /not a singlefilefs image/.test((e as Error).message));
  await dev.close();

  const tiny = path.join(dir, 'tiny');
  makeImage(tiny, 4096, 0);
  const tinyDev = await FileDevice.open(tiny);
  await assert.rejects(SingleFileFs.open(tinyDev), isCode('EINVAL'));
  await tinyDev.close();

  // A 100-block superblock on an image cut to 50 blocks: the max size cannot fit.
  const cut = path.join(dir, 'cut');
  await mkfsImage(cut, 100);
  fs.truncateSync(cut, 50 * 4096);
  const cutDev = await FileDevice.open(cut);
  await assert.rejects(SingleFileFs.open(cutDev), isCode('ECORRUPT'));
  await cutDev.close();

  const big = path.join(dir, 'big');
  await mkfsImage(big, 10);
  const bytes = fs.readFileSync(big);
  bytes.writeBigUInt64LE(BigInt(9 * 4096), 4096 + 24);
  fs.writeFileSync(big, bytes);
  const bigDev = await FileDevice.open(big);
  await assert.rejects(SingleFileFs.open(bigDev), (e: unknown) => isCode('ECORRUPT')(e) && /larger than the max/.test((e as Error).message));
  await bigDev.close();
});

test('writeOnce changes at most one data block, up to its end, and writes only its bytes', async (t) => {
  const { sffs, device } = await freshFs(t, 100, 1);
  await sffs.write(33, Buffer.alloc(3 * 4096 - 33, 0x61));
  device.writes.length = 0;
  const n = await sffs.writeOnce(4000, Buffer.alloc(5000, 0x42));
  assert.equal(n, 96);
  assert.deepEqual(device.writes, [{ offsetBytes: 8192 + 4000, lengthBytes: 96 }]);
  const next = await sffs.writeOnce(4096, Buffer.alloc(5000, 0x42));
  assert.equal(next, 4096);
  assert.deepEqual(device.writes[1], { offsetBytes: 12288, lengthBytes: 4096 });
  const back = await sffs.read(3990, 20);
  assert.deepEqual(back, Buffer.concat([Buffer.alloc(10, 0x61), Buffer.alloc(10, 0x42)]));
});

test('no holes: a write past the end of the file writes nothing and returns 0', async (t) => {
  const { image, sffs, device } = await freshFs(t);
  const before = fs.readFileSync(image);
  assert.equal(await sffs.writeOnce(34, Buffer.from('x')), 0);
  assert.equal(await sffs.write(8192, Buffer.from('hello')), 0);
  assert.equal(device.writes.length, 0);
  assert.equal(sffs.size, 33);
  assert.deepEqual(fs.readFileSync(image), before);
  // Appending exactly at the end is allowed and grows the file.
  assert.equal(await sffs.write(33, Buffer.from('more')), 4);
  assert.equal(sffs.size, 37);
});

test('growing the file rewrites the inode block; block 0 is never written', async (t) => {
  const { image, sffs, device } = await freshFs(t, 100, 1);
  assert.equal(await sffs.write(0, Buffer.from('Overwrite')), 9);
  assert.deepEqual(device.writes, [{ offsetBytes: 8192, lengthBytes: 9 }], 'no growth, no inode write');
  assert.equal(await sffs.write(30, Buffer.from('grown!')), 6);
  assert.deepEqual(device.writes.slice(1), [{ offsetBytes: 8192 + 30, lengthBytes: 6 }, { offsetBytes: 4096, lengthBytes: 4096 }]);
  assert.equal(sffs.size, 36);
  assert.equal(fileSizeOnDisk(image), 36);
  // A long write grows block by block: one inode rewrite per data block that extends the file.
  device.writes.length = 0;
  assert.equal(await sffs.write(36, Buffer.alloc(10000, 0x7a)), 10000);
  assert.deepEqual(device.writes, [
    { offsetBytes: 8192 + 36, lengthBytes: 4060 }, { offsetBytes: 4096, lengthBytes: 4096 },
    { offsetBytes: 12288, lengthBytes: 4096 }, { offsetBytes: 4096, lengthBytes: 4096 },
    { offsetBytes: 16384, lengthBytes: 1844 }, { offsetBytes: 4096, lengthBytes: 4096 },
  ]);
  assert.equal(fileSizeOnDisk(image), 10036);
  assert.ok(device.writes.every((w) => w.offsetBytes !== 0));
  const reopened = await SingleFileFs.open(device);
  assert.equal(reopened.size, 10036);
  assert.equal((await reopened.read(0, 9)).toString(), 'Overwrite');
  assert.equal((await reopened.read(28, 10)).toString('latin1'), 'ikgrown!zz');
});

test('offsets past the max file size are refused; the file stops at its max size', async (t) => {
  const { image, sffs } = await freshFs(t, 3);
  assert.equal(sffs.maxFileSize, 4096);
  await assert.rejects(sffs.writeOnce(4097, Buffer.from('x')), (e: unknown) => isCode('EINVAL')(e) && /max file size/.test((e as Error).message));
  await assert.rejects(sffs.write(2 ** 40, Buffer.from('x')), isCode('EINVAL'));
  await assert.rejects(sffs.write(-5, Buffer.from('x')), isCode('EINVAL'));
  await assert.rejects(sffs.write(1.5, Buffer.from('x')), isCode('EINVAL'));
  // A write longer than the room left is short, as write(2) would be.
  assert.equal(await sffs.write(33, Buffer.alloc(5000, 0x71)), 4096 - 33);
  assert.equal(sffs.size, 4096);
  // At the max size the driver writes nothing and answers 0.
  assert.equal(await sffs.writeOnce(4096, Buffer.from('x')), 0);
  assert.equal(await sffs.write(4096, Buffer.from('x')), 0);
  assert.equal(await sffs.write(4000, Buffer.alloc(200, 0x72)), 96);
  assert.equal(fs.readFileSync(image).length, 3 * 4096, 'the image never grows');
  assert.equal(fileSizeOnDisk(image), 4096);
});

test('concurrent growing writes through one instance never lose a size update', async (t) => {
  const { image, sffs } = await freshFs(t);
  // Every writer extends the file from its current end; the largest end must win whatever
  // the interleaving, in memory and on disk.
  const lengths = [7, 20, 3, 15, 1, 19, 11, 2, 18, 5];
  const counts = await Promise.all(lengths.map((n, i) => sffs.write(33, Buffer.alloc(n, 0x41 + i))));
  assert.deepEqual(counts, lengths);
  assert.equal(sffs.size, 53);
  await sffs.flush();
  assert.equal(fileSizeOnDisk(image), 53);
});

test('flush reaches the device after the queued writes', async (t) => {
  const { sffs, device } = await freshFs(t);
  let flushedAfter = -1;
  const inner = device.flush.bind(device);
  device.flush = async () => {
    flushedAfter = device.writes.length;
    await inner();
  };
  const pending = sffs.write(0, Buffer.alloc(20, 0x51));
  await sffs.flush();
  await pending;
  assert.equal(flushedAfter, 1);
});

test('writers on separate handles sharing a block keep each other\'s bytes', async (t) => {
  const { image, sffs } = await freshFs(t);
  await sffs.write(33, Buffer.alloc(3000, 0x2e));
  await sffs.flush();
  const handles = await Promise.all([0, 1, 2].map(() => FileDevice.open(image, { shared: true })));
  t.after(() => Promise.all(handles.map((h) => h.close())));
  const writers = await Promise.all(handles.map((h) => SingleFileFs.open(h)));
  await Promise.all(writers.map((w, i) => w.write(100 + i * 1000, Buffer.alloc(500, 0x41 + i))));
  const content = await (await SingleFileFs.open(handles[0]!)).readAll();
  for (let i = 0; i < 3; i++) assert.deepEqual(content.subarray(100 + i * 1000, 600 + i * 1000), Buffer.alloc(500, 0x41 + i));
  assert.equal(content.length, 3033);
});

test('writes are widened to the device\'s minimum block size, and no further', async (t) => {
  for (const minimumBytes of [512, 4096]) {
    const { image, sffs, device } = await freshFs(t, 100, minimumBytes);
    await sffs.write(33, Buffer.alloc(6000, 0x2e));
    device.writes.length = 0;
    assert.equal(await sffs.writeOnce(1000, Buffer.from('middle')), 6);
    assert.equal(await sffs.writeOnce(4093, Buffer.from('cross')), 3);
    assert.equal(await sffs.write(6030, Buffer.from('grow')), 4);
    const sector = (offsetBytes: number): number => offsetBytes - (offsetBytes % minimumBytes);
    assert.deepEqual(device.writes, [
      { offsetBytes: sector(8192 + 1000), lengthBytes: minimumBytes },
      { offsetBytes: sector(8192 + 4093), lengthBytes: minimumBytes },
      { offsetBytes: sector(8192 + 6030), lengthBytes: minimumBytes },
      { offsetBytes: 4096, lengthBytes: 4096 },
    ]);
    const content = await sffs.readAll();
    assert.equal(content.length, 6034);
    assert.equal(content.subarray(1000, 1006).toString(), 'middle');
    assert.equal(content.subarray(4093, 4096).toString(), 'cro');
    assert.equal(content.subarray(6030).toString(), 'grow');
    assert.equal(content.subarray(999, 1000).toString(), '.');
    assert.equal(Number(fs.readFileSync(image).readBigUInt64LE(4096 + 24)), 6034);
  }
});

test('an image with garbage in every unused field (as the reference formatter leaves it) works, and the garbage stays', async (t) => {
  const dir = tempDir(t);
  const image = path.join(dir, 'image');
  await mkfsImage(image, 100);
  const bytes = fs.readFileSync(image);
  bytes.fill(0x9c, 24, 40); // inode count, free blocks
  bytes.fill(0x3d, 48, 4096); // superblock padding
  bytes.fill(0x5e, 4096 + 4, 4096 + 8); // inode padding after mode
  bytes.fill(0x71, 4096 + 16, 4096 + 24); // data block number
  bytes.fill(0x42, 4096 + 32, 8192); // rest of the inode block
  fs.writeFileSync(image, bytes);
  const device = await FileDevice.open(image);
  t.after(() => device.close());
  const sffs = await SingleFileFs.open(device);
  assert.equal(sffs.size, 33);
  assert.equal(sffs.maxFileSize, 401408);
  assert.equal(await sffs.write(0, Buffer.from('ciao\nand a longer body to grow the file')), 39);
  await sffs.flush();
  const after = fs.readFileSync(image);
  const expected = Buffer.from(bytes);
  expected.writeBigUInt64LE(39n, 4096 + 24);
  Buffer.from('ciao\nand a longer body to grow the file').copy(expected, 8192);
  assert.deepEqual(after, expected);
});
