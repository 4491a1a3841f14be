/**
 * The change map's files (all integers little-endian).
 *
 * Live map: `HEADER_BYTES` of header then one u32 per block:
 *   0  magic "BDSNPCBT"            8  u32 version (2)          12 u32 header bytes (4096)
 *   16 u32 generation              20 u32 block size           24 u32 blocks
 *   28 u32 current number          32 u64 device size bytes    40 u32 flags (1 clean, 2 poisoned)
 *   48 boot id (48 bytes ASCII, NUL padded)                    96 u64 last write seen (ms since epoch)
 *   136 u64 generation created (ms since epoch)
 *   144 u32 stamp bytes (0: none)  148 the device stamp as JSON
 *   4092 u32 CRC-32 of bytes 0..4091
 * Version 1 maps (without a complete stamp) are not trusted.
 *
 * Frozen view: FROZEN_HEADER_BYTES of header then one u32 per block:
 *   0 magic "BDSNPCBF"   8 u32 version (1)   12 u32 header bytes (64)   16 u32 generation
 *   20 u32 number        24 u32 block size   28 u32 blocks              32 u64 device size bytes
 *   60 u32 CRC-32 of bytes 0..59
 */

import { randomBytes } from 'node:crypto';
import os from 'node:os';
import { crc32 } from 'node:zlib';
import { BdsnapError } from '../../errors.js';
import { parseDeviceStamp, type DeviceStamp } from '../../host/device-stamp.js';
import { preadFullySync } from '../../host/fd-io.js';
import { readU64, writeU64 } from '../format.js';
import { MAX_TRACKING_BLOCKS } from './ranges.js';

export const CHANGE_MAP_MAGIC = 'BDSNPCBT';
export const FROZEN_MAP_MAGIC = 'BDSNPCBF';
export const CHANGE_MAP_VERSION = 2;
export const FROZEN_MAP_VERSION = 1;
/** The entries start on their own page, so an entry write never touches the header's page. */
export const HEADER_BYTES = 4096;
const HEADER_CRC_AT = HEADER_BYTES - 4;
const STAMP_LENGTH_AT = 144;
const STAMP_AT = 148;
const MAX_STAMP_BYTES = HEADER_CRC_AT - STAMP_AT;
export const FROZEN_HEADER_BYTES = 64;
const FROZEN_CRC_AT = 60;
export const FLAG_CLEAN = 1;
export const FLAG_POISONED = 2;
/**
 * The map is in use and the daemon had no write of its own on the device in flight or unsettled
 * when the header was written: the stamp in the header is the device's after its last own write.
 */
export const FLAG_IDLE = 4;
const BOOT_ID_BYTES = 48;
const LITTLE_ENDIAN = os.endianness() === 'LE';

/** A new generation id: 8 hex digits, stored as the u32 they spell. */
export function newGeneration(): string {
  return randomBytes(4).toString('hex');
}

/** The generation id stored as a u32 at `at`. */
export function readGeneration(h: Buffer, at: number): string {
  return h.readUInt32LE(at).toString(16).padStart(8, '0');
}

function writeGeneration(h: Buffer, generation: string, at: number): void {
  h.writeUInt32LE(Number.parseInt(generation, 16) >>> 0, at);
}

function validBlockSize(blockSize: number): boolean {
  return blockSize >= 4096 && (blockSize & (blockSize - 1)) === 0;
}

/** The file bytes of entries lo..hi (a view of the array on little-endian machines). */
export function entryBytes(entries: Uint32Array, lo: number, hi: number): Buffer {
  if (LITTLE_ENDIAN) return Buffer.from(entries.buffer, entries.byteOffset + lo * 4, (hi - lo + 1) * 4);
  const b = Buffer.allocUnsafe((hi - lo + 1) * 4);
  for (let i = lo; i <= hi; i++) b.writeUInt32LE(entries[i]!, (i - lo) * 4);
  return b;
}

