/**
 * On-disk layout of singlefilefs, the course's one-file filesystem.
 *
 * Block 0 holds the superblock, block 1 the inode of the only file, and the file's bytes
 * start at block 2 (file offset X is device byte 8192 + X). Every integer is little-endian.
 * Decoding checks the magic first so that a device holding anything else is refused with a
 * message that says so, before any other field is trusted.
 */

import { BdsnapError } from '../../errors.js';

export const SFFS_BLOCK_SIZE = 4096;
export const SFFS_MAGIC = 0x42424242;
export const SFFS_VERSION = 1;

export const SUPERBLOCK_BLOCK = 0;
export const INODE_BLOCK = 1;
export const FIRST_DATA_BLOCK = 2;
/** Superblock, inode, and at least one data block. */
export const MIN_IMAGE_BLOCKS = 3;
/** Default image size of `mkfsImage`, as in the course (`dd bs=4096 count=100`). */
export const DEFAULT_IMAGE_BLOCKS = 100;

export const FILE_INODE_NUMBER = 1;
/** S_IFREG: the only file is a regular file. */
export const S_IFREG = 0x8000;
export const FILE_NAME = 'the-file';
/** The body the reference formatter writes (the spelling is the course's). */
export const INITIAL_CONTENT = 'Wathever content you would like.\n';

/** Byte offsets inside block 0. */
export const SUPERBLOCK_OFFSETS = {
  version: 0,
  magic: 8,
  blockSize: 16,
  inodesCount: 24,
  freeBlocks: 32,
  maxFileSize: 40,
} as const;

/** Byte offsets inside block 1. */
export const INODE_OFFSETS = {
  mode: 0,
  inodeNumber: 8,
  dataBlockNumber: 16,
  fileSize: 24,
} as const;

export interface Superblock {
  version: number;
  magic: number;
  blockSizeBytes: number;
  /** Not used by the driver. */
  inodesCount: number;
  /** Not used by the driver. */
  freeBlocks: number;
  maxFileSizeBytes: number;
}

export interface Inode {
  mode: number;
  inodeNumber: number;
  /** Not used by the driver. */
  dataBlockNumber: number;
  fileSizeBytes: number;
}

/** Largest file an image of `deviceBytes` can hold: every block but the first two. */
export function maxFileSizeFor(deviceBytes: number): number {
  return (Math.floor(deviceBytes / SFFS_BLOCK_SIZE) - FIRST_DATA_BLOCK) * SFFS_BLOCK_SIZE;
}

/** Device byte where file byte `fileOffsetBytes` lives. */
export function deviceOffsetOf(fileOffsetBytes: number): number {
  return FIRST_DATA_BLOCK * SFFS_BLOCK_SIZE + fileOffsetBytes;
}

export function superblockFor(deviceBytes: number): Superblock {
  return {
    version: SFFS_VERSION,
    magic: SFFS_MAGIC,
    blockSizeBytes: SFFS_BLOCK_SIZE,
    inodesCount: 0,
    freeBlocks: 0,
    maxFileSizeBytes: maxFileSizeFor(deviceBytes),
  };
}

export function fileInode(fileSizeBytes: number): Inode {
  return { mode: S_IFREG, inodeNumber: FILE_INODE_NUMBER, dataBlockNumber: 0, fileSizeBytes };
}

/** A whole block 0: the superblock, zero-padded. */
export function encodeSuperblock(sb: Superblock): Buffer {
  const block = Buffer.alloc(SFFS_BLOCK_SIZE);
  writeU64(block, SUPERBLOCK_OFFSETS.version, sb.version);
  writeU64(block, SUPERBLOCK_OFFSETS.magic, sb.magic);
  writeU64(block, SUPERBLOCK_OFFSETS.blockSize, sb.blockSizeBytes);
  writeU64(block, SUPERBLOCK_OFFSETS.inodesCount, sb.inodesCount);
  writeU64(block, SUPERBLOCK_OFFSETS.freeBlocks, sb.freeBlocks);
  writeU64(block, SUPERBLOCK_OFFSETS.maxFileSize, sb.maxFileSizeBytes);
  return block;
}

/**
 * Decode and check block 0. A wrong magic is EINVAL (not a singlefilefs image); a right
 * magic with impossible fields is ECORRUPT.
 */
