import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { BdsnapError } from '../../src/errors.js';
import {
  SFFS_BLOCK_SIZE, SFFS_MAGIC, decodeInode, decodeSuperblock, encodeInode, encodeSuperblock,
  maxFileSizeFor, patchFileSize, superblockFor, type Inode, type Superblock,
} from '../../src/fs/singlefilefs/layout.js';

const isCode = (code: string) => (e: unknown) => e instanceof BdsnapError && e.code === code;

test('superblock and inode round-trip through encode and decode', () => {
  fc.assert(fc.property(
    fc.integer({ min: 3, max: 1 << 30 }), fc.nat(), fc.nat(), fc.nat({ max: 2 ** 40 }), fc.nat({ max: 2 ** 40 }),
    (blocks, inodesCount, freeBlocks, dataBlockNumber, fileSizeBytes) => {
      const sb: Superblock = { ...superblockFor(blocks * SFFS_BLOCK_SIZE), inodesCount, freeBlocks };
      const sbBlock = encodeSuperblock(sb);
      assert.equal(sbBlock.length, SFFS_BLOCK_SIZE);
      assert.deepEqual(decodeSuperblock(sbBlock), sb);
      const inode: Inode = { mode: 0x8000, inodeNumber: 1, dataBlockNumber, fileSizeBytes };
      const inodeBlock = encodeInode(inode);
      assert.equal(inodeBlock.length, SFFS_BLOCK_SIZE);
      assert.deepEqual(decodeInode(inodeBlock), inode);
    }));
});

test('max file size is every block but the superblock and the inode', () => {
  assert.equal(maxFileSizeFor(100 * 4096), 98 * 4096);
  assert.equal(maxFileSizeFor(3 * 4096), 4096);
  assert.equal(superblockFor(100 * 4096).maxFileSizeBytes, 401408);
});

test('a block without the magic is refused as not a singlefilefs image', () => {
  assert.throws(() => decodeSuperblock(Buffer.alloc(SFFS_BLOCK_SIZE)),
    (e: unknown) => isCode('EINVAL')(e) && /not a singlefilefs image/.test((e as Error).message) && /0x0/.test((e as Error).message));
  const ext4ish = Buffer.alloc(SFFS_BLOCK_SIZE, 0xff);
  assert.throws(() => decodeSuperblock(ext4ish), isCode('EINVAL'));
  assert.throws(() => decodeSuperblock(Buffer.alloc(10)), isCode('EINVAL'));
});

test('right magic with an unknown version or block size is corrupt, garbage in unused fields is fine', () => {
  const good = encodeSuperblock(superblockFor(100 * 4096));
  const badVersion = Buffer.from(good);
  badVersion.writeBigUInt64LE(2n, 0);
  assert.throws(() => decodeSuperblock(badVersion), (e: unknown) => isCode('ECORRUPT')(e) && /version 2/.test((e as Error).message));
  const badBlockSize = Buffer.from(good);
  badBlockSize.writeBigUInt64LE(512n, 16);
  assert.throws(() => decodeSuperblock(badBlockSize), isCode('ECORRUPT'));
  const hugeMax = Buffer.from(good);
  hugeMax.writeBigUInt64LE(0xffffffffffffffffn, 40);
  assert.throws(() => decodeSuperblock(hugeMax), isCode('ECORRUPT'));
  // The reference formatter leaves inode count and free blocks uninitialised.
  const garbage = Buffer.from(good);
  garbage.fill(0xa5, 24, 40);
  garbage.fill(0x5a, 48);
  const sb = decodeSuperblock(garbage);
  assert.equal(sb.magic, SFFS_MAGIC);
  assert.equal(sb.maxFileSizeBytes, 401408);
});

test('decodeSuperblock never throws anything but a BdsnapError on random blocks', () => {
  fc.assert(fc.property(fc.uint8Array({ minLength: 0, maxLength: 64 }), fc.boolean(), (bytes, withMagic) => {
    const block = Buffer.alloc(SFFS_BLOCK_SIZE);
    Buffer.from(bytes).copy(block);
    if (withMagic) block.writeBigUInt64LE(BigInt(SFFS_MAGIC), 8);
    try {
      decodeSuperblock(block);
      decodeInode(block);
    } catch (e) {
      assert.ok(e instanceof BdsnapError, String(e));
    }
  }));
});

test('patchFileSize changes only the size field of the inode block', () => {
  const block = encodeInode({ mode: 0x8000, inodeNumber: 1, dataBlockNumber: 0, fileSizeBytes: 33 });
  block.fill(0x77, 32);
  const before = Buffer.from(block);
  patchFileSize(block, 4103);
  assert.equal(block.readBigUInt64LE(24), 4103n);
  assert.deepEqual(block.subarray(0, 24), before.subarray(0, 24));
  assert.deepEqual(block.subarray(32), before.subarray(32));
});