/** Read `entries.length` u32 entries from the file at `position`; false if the file is short. */
export function readEntries(fd: number, entries: Uint32Array, position: number): boolean {
  const bytes = entries.length * 4;
  if (LITTLE_ENDIAN) return preadFullySync(fd, Buffer.from(entries.buffer, entries.byteOffset, bytes), position) === bytes;
  const b = Buffer.allocUnsafe(bytes);
  if (preadFullySync(fd, b, position) !== bytes) return false;
  for (let i = 0; i < entries.length; i++) entries[i] = b.readUInt32LE(i * 4);
  return true;
}

/** A header as read: the stamp decoded. */
export interface ParsedHeader extends Omit<HeaderFields, 'stampBytes'> {
  /** The stamp at open (unclean) or at close (clean); undefined when none was recorded. */
  stamp: DeviceStamp | undefined;
}

/** A live map's header (`h` as read, `fileBytes` the file's size), or what is wrong with it. */
export function parseHeader(h: Buffer, fileBytes: number): ParsedHeader | string {
  if (h.length < HEADER_BYTES) return `the file is too short for a header (${fileBytes} bytes)`;
  if (h.toString('latin1', 0, 8) !== CHANGE_MAP_MAGIC) return 'bad magic (not a bdsnap change map)';
  const version = h.readUInt32LE(8);
  if (version !== CHANGE_MAP_VERSION) return `unsupported version ${version}`;
  if (h.readUInt32LE(HEADER_CRC_AT) !== crc32(h.subarray(0, HEADER_CRC_AT))) return 'header checksum mismatch';
  if (h.readUInt32LE(12) !== HEADER_BYTES) return `unexpected header size ${h.readUInt32LE(12)}`;
  const blockSize = h.readUInt32LE(20);
  const blocks = h.readUInt32LE(24);
  const deviceSizeBytes = readU64(h, 32);
  if (!validBlockSize(blockSize)) return `bad block size ${blockSize}`;
  if (blocks !== Math.ceil(deviceSizeBytes / blockSize) || blocks > MAX_TRACKING_BLOCKS) return `block count ${blocks} does not match the device size ${deviceSizeBytes}`;
  if (fileBytes !== HEADER_BYTES + blocks * 4) return `file is ${fileBytes} bytes, expected ${HEADER_BYTES + blocks * 4}`;
  const stampBytes = h.readUInt32LE(STAMP_LENGTH_AT);
  if (stampBytes > MAX_STAMP_BYTES) return `a device stamp of ${stampBytes} bytes does not fit the header`;
  let stamp: DeviceStamp | undefined;
  if (stampBytes > 0) {
    stamp = parseDeviceStamp(h.toString('utf8', STAMP_AT, STAMP_AT + stampBytes));
    if (!stamp) return 'the device stamp does not parse';
  }
  return {
    generation: readGeneration(h, 16),
    blockSize,
    blocks,
    number: h.readUInt32LE(28),
    deviceSizeBytes,
    flags: h.readUInt32LE(40),
    bootId: h.toString('latin1', 48, 48 + BOOT_ID_BYTES).replace(/\0+$/, ''),
    lastWriteSeenMs: readU64(h, 96),
    createdMs: readU64(h, 136),
    stamp,
  };
}

/** The stamp as the header stores it. Errors: EINVAL (too large for the header). */
export function encodeStamp(stamp: DeviceStamp | undefined): Buffer | undefined {
  if (!stamp) return undefined;
  const bytes = Buffer.from(JSON.stringify(stamp), 'utf8');
  if (bytes.length > MAX_STAMP_BYTES) throw new BdsnapError('EINVAL', `the device stamp takes ${bytes.length} bytes, more than the map header holds (${MAX_STAMP_BYTES})`);
  return bytes;
}

/** What the live map's header holds besides its constants. */
export interface HeaderFields {
  generation: string;
  blockSize: number;
  blocks: number;
  number: number;
  deviceSizeBytes: number;
  flags: number;
  bootId: string;
  lastWriteSeenMs: number;
  createdMs: number;
  /** The device stamp as encodeStamp() gave it. */
  stampBytes: Buffer | undefined;
}