export function decodeSuperblock(block: Buffer): Superblock {
  if (block.length < 48) throw new BdsnapError('EINVAL', `superblock needs 48 bytes, got ${block.length}`);
  // Compared as 64 bits: any other value, however large, means "not ours" (EINVAL), not corrupt.
  const rawMagic = block.readBigUInt64LE(SUPERBLOCK_OFFSETS.magic);
  if (rawMagic !== BigInt(SFFS_MAGIC)) {
    throw new BdsnapError('EINVAL',
      `not a singlefilefs image: magic is 0x${rawMagic.toString(16)}, expected 0x${SFFS_MAGIC.toString(16)} (format it with 'bdsnap sffs mkfs')`);
  }
  const sb: Superblock = {
    version: readU64(block, SUPERBLOCK_OFFSETS.version, 'version'),
    magic: SFFS_MAGIC,
    blockSizeBytes: readU64(block, SUPERBLOCK_OFFSETS.blockSize, 'block size'),
    // The reference formatter leaves these two uninitialised: they may hold anything.
    inodesCount: readU64Loose(block, SUPERBLOCK_OFFSETS.inodesCount),
    freeBlocks: readU64Loose(block, SUPERBLOCK_OFFSETS.freeBlocks),
    maxFileSizeBytes: readU64(block, SUPERBLOCK_OFFSETS.maxFileSize, 'max file size'),
  };
  if (sb.version !== SFFS_VERSION) {
    throw new BdsnapError('ECORRUPT', `singlefilefs version ${sb.version} is not supported (expected ${SFFS_VERSION})`);
  }
  if (sb.blockSizeBytes !== SFFS_BLOCK_SIZE) {
    throw new BdsnapError('ECORRUPT', `singlefilefs block size ${sb.blockSizeBytes} is not supported (expected ${SFFS_BLOCK_SIZE})`);
  }
  return sb;
}

/** A whole block 1: the inode, zero-padded. */
export function encodeInode(inode: Inode): Buffer {
  const block = Buffer.alloc(SFFS_BLOCK_SIZE);
  patchInode(block, inode);
  return block;
}

/** Write the inode's fields into an existing block 1, keeping its other bytes. */
export function patchInode(block: Buffer, inode: Inode): void {
  block.writeUInt32LE(inode.mode >>> 0, INODE_OFFSETS.mode);
  block.writeUInt32LE(0, INODE_OFFSETS.mode + 4);
  writeU64(block, INODE_OFFSETS.inodeNumber, inode.inodeNumber);
  writeU64(block, INODE_OFFSETS.dataBlockNumber, inode.dataBlockNumber);
  writeU64(block, INODE_OFFSETS.fileSize, inode.fileSizeBytes);
}

/** Set only the file size in an existing block 1, as the driver does when the file grows. */
export function patchFileSize(block: Buffer, fileSizeBytes: number): void {
  writeU64(block, INODE_OFFSETS.fileSize, fileSizeBytes);
}

export function decodeInode(block: Buffer): Inode {
  if (block.length < 32) throw new BdsnapError('EINVAL', `inode needs 32 bytes, got ${block.length}`);
  return {
    mode: block.readUInt32LE(INODE_OFFSETS.mode),
    inodeNumber: readU64(block, INODE_OFFSETS.inodeNumber, 'inode number'),
    dataBlockNumber: readU64Loose(block, INODE_OFFSETS.dataBlockNumber),
    fileSizeBytes: readU64(block, INODE_OFFSETS.fileSize, 'file size'),
  };
}

function writeU64(block: Buffer, offsetBytes: number, value: number): void {
  if (!Number.isSafeInteger(value) || value < 0) throw new BdsnapError('EINVAL', `field value ${value} is not an unsigned integer`);
  block.writeBigUInt64LE(BigInt(value), offsetBytes);
}

function readU64(block: Buffer, offsetBytes: number, what: string): number {
  const value = block.readBigUInt64LE(offsetBytes);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new BdsnapError('ECORRUPT', `singlefilefs ${what} at byte ${offsetBytes} is out of range (${value})`);
  }
  return Number(value);
}

/** For fields nobody reads: clamp rather than refuse, since garbage there is legal. */
function readU64Loose(block: Buffer, offsetBytes: number): number {
  const value = block.readBigUInt64LE(offsetBytes);
  return value > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(value);
}