/** Fill `h` (HEADER_BYTES, reused by the live map so a header write allocates nothing) with a header. */
export function fillHeader(h: Buffer, f: HeaderFields): void {
  h.fill(0);
  h.write(CHANGE_MAP_MAGIC, 0, 'latin1');
  h.writeUInt32LE(CHANGE_MAP_VERSION, 8);
  h.writeUInt32LE(HEADER_BYTES, 12);
  writeGeneration(h, f.generation, 16);
  h.writeUInt32LE(f.blockSize, 20);
  h.writeUInt32LE(f.blocks, 24);
  h.writeUInt32LE(f.number, 28);
  writeU64(h, f.deviceSizeBytes, 32);
  h.writeUInt32LE(f.flags, 40);
  h.write(f.bootId.slice(0, BOOT_ID_BYTES), 48, 'latin1');
  writeU64(h, f.lastWriteSeenMs, 96);
  writeU64(h, f.createdMs, 136);
  const stamp = f.stampBytes;
  if (stamp) {
    h.writeUInt32LE(stamp.length, STAMP_LENGTH_AT);
    stamp.copy(h, STAMP_AT);
  }
  h.writeUInt32LE(crc32(h.subarray(0, HEADER_CRC_AT)), HEADER_CRC_AT);
}

/** What a frozen view's header holds. */
export interface FrozenHeader {
  generation: string;
  number: number;
  blockSize: number;
  blocks: number;
  deviceSizeBytes: number;
}

export function encodeFrozenHeader(f: FrozenHeader): Buffer {
  const h = Buffer.alloc(FROZEN_HEADER_BYTES);
  h.write(FROZEN_MAP_MAGIC, 0, 'latin1');
  h.writeUInt32LE(FROZEN_MAP_VERSION, 8);
  h.writeUInt32LE(FROZEN_HEADER_BYTES, 12);
  writeGeneration(h, f.generation, 16);
  h.writeUInt32LE(f.number, 20);
  h.writeUInt32LE(f.blockSize, 24);
  h.writeUInt32LE(f.blocks, 28);
  writeU64(h, f.deviceSizeBytes, 32);
  h.writeUInt32LE(crc32(h.subarray(0, FROZEN_CRC_AT)), FROZEN_CRC_AT);
  return h;
}

/** A frozen view's header (`h` as read, `fileBytes` the file's size), or what is wrong with it. */
export function parseFrozenHeader(h: Buffer, fileBytes: number): FrozenHeader | string {
  if (h.length < FROZEN_HEADER_BYTES) return `too short for a header (${fileBytes} bytes)`;
  if (h.toString('latin1', 0, 8) !== FROZEN_MAP_MAGIC) return 'bad magic (not a bdsnap frozen change map)';
  if (h.readUInt32LE(8) !== FROZEN_MAP_VERSION) return `unsupported version ${h.readUInt32LE(8)}`;
  if (h.readUInt32LE(FROZEN_CRC_AT) !== crc32(h.subarray(0, FROZEN_CRC_AT))) return 'header checksum mismatch';
  const number = h.readUInt32LE(20);
  const blockSize = h.readUInt32LE(24);
  const blocks = h.readUInt32LE(28);
  const deviceSizeBytes = readU64(h, 32);
  if (h.readUInt32LE(12) !== FROZEN_HEADER_BYTES || !validBlockSize(blockSize)
    || blocks !== Math.ceil(deviceSizeBytes / blockSize) || blocks > MAX_TRACKING_BLOCKS) {
    return 'inconsistent header (block size, blocks, device size)';
  }
  if (fileBytes !== FROZEN_HEADER_BYTES + blocks * 4) return `file is ${fileBytes} bytes, expected ${FROZEN_HEADER_BYTES + blocks * 4}`;
  return { generation: readGeneration(h, 16), number, blockSize, blocks, deviceSizeBytes };
}
