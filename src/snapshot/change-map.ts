/**
 * Change-block tracking (CBT) that survives daemon restarts and crashes.
 *
 * Model (blksnap's, with wider entries and a file behind it): the device is cut into tracking
 * blocks; `map[i]` holds the number of the snapshot period in which block i last changed (0 =
 * not changed in this generation). The current period starts at 1; taking a snapshot freezes
 * a copy of the map (the snapshot's view, with the number of the period it ends) and moves the
 * live map to the next number. "Changed since snapshot N" is `map[i] > N`. Numbers compare only
 * within one generation (a random id); whenever the map cannot be trusted it is reset to a new
 * generation with numbers starting again at 1, and the reset says why.
 *
 * Block size: 64 KiB, doubled until the map has at most 2^21 blocks (so up to 128 GiB -> 64 KiB,
 * 256 GiB -> 128 KiB, 1 TiB -> 512 KiB); memory and file stay at most 8 MiB per map. Entries
 * are Uint32: a device would need four billion snapshots to wrap one (a wrap resets the
 * generation with reason 'wrapped', as blksnap does at 255).
 *
 * Invariants:
 * - mark() puts the new entries in memory and in the map file (pwrite into the page cache)
 *   synchronously, before it returns; the caller issues the device write afterwards. So a
 *   killed process never leaves a written block unmarked. A rewrite of a block already marked
 *   in this period costs a typed-array compare and no system call.
 * - 'strict' durability: the entries are also on stable storage (one fdatasync for every mark
 *   that queued meanwhile, group commit) before mark()'s promise resolves, and a rewrite of a
 *   block whose entry is not yet durable waits for that sync too. A host crash then loses
 *   nothing, and the map is kept across it.
 * - 'process' durability: a host crash may drop the file's last writes. The file records the
 *   boot id of the session that opened it and a clean flag set only by close(); an unclean
 *   file from another boot is not trusted (reset 'host-crash').
 * - The header is written before any entry that depends on it (a new number, a new
 *   generation), so an entry is never above the header's number + 1; one above that is
 *   corruption.
 * - The header holds the device's stamp (src/host/device-stamp.ts): the one read at open while
 *   the map is in use, the one read at close (after the device's last flush and close) once it
 *   is clean. The next open compares that with the stamp then: any difference is a change made
 *   while bdsnap did not serve the device, and starts a new generation ('changed-outside', or
 *   'cannot-verify' when nothing proves it either way). After an unclean stop a file's times
 *   are compared with the last write seen; a block device's counters prove nothing (the
 *   daemon's own last writes moved them), so its map starts again.
 *
 * Map file (all integers little-endian), `HEADER_BYTES` of header then one u32 per block:
 *   0  magic "BDSNPCBT"            8  u32 version (2)          12 u32 header bytes (4096)
 *   16 u32 generation              20 u32 block size           24 u32 blocks
 *   28 u32 current number          32 u64 device size bytes    40 u32 flags (1 clean, 2 poisoned)
 *   48 boot id (48 bytes ASCII, NUL padded)                    96 u64 last write seen (ms since epoch)
 *   136 u64 generation created (ms since epoch)
 *   144 u32 stamp bytes (0: none)  148 the device stamp as JSON
 *   4092 u32 CRC-32 of bytes 0..4091
 * "Last write seen" is refreshed at most once a second while writes go on, so after an
 * unclean stop an image whose mtime or ctime is later than it (+2 s of slack) was written by
 * someone else. Version 1 maps (without a complete stamp) are not trusted.
 */

import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { crc32 } from 'node:zlib';
import { BdsnapError, toBdsnapError } from '../errors.js';
import { checkRange, type BlockDevice } from '../device/block-device.js';
import { PassThroughDevice } from '../device/pass-through.js';
import { makeDirectoryDurable, writeFileAtomicSync } from '../host/atomic-file.js';
import { compareDeviceStamps, parseDeviceStamp, readBootId, type DeviceStamp } from '../host/device-stamp.js';
import { fdatasyncFd, fdatasyncFdSync, ftruncateFdSync, preadFullySync, pwriteFullySync } from '../host/fd-io.js';
import { readU64, writeU64 } from './format.js';

export const CHANGE_MAP_MAGIC = 'BDSNPCBT';
export const FROZEN_MAP_MAGIC = 'BDSNPCBF';
export const CHANGE_MAP_VERSION = 2;
export const FROZEN_MAP_VERSION = 1;
/** The entries start on their own page, so an entry write never touches the header's page. */
const HEADER_BYTES = 4096;
const HEADER_CRC_AT = HEADER_BYTES - 4;
const STAMP_LENGTH_AT = 144;
const STAMP_AT = 148;
const MAX_STAMP_BYTES = HEADER_CRC_AT - STAMP_AT;
const FROZEN_HEADER_BYTES = 64;
const FROZEN_CRC_AT = 60;
export const MIN_TRACKING_BLOCK_BYTES = 64 * 1024;
export const MAX_TRACKING_BLOCKS = 1 << 21;
/** Highest period number before the map wraps to a new generation. */
const MAX_NUMBER = 0xffff_fff0;
const FLAG_CLEAN = 1;
const FLAG_POISONED = 2;
const BOOT_ID_BYTES = 48;
/** "Last write seen" is refreshed by the first write after this long (a timer marks it stale). */
const LAST_WRITE_REFRESH_MS = 1000;
/** Slack between "last write seen" and the image's mtime or ctime after an unclean stop. */
const MTIME_SLACK_MS = 2000;
const LITTLE_ENDIAN = os.endianness() === 'LE';

export type Durability = 'process' | 'strict';

export type { DeviceStamp };

export interface ChangeMapOptions {
  /** The map file (created with its directory if missing). */
  file: string;
  deviceSizeBytes: number;
  durability: Durability;
  /**
   * The device's stamp now (readDeviceStamp, after a flush of the device). Absent: nothing is
   * compared, for a map used on its own; the daemon always gives one.
   */
  deviceStamp?: DeviceStamp | null;
  /** Default: read /proc/sys/kernel/random/boot_id. */
  bootId?: string;
  /** Called for a reset the map decides on its own later (a wrap in advance()). */
  onReset?: (reset: ChangeMapReset) => void;
}

/**
 * 'changed-outside': the device was proven written (or replaced) while bdsnap did not serve it;
 * 'cannot-verify': nothing proves it unchanged (a block device after a reboot or an unclean
 * stop, a stamp that cannot be read, a map without one).
 */
export type ChangeMapResetReason = 'new' | 'host-crash' | 'changed-outside' | 'cannot-verify' | 'size-changed' | 'corrupt' | 'requested' | 'wrapped';

export type ChangeMapReset = { reason: ChangeMapResetReason; detail: string; previousGeneration: string | null };

export interface ByteRange {
  offsetBytes: number;
  lengthBytes: number;
}

export interface ChangeMapInfo {
  blockSize: number;
  blocks: number;
  generation: string;
  number: number;
  deviceSizeBytes: number;
}

/** The qemu:dirty-bitmap flag: set = the extent changed. */
export const DIRTY_BITMAP_CHANGED = 1;

/**
 * The NBD metadata context under which a snapshot image offers "changed since snapshot
 * `sinceNumber`" of generation `generation`: `qemu:dirty-bitmap:<generation>:<sinceNumber>`.
 * An image of snapshot k offers one for each earlier number 1..k-1 of its own generation. A
 * consumer asks for the name built from the generation and number it recorded at its last
 * backup; after a reset that generation is gone, the context does not exist, and the consumer
 * must read everything (it can never get a map that under-reports).
 */
export function dirtyBitmapContextName(generation: string, sinceNumber: number): string {
  return `qemu:dirty-bitmap:${generation}:${sinceNumber}`;
}

/** 64 KiB, doubled until the device fits in MAX_TRACKING_BLOCKS blocks. */
export function trackingBlockSize(deviceSizeBytes: number): number {
  let blockSize = MIN_TRACKING_BLOCK_BYTES;
  while (Math.ceil(deviceSizeBytes / blockSize) > MAX_TRACKING_BLOCKS) blockSize *= 2;
  return blockSize;
}

function newGeneration(): string {
  return randomBytes(4).toString('hex');
}

/** The file bytes of entries lo..hi (a view of the array on little-endian machines). */
function entryBytes(entries: Uint32Array, lo: number, hi: number): Buffer {
  if (LITTLE_ENDIAN) return Buffer.from(entries.buffer, entries.byteOffset + lo * 4, (hi - lo + 1) * 4);
  const b = Buffer.allocUnsafe((hi - lo + 1) * 4);
  for (let i = lo; i <= hi; i++) b.writeUInt32LE(entries[i]!, (i - lo) * 4);
  return b;
}

/** Read `entries.length` u32 entries from the file at `position`; false if the file is short. */
function readEntries(fd: number, entries: Uint32Array, position: number): boolean {
  const bytes = entries.length * 4;
  if (LITTLE_ENDIAN) return preadFullySync(fd, Buffer.from(entries.buffer, entries.byteOffset, bytes), position) === bytes;
  const b = Buffer.allocUnsafe(bytes);
  if (preadFullySync(fd, b, position) !== bytes) return false;
  for (let i = 0; i < entries.length; i++) entries[i] = b.readUInt32LE(i * 4);
  return true;
}

/** First and last index changed by the latest setEntries() (reused: mark() allocates nothing). */
const changedSpan = new Int32Array(2);

/**
 * Set entries first..last to n. Returns the first index that was not already n (or -1), and
 * leaves it and the last such index in changedSpan: the span to write to the file.
 */
function setEntries(entries: Uint32Array, first: number, last: number, n: number): number {
  let lo = -1;
  let hi = -1;
  for (let i = first; i <= last; i++) {
    if (entries[i] !== n) {
      if (lo < 0) lo = i;
      hi = i;
      entries[i] = n;
    }
  }
  changedSpan[0] = lo;
  changedSpan[1] = hi;
  return lo;
}

function checkNumber(sinceNumber: number): void {
  if (!Number.isSafeInteger(sinceNumber) || sinceNumber < 0) throw new BdsnapError('EINVAL', `bad snapshot number ${sinceNumber}`);
}

/** Clip [offset, offset+length) to the device; undefined length = to the end. */
function window(deviceSizeBytes: number, offsetBytes = 0, lengthBytes?: number): { start: number; end: number } {
  if (!Number.isSafeInteger(offsetBytes) || offsetBytes < 0 || (lengthBytes !== undefined && (!Number.isSafeInteger(lengthBytes) || lengthBytes < 0))) {
    throw new BdsnapError('EINVAL', `bad range: offset ${offsetBytes}, length ${String(lengthBytes)}`);
  }
  const end = Math.min(deviceSizeBytes, lengthBytes === undefined ? deviceSizeBytes : offsetBytes + lengthBytes);
  return { start: Math.min(offsetBytes, deviceSizeBytes), end };
}

/** Visit the merged byte ranges of the blocks with entry > since, clipped to the window, in order. */
function visitChanged(
  entries: Uint32Array, blockSize: number, deviceSizeBytes: number, since: number, visit: (offsetBytes: number, lengthBytes: number) => void,
  offsetBytes?: number, lengthBytes?: number,
): void {
  checkNumber(since);
  const { start, end } = window(deviceSizeBytes, offsetBytes, lengthBytes);
  if (end <= start) return;
  const last = Math.floor((end - 1) / blockSize);
  let i = Math.floor(start / blockSize);
  while (i <= last) {
    while (i <= last && entries[i]! <= since) i++;
    if (i > last) break;
    const runStart = i;
    while (i <= last && entries[i]! > since) i++;
    const from = Math.max(start, runStart * blockSize);
    visit(from, Math.min(end, i * blockSize) - from);
  }
}

function changedRanges(entries: Uint32Array, blockSize: number, deviceSizeBytes: number, since: number, offsetBytes?: number, lengthBytes?: number): ByteRange[] {
  const out: ByteRange[] = [];
  visitChanged(entries, blockSize, deviceSizeBytes, since, (o, l) => out.push({ offsetBytes: o, lengthBytes: l }), offsetBytes, lengthBytes);
  return out;
}

/** Contiguous extents from the offset, flag DIRTY_BITMAP_CHANGED where entry > since. */
function changedExtents(entries: Uint32Array, blockSize: number, deviceSizeBytes: number, since: number, offsetBytes: number, lengthBytes: number): Array<{ length: number; flags: number }> {
  checkNumber(since);
  const { start, end } = window(deviceSizeBytes, offsetBytes, lengthBytes);
  const out: Array<{ length: number; flags: number }> = [];
  const lastBlock = Math.floor((end - 1) / blockSize);
  let at = start;
  while (at < end) {
    const i = Math.floor(at / blockSize);
    const changed = entries[i]! > since;
    const flags = changed ? DIRTY_BITMAP_CHANGED : 0;
    let j = i + 1;
    while (j <= lastBlock && entries[j]! > since === changed) j++;
    const to = Math.min(end, j * blockSize);
    out.push({ length: to - at, flags });
    at = to;
  }
  return out;
}

interface SyncBatch {
  promise: Promise<void>;
  resolve: () => void;
  reject: (err: BdsnapError) => void;
  /** [first, last, number] of each entry range written before this batch's sync starts. */
  ranges: number[];
  epoch: number;
}

interface ParsedHeader {
  generation: string;
  blockSize: number;
  blocks: number;
  number: number;
  deviceSizeBytes: number;
  flags: number;
  bootId: string;
  lastWriteSeenMs: number;
  createdMs: number;
  /** The stamp at open (unclean) or at close (clean); undefined when none was recorded. */
  stamp: DeviceStamp | undefined;
}

function parseHeader(h: Buffer, fileBytes: number): ParsedHeader | string {
  if (h.length < HEADER_BYTES) return `the file is too short for a header (${fileBytes} bytes)`;
  if (h.toString('latin1', 0, 8) !== CHANGE_MAP_MAGIC) return 'bad magic (not a bdsnap change map)';
  const version = h.readUInt32LE(8);
  if (version !== CHANGE_MAP_VERSION) return `unsupported version ${version}`;
  if (h.readUInt32LE(HEADER_CRC_AT) !== crc32(h.subarray(0, HEADER_CRC_AT))) return 'header checksum mismatch';
  if (h.readUInt32LE(12) !== HEADER_BYTES) return `unexpected header size ${h.readUInt32LE(12)}`;
  const blockSize = h.readUInt32LE(20);
  const blocks = h.readUInt32LE(24);
  const deviceSizeBytes = readU64(h, 32);
  if (blockSize < 4096 || (blockSize & (blockSize - 1)) !== 0) return `bad block size ${blockSize}`;
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
    generation: h.readUInt32LE(16).toString(16).padStart(8, '0'),
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
function encodeStamp(stamp: DeviceStamp | undefined): Buffer | undefined {
  if (!stamp) return undefined;
  const bytes = Buffer.from(JSON.stringify(stamp), 'utf8');
  if (bytes.length > MAX_STAMP_BYTES) throw new BdsnapError('EINVAL', `the device stamp takes ${bytes.length} bytes, more than the map header holds (${MAX_STAMP_BYTES})`);
  return bytes;
}

/**
 * After an unclean stop, the stamp recorded at open against the stamp now: what is left to
 * compare when the counters and times at the last write are not known. Null: nothing against.
 */
function uncleanChange(recorded: DeviceStamp | undefined, now: DeviceStamp, lastWriteSeenMs: number): { reason: ChangeMapResetReason; detail: string } | null {
  if (now.kind === 'block') {
    return {
      reason: 'cannot-verify',
      detail: 'the daemon stopped without closing the map (killed or crashed) while it served this block device; its write counters cannot tell the daemon\'s last writes from anyone else\'s',
    };
  }
  if (!recorded) return { reason: 'cannot-verify', detail: 'the map was not closed cleanly and has no record of the image file to compare with' };
  if (recorded.kind !== 'file' || recorded.dev !== now.dev || recorded.ino !== now.ino) {
    return { reason: 'changed-outside', detail: `the map was not closed cleanly and ${devicePathWord(recorded)} is now another file (${now.dev}:${now.ino})` };
  }
  for (const [name, ns] of [['mtime', now.mtimeNs], ['ctime', now.ctimeNs]] as const) {
    const ms = Number(BigInt(ns) / 1_000_000n);
    if (ms > lastWriteSeenMs + MTIME_SLACK_MS) {
      return { reason: 'changed-outside', detail: `the image file's ${name} is ${new Date(ms).toISOString()}, after the last write seen at ${new Date(lastWriteSeenMs).toISOString()}` };
    }
  }
  return null;
}

function devicePathWord(stamp: DeviceStamp): string {
  return stamp.kind === 'file' ? `the image file (${stamp.dev}:${stamp.ino})` : 'the block device';
}

/** The live change map of one device. Open with ChangeMap.open(). */
export class ChangeMap {
  readonly blockSize: number;
  readonly blocks: number;
  readonly #file: string;
  readonly #deviceSizeBytes: number;
  readonly #durability: Durability;
  readonly #bootId: string;
  readonly #onReset: ((reset: ChangeMapReset) => void) | undefined;
  #fd: number;
  #entries: Uint32Array;
  /** strict only: the value of each entry known to be on stable storage. */
  #durable: Uint32Array | undefined;
  #generation: string;
  #createdMs: number;
  #number: number;
  #lastWriteSeenMs = 0;
  /** Set by a timer once a second: the next mark refreshes "last write seen" (no clock read per write). */
  #lastWriteStale = true;
  #staleTimer: NodeJS.Timeout | undefined;
  #closed = false;
  #failure: string | undefined;
  /** Bumped by every reset, so a sync batch of the old file does not touch the new state. */
  #epoch = 0;
  #syncing: SyncBatch | undefined;
  #next: SyncBatch | undefined;
  #header = Buffer.alloc(HEADER_BYTES);
  /** The device's stamp the header records: the one read at open, then the one given to close(). */
  #stamp: DeviceStamp | undefined;
  /** #stamp as the header stores it (encoded once, not at every header write). */
  #stampBytes: Buffer | undefined;

  private constructor(options: ChangeMapOptions, bootId: string, fd: number, state: { generation: string; number: number; entries: Uint32Array; createdMs: number }) {
    this.#file = options.file;
    this.#deviceSizeBytes = options.deviceSizeBytes;
    this.#durability = options.durability;
    this.#bootId = bootId;
    this.#onReset = options.onReset;
    this.#stamp = options.deviceStamp ?? undefined;
    this.#stampBytes = encodeStamp(this.#stamp);
    this.blockSize = trackingBlockSize(options.deviceSizeBytes);
    this.blocks = Math.ceil(options.deviceSizeBytes / this.blockSize);
    this.#fd = fd;
    this.#entries = state.entries;
    this.#generation = state.generation;
    this.#number = state.number;
    this.#createdMs = state.createdMs;
    if (this.#durability === 'strict') this.#durable = state.entries.slice();
    this.#staleTimer = setInterval(() => {
      this.#lastWriteStale = true;
    }, LAST_WRITE_REFRESH_MS);
    this.#staleTimer.unref();
  }

  /**
   * Open the map of a device, or start a new generation when there is none or it cannot be
   * trusted; `reset` says why (null when the map was kept). Errors: EINVAL (bad options),
   * EIO/EPERM (the file cannot be written).
   */
  static async open(options: ChangeMapOptions): Promise<{ map: ChangeMap; reset: ChangeMapReset | null }> {
    if (!Number.isSafeInteger(options.deviceSizeBytes) || options.deviceSizeBytes < 0) {
      throw new BdsnapError('EINVAL', `bad device size ${options.deviceSizeBytes}`);
    }
    if (options.durability !== 'process' && options.durability !== 'strict') {
      throw new BdsnapError('EINVAL', `durability must be 'process' or 'strict', got ${String(options.durability)}`);
    }
    const stamp = options.deviceStamp ?? undefined;
    encodeStamp(stamp);
    const bootId = options.bootId ?? readBootId();
    try {
      await makeDirectoryDurable(path.dirname(options.file), { recursive: true, mode: 0o700 });
      const { fd, state, reset } = ChangeMap.#load(options, bootId, stamp);
      const map = new ChangeMap(options, bootId, fd, state);
      try {
        if (reset) {
          map.#replaceFile();
        } else {
          // From here on the file is "in use": unclean until close(), with this boot's id and
          // the stamp at open (what an unclean stop leaves to compare).
          map.#lastWriteSeenMs = Date.now();
          map.#writeHeader(0);
          fdatasyncFdSync(fd);
        }
      } catch (err) {
        clearInterval(map.#staleTimer);
        if (fd >= 0) fs.closeSync(fd);
        throw err;
      }
      return { map, reset };
    } catch (err) {
      throw toBdsnapError(err);
    }
  }

  static #load(options: ChangeMapOptions, bootId: string, stamp: DeviceStamp | undefined): {
    fd: number; state: { generation: string; number: number; entries: Uint32Array; createdMs: number }; reset: ChangeMapReset | null;
  } {
    const blocks = Math.ceil(options.deviceSizeBytes / trackingBlockSize(options.deviceSizeBytes));
    const fresh = (reason: ChangeMapResetReason, detail: string, previousGeneration: string | null) => ({
      fd: -1,
      state: { generation: newGeneration(), number: 1, entries: new Uint32Array(blocks), createdMs: Date.now() },
      reset: { reason, detail, previousGeneration } as ChangeMapReset,
    });
    let fd: number;
    try {
      fd = fs.openSync(options.file, 'r+');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return fresh('new', 'no change map yet: every block counts as changed', null);
      throw err;
    }
    let keep = false;
    try {
      const fileBytes = fs.fstatSync(fd).size;
      const h = Buffer.alloc(HEADER_BYTES);
      const headerBytes = preadFullySync(fd, h, 0);
      if (headerBytes >= 20 && h.toString('latin1', 0, 8) === CHANGE_MAP_MAGIC && h.readUInt32LE(8) === 1) {
        return fresh('cannot-verify', 'the map was written by an earlier version of bdsnap, which kept no complete stamp of the device', h.readUInt32LE(16).toString(16).padStart(8, '0'));
      }
      const parsed = parseHeader(h.subarray(0, headerBytes), fileBytes);
      if (typeof parsed === 'string') return fresh('corrupt', `${options.file}: ${parsed}`, null);
      const prev = parsed.generation;
      if ((parsed.flags & FLAG_POISONED) !== 0) return fresh('corrupt', 'an earlier write of the map file failed', prev);
      if (parsed.deviceSizeBytes !== options.deviceSizeBytes) {
        return fresh('size-changed', `the device is ${options.deviceSizeBytes} bytes, the map was for ${parsed.deviceSizeBytes}`, prev);
      }
      if (parsed.blockSize !== trackingBlockSize(options.deviceSizeBytes)) {
        return fresh('corrupt', `the map has blocks of ${parsed.blockSize} bytes, this version uses ${trackingBlockSize(options.deviceSizeBytes)}`, prev);
      }
      const clean = (parsed.flags & FLAG_CLEAN) !== 0;
      if (!clean && options.durability === 'process' && (parsed.bootId === '' || parsed.bootId !== bootId)) {
        return fresh('host-crash', `the map was not closed cleanly and the host has restarted since (boot ${parsed.bootId || 'unknown'}, now ${bootId || 'unknown'}); its last writes may be lost`, prev);
      }
      if (stamp) {
        if (clean) {
          if (!parsed.stamp) return fresh('cannot-verify', 'the map has no record of the device to compare with (its stamp could not be read when it was closed)', prev);
          const compared = compareDeviceStamps(parsed.stamp, stamp);
          if (!compared.same) return fresh(compared.proven ? 'changed-outside' : 'cannot-verify', compared.detail, prev);
        } else {
          const change = uncleanChange(parsed.stamp, stamp, parsed.lastWriteSeenMs);
          if (change) return fresh(change.reason, change.detail, prev);
        }
      }
      const entries = new Uint32Array(parsed.blocks);
      if (!readEntries(fd, entries, HEADER_BYTES)) return fresh('corrupt', `${options.file}: the entries are cut short`, prev);
      let max = 0;
      for (let i = 0; i < entries.length; i++) if (entries[i]! > max) max = entries[i]!;
      if (max > parsed.number + 1) return fresh('corrupt', `an entry holds number ${max}, beyond the current number ${parsed.number}`, prev);
      keep = true;
      // An entry one above the header's number: the header of an advance() did not reach the
      // disk but an entry of the new period did (strict, after a host crash): adopt it.
      return { fd, state: { generation: prev, number: Math.max(parsed.number, max, 1), entries, createdMs: parsed.createdMs }, reset: null };
    } finally {
      if (!keep) fs.closeSync(fd);
    }
  }

  get generation(): string {
    return this.#generation;
  }

  get number(): number {
    return this.#number;
  }

  get durability(): Durability {
    return this.#durability;
  }

  /** Why the map file could not be written (the map is then reset at the next open), if it failed. */
  get failure(): string | undefined {
    return this.#failure;
  }

  info(): ChangeMapInfo {
    return { blockSize: this.blockSize, blocks: this.blocks, generation: this.#generation, number: this.#number, deviceSizeBytes: this.#deviceSizeBytes };
  }

  /**
   * Record that bytes offset..offset+length are about to change. Call BEFORE the write can
   * reach the device. 'process': returns undefined, everything is done. 'strict': returns a
   * promise when the entries are not yet on stable storage; issue the write after it resolves.
   */
  mark(offsetBytes: number, lengthBytes: number): void | Promise<void> {
    if (this.#closed) throw new BdsnapError('ESHUTDOWN', 'the change map is closed');
    if (lengthBytes <= 0) return undefined;
    if (offsetBytes + lengthBytes > this.#deviceSizeBytes || offsetBytes < 0) {
      throw new BdsnapError('EINVAL', `range ${offsetBytes}+${lengthBytes} is past the end of the device (${this.#deviceSizeBytes} bytes)`);
    }
    const bs = this.blockSize;
    const first = Math.floor(offsetBytes / bs);
    const last = Math.floor((offsetBytes + lengthBytes - 1) / bs);
    const n = this.#number;
    const lo = setEntries(this.#entries, first, last, n);
    const hi = changedSpan[1]!;
    if (this.#lastWriteStale) this.#touch(Date.now());
    if (lo >= 0) this.#writeEntries(lo, hi);
    const durable = this.#durable;
    if (!durable) return undefined;
    if (lo >= 0) return this.#waitDurable(true, lo, hi, n);
    for (let i = first; i <= last; i++) if (durable[i] !== n) return this.#waitDurable(false, 0, 0, 0);
    return undefined;
  }

  /** Mark ranges changed by hand (the operator knows better); durable in 'strict'. */
  async markDirty(ranges: ByteRange[]): Promise<void> {
    for (const r of ranges) checkRange({ size: this.#deviceSizeBytes }, r.offsetBytes, r.lengthBytes, false);
    const waits: Promise<void>[] = [];
    for (const r of ranges) {
      const p = this.mark(r.offsetBytes, r.lengthBytes);
      if (p) waits.push(p);
    }
    await Promise.all(waits);
  }

  /**
   * The snapshot's frozen view at this point, then the next number. Call under the write
   * barrier (no modifying request in flight), so no write falls between the two.
   */
  advance(): FrozenChangeMap {
    if (this.#closed) throw new BdsnapError('ESHUTDOWN', 'the change map is closed');
    const frozen = new FrozenChangeMap({
      generation: this.#generation, number: this.#number, blockSize: this.blockSize,
      deviceSizeBytes: this.#deviceSizeBytes, entries: this.#entries.slice(),
    });
    if (this.#number >= MAX_NUMBER) {
      const reset = this.#resetSync('wrapped', `the period number reached ${this.#number}`);
      this.#onReset?.(reset);
      return frozen;
    }
    this.#number++;
    try {
      this.#writeHeader(0);
      // The new number must be on disk before any entry of the new period can be (strict).
      if (this.#durable) fdatasyncFdSync(this.#fd);
    } catch (err) {
      this.#poison(err);
    }
    return frozen;
  }

  /**
   * Start a new generation: every block counts as changed for every consumer. Call under the
   * write barrier, like advance(): a write marked in the old generation and landing after the
   * reset is not in the new one.
   */
  async reset(reason: ChangeMapResetReason, detail: string): Promise<ChangeMapReset> {
    if (this.#closed) throw new BdsnapError('ESHUTDOWN', 'the change map is closed');
    return this.#resetSync(reason, detail);
  }

  /** Merged byte ranges changed since snapshot `sinceNumber` (0: since the generation began). */
  changedSince(sinceNumber: number, offsetBytes?: number, lengthBytes?: number): ByteRange[] {
    return changedRanges(this.#entries, this.blockSize, this.#deviceSizeBytes, sinceNumber, offsetBytes, lengthBytes);
  }

  /**
   * The same ranges as changedSince, handed to `visit` in order without building an array: for
   * streaming a map with very many ranges (a million alternating blocks) where allocation dominates.
   */
  forEachChanged(sinceNumber: number, visit: (offsetBytes: number, lengthBytes: number) => void, offsetBytes?: number, lengthBytes?: number): void {
    visitChanged(this.#entries, this.blockSize, this.#deviceSizeBytes, sinceNumber, visit, offsetBytes, lengthBytes);
  }

  /** The device's stamp given at open, or null: what to give close() when nothing wrote the device meanwhile. */
  get deviceStamp(): DeviceStamp | null {
    return this.#stamp ?? null;
  }

  /**
   * Clean close: wait for syncs in flight, record the device's stamp, mark the file clean and
   * make it durable. Give the stamp read after the device's last write was flushed and its
   * descriptor closed; null when it is not known (the next open that compares stamps then
   * resets). A map whose file failed is left unclean (reset at the next open).
   */
  async close(deviceStamp: DeviceStamp | null): Promise<void> {
    if (this.#closed) return;
    let stamp = deviceStamp ?? undefined;
    let stampBytes: Buffer | undefined;
    try {
      stampBytes = encodeStamp(stamp);
    } catch {
      // Too large to record: the next open cannot vouch for the device.
      stamp = undefined;
    }
    this.#closed = true;
    clearInterval(this.#staleTimer);
    try {
      await this.#syncing?.promise.catch(() => undefined);
      await this.#next?.promise.catch(() => undefined);
      if (this.#failure === undefined) {
        this.#lastWriteSeenMs = Date.now();
        this.#stamp = stamp;
        this.#stampBytes = stampBytes;
        this.#writeHeader(FLAG_CLEAN);
        await fdatasyncFd(this.#fd);
      }
    } finally {
      fs.closeSync(this.#fd);
    }
  }

  // ---- file -------------------------------------------------------------------------------

  #writeHeader(flags: number): void {
    this.#fillHeader(flags);
    pwriteFullySync(this.#fd, this.#header, 0);
  }

  #touch(now: number): void {
    this.#lastWriteStale = false;
    this.#lastWriteSeenMs = now;
    if (this.#failure !== undefined) return;
    try {
      this.#writeHeader(0);
    } catch (err) {
      this.#poison(err);
      return;
    }
    // strict: let the refreshed time reach the disk too, without holding any write for it.
    if (this.#durable && !this.#next) this.#waitDurable(false, 0, 0, 0).catch(() => undefined);
  }

  #writeEntries(lo: number, hi: number): void {
    if (this.#failure !== undefined) {
      if (this.#durable) throw new BdsnapError('EIO', `the change map cannot be written: ${this.#failure}`);
      return;
    }
    try {
      pwriteFullySync(this.#fd, entryBytes(this.#entries, lo, hi), HEADER_BYTES + lo * 4);
    } catch (err) {
      this.#poison(err);
      // strict promises durability before the device write: without it the write must fail.
      if (this.#durable) throw new BdsnapError('EIO', `the change map cannot be written: ${this.#failure}`, { cause: err });
    }
  }

  /**
   * The file cannot be written: keep tracking in memory (exact while the process lives) and
   * make sure the next open resets: flag the header, or failing that cut the file short.
   */
  #poison(err: unknown): void {
    if (this.#failure !== undefined) return;
    this.#failure = toBdsnapError(err).message;
    try {
      this.#writeHeader(FLAG_POISONED);
      fdatasyncFdSync(this.#fd);
    } catch {
      try {
        ftruncateFdSync(this.#fd, 0);
      } catch {
        // Nothing more can be done from here; the failure is reported through `failure`.
      }
    }
  }

  /**
   * strict: a promise resolved once everything written so far is on stable storage. `marked`:
   * entries lo..hi were just written with number n, and count as durable after that sync.
   */
  #waitDurable(marked: boolean, lo: number, hi: number, n: number): Promise<void> {
    // Everything written before the sync in flight started is covered by it.
    if (!marked && !this.#next && this.#syncing) return this.#syncing.promise;
    if (!this.#next) {
      let resolve!: () => void;
      let reject!: (err: BdsnapError) => void;
      const promise = new Promise<void>((res, rej) => {
        resolve = res;
        reject = rej;
      });
      this.#next = { promise, resolve, reject, ranges: [], epoch: this.#epoch };
      if (!this.#syncing) queueMicrotask(() => this.#startSync());
    }
    if (marked) this.#next.ranges.push(lo, hi, n);
    return this.#next.promise;
  }

  #startSync(): void {
    const batch = this.#next;
    if (!batch || this.#syncing) return;
    this.#next = undefined;
    this.#syncing = batch;
    const fd = this.#fd;
    const done = (err: Error | null): void => {
      this.#syncing = undefined;
      if (fd !== this.#fd) {
        // A reset replaced the file meanwhile: its old fd was kept open for this sync only.
        fs.close(fd, () => undefined);
        batch.resolve();
      } else if (err) {
        this.#poison(err);
        batch.reject(new BdsnapError('EIO', `the change map cannot be made durable: ${err.message}`, { cause: err }));
      } else {
        const durable = this.#durable;
        if (durable && batch.epoch === this.#epoch) {
          const r = batch.ranges;
          for (let k = 0; k < r.length; k += 3) {
            const n = r[k + 2]!;
            for (let i = r[k]!; i <= r[k + 1]!; i++) if (durable[i]! < n) durable[i] = n;
          }
        }
        batch.resolve();
      }
      if (this.#next) this.#startSync();
    };
    fdatasyncFd(fd).then(() => done(null), done);
  }

  /** New generation, in memory and in a new file that replaces the old one atomically. */
  #resetSync(reason: ChangeMapResetReason, detail: string): ChangeMapReset {
    const previousGeneration = this.#generation;
    this.#epoch++;
    this.#generation = newGeneration();
    this.#createdMs = Date.now();
    this.#number = 1;
    this.#entries.fill(0);
    this.#durable?.fill(0);
    // A sync in flight on the old fd closes it when done (so its number is not reused under it).
    if (!this.#syncing) {
      try {
        fs.closeSync(this.#fd);
      } catch {
        // The old file is about to be replaced.
      }
    }
    this.#failure = undefined;
    this.#replaceFile();
    return { reason, detail, previousGeneration };
  }

  /** Write the whole map to a new file (unclean, this boot) and make it the map file. */
  #replaceFile(): void {
    this.#lastWriteSeenMs = Date.now();
    this.#fillHeader(0);
    writeFileAtomicSync(this.#file, [this.#header, entryBytes(this.#entries, 0, this.#entries.length - 1)]);
    this.#fd = fs.openSync(this.#file, 'r+');
  }

  #fillHeader(flags: number): void {
    const h = this.#header;
    h.fill(0);
    h.write(CHANGE_MAP_MAGIC, 0, 'latin1');
    h.writeUInt32LE(CHANGE_MAP_VERSION, 8);
    h.writeUInt32LE(HEADER_BYTES, 12);
    h.writeUInt32LE(Number.parseInt(this.#generation, 16) >>> 0, 16);
    h.writeUInt32LE(this.blockSize, 20);
    h.writeUInt32LE(this.blocks, 24);
    h.writeUInt32LE(this.#number, 28);
    writeU64(h, this.#deviceSizeBytes, 32);
    h.writeUInt32LE(flags, 40);
    h.write(this.#bootId.slice(0, BOOT_ID_BYTES), 48, 'latin1');
    writeU64(h, this.#lastWriteSeenMs, 96);
    writeU64(h, this.#createdMs, 136);
    const stamp = this.#stampBytes;
    if (stamp) {
      h.writeUInt32LE(stamp.length, STAMP_LENGTH_AT);
      stamp.copy(h, STAMP_AT);
    }
    h.writeUInt32LE(crc32(h.subarray(0, HEADER_CRC_AT)), HEADER_CRC_AT);
  }
}

/**
 * A snapshot's view of the change map, frozen when the snapshot was taken. Writes to the
 * snapshot's image mark it too (with its own number), so a backup of the image reads them.
 *
 * File (little-endian), FROZEN_HEADER_BYTES of header then one u32 per block:
 *   0 magic "BDSNPCBF"   8 u32 version (1)   12 u32 header bytes (64)   16 u32 generation
 *   20 u32 number        24 u32 block size   28 u32 blocks              32 u64 device size bytes
 *   60 u32 CRC-32 of bytes 0..59
 * After save() or load() the view stays attached to its file: mark() writes the changed entries
 * there at once (page cache), like the live map in 'process' durability. Entries are checked
 * on load (none may exceed the view's number).
 */
export class FrozenChangeMap {
  readonly generation: string;
  readonly number: number;
  readonly blockSize: number;
  readonly blocks: number;
  readonly deviceSizeBytes: number;
  readonly #entries: Uint32Array;
  #fd: number | undefined;

  /** Normally made by ChangeMap.advance() or FrozenChangeMap.load(). */
  constructor(init: { generation: string; number: number; blockSize: number; deviceSizeBytes: number; entries: Uint32Array }) {
    this.generation = init.generation;
    this.number = init.number;
    this.blockSize = init.blockSize;
    this.deviceSizeBytes = init.deviceSizeBytes;
    this.blocks = Math.ceil(init.deviceSizeBytes / init.blockSize);
    if (init.entries.length !== this.blocks) throw new BdsnapError('EINVAL', `${init.entries.length} entries for ${this.blocks} blocks`);
    this.#entries = init.entries;
  }

  /** Merged byte ranges changed since snapshot `sinceNumber`, as of this view. */
  changedSince(sinceNumber: number, offsetBytes?: number, lengthBytes?: number): ByteRange[] {
    return changedRanges(this.#entries, this.blockSize, this.deviceSizeBytes, sinceNumber, offsetBytes, lengthBytes);
  }

  /** changedSince without the array (see ChangeMap.forEachChanged). */
  forEachChanged(sinceNumber: number, visit: (offsetBytes: number, lengthBytes: number) => void, offsetBytes?: number, lengthBytes?: number): void {
    visitChanged(this.#entries, this.blockSize, this.deviceSizeBytes, sinceNumber, visit, offsetBytes, lengthBytes);
  }

  /**
   * Extents for the qemu:dirty-bitmap context "changed since `sinceNumber`": contiguous from
   * `offsetBytes`, flag DIRTY_BITMAP_CHANGED (bit 0) on changed ones, clipped to the device.
   */
  extents(sinceNumber: number, offsetBytes: number, lengthBytes: number): Array<{ length: number; flags: number }> {
    return changedExtents(this.#entries, this.blockSize, this.deviceSizeBytes, sinceNumber, offsetBytes, lengthBytes);
  }

  /** The names of the contexts an image of this snapshot offers: since 1..number-1. */
  contextNames(): string[] {
    const names: string[] = [];
    for (let since = 1; since < this.number; since++) names.push(dirtyBitmapContextName(this.generation, since));
    return names;
  }

  /**
   * One NBD metadata context source per earlier number (an NBD ExportHandle's `metaContexts`),
   * named by dirtyBitmapContextName.
   */
  contextSources(): Array<{ readonly name: string; extents(offsetBytes: number, lengthBytes: number): Promise<Array<{ length: number; flags: number }>> }> {
    const sources = [];
    for (let since = 1; since < this.number; since++) {
      const name = dirtyBitmapContextName(this.generation, since);
      sources.push({ name, extents: async (offsetBytes: number, lengthBytes: number) => this.extents(since, offsetBytes, lengthBytes) });
    }
    return sources;
  }

  /** A write to the snapshot's image: those blocks count as changed in this view. */
  mark(offsetBytes: number, lengthBytes: number): void {
    if (lengthBytes <= 0) return;
    checkRange({ size: this.deviceSizeBytes }, offsetBytes, lengthBytes, true);
    const lo = setEntries(this.#entries, Math.floor(offsetBytes / this.blockSize), Math.floor((offsetBytes + lengthBytes - 1) / this.blockSize), this.number);
    if (lo >= 0 && this.#fd !== undefined) pwriteFullySync(this.#fd, entryBytes(this.#entries, lo, changedSpan[1]!), FROZEN_HEADER_BYTES + lo * 4);
  }

  /** Persist atomically to `file` (beside the snapshot) and stay attached to it. */
  async save(file: string): Promise<void> {
    const h = Buffer.alloc(FROZEN_HEADER_BYTES);
    h.write(FROZEN_MAP_MAGIC, 0, 'latin1');
    h.writeUInt32LE(FROZEN_MAP_VERSION, 8);
    h.writeUInt32LE(FROZEN_HEADER_BYTES, 12);
    h.writeUInt32LE(Number.parseInt(this.generation, 16) >>> 0, 16);
    h.writeUInt32LE(this.number, 20);
    h.writeUInt32LE(this.blockSize, 24);
    h.writeUInt32LE(this.blocks, 28);
    writeU64(h, this.deviceSizeBytes, 32);
    h.writeUInt32LE(crc32(h.subarray(0, FROZEN_CRC_AT)), FROZEN_CRC_AT);
    try {
      await makeDirectoryDurable(path.dirname(file), { recursive: true, mode: 0o700 });
      writeFileAtomicSync(file, [h, entryBytes(this.#entries, 0, this.#entries.length - 1)]);
      const fd = fs.openSync(file, 'r+');
      if (this.#fd !== undefined) fs.closeSync(this.#fd);
      this.#fd = fd;
    } catch (err) {
      throw toBdsnapError(err);
    }
  }

  /** Load a view saved by save(). Errors: ENOENT, ECORRUPT (with what is wrong). */
  static async load(file: string): Promise<FrozenChangeMap> {
    let fd: number;
    try {
      fd = fs.openSync(file, 'r+');
    } catch (err) {
      throw toBdsnapError(err);
    }
    let keep = false;
    try {
      const corrupt = (why: string): BdsnapError => new BdsnapError('ECORRUPT', `${file}: ${why}`);
      const fileBytes = fs.fstatSync(fd).size;
      const h = Buffer.alloc(FROZEN_HEADER_BYTES);
      if (preadFullySync(fd, h, 0) !== FROZEN_HEADER_BYTES) throw corrupt(`too short for a header (${fileBytes} bytes)`);
      if (h.toString('latin1', 0, 8) !== FROZEN_MAP_MAGIC) throw corrupt('bad magic (not a bdsnap frozen change map)');
      if (h.readUInt32LE(8) !== FROZEN_MAP_VERSION) throw corrupt(`unsupported version ${h.readUInt32LE(8)}`);
      if (h.readUInt32LE(FROZEN_CRC_AT) !== crc32(h.subarray(0, FROZEN_CRC_AT))) throw corrupt('header checksum mismatch');
      const number = h.readUInt32LE(20);
      const blockSize = h.readUInt32LE(24);
      const blocks = h.readUInt32LE(28);
      const deviceSizeBytes = readU64(h, 32);
      if (h.readUInt32LE(12) !== FROZEN_HEADER_BYTES || blockSize < 4096 || (blockSize & (blockSize - 1)) !== 0
        || blocks !== Math.ceil(deviceSizeBytes / blockSize) || blocks > MAX_TRACKING_BLOCKS) {
        throw corrupt('inconsistent header (block size, blocks, device size)');
      }
      if (fileBytes !== FROZEN_HEADER_BYTES + blocks * 4) throw corrupt(`file is ${fileBytes} bytes, expected ${FROZEN_HEADER_BYTES + blocks * 4}`);
      const entries = new Uint32Array(blocks);
      if (!readEntries(fd, entries, FROZEN_HEADER_BYTES)) throw corrupt('the entries are cut short');
      for (let i = 0; i < blocks; i++) if (entries[i]! > number) throw corrupt(`block ${i} holds number ${entries[i]}, beyond the view's number ${number}`);
      const view = new FrozenChangeMap({ generation: h.readUInt32LE(16).toString(16).padStart(8, '0'), number, blockSize, deviceSizeBytes, entries });
      view.#fd = fd;
      keep = true;
      return view;
    } finally {
      if (!keep) fs.closeSync(fd);
    }
  }

  /** Detach from the file (the view stays usable in memory). */
  async close(): Promise<void> {
    if (this.#fd === undefined) return;
    const fd = this.#fd;
    this.#fd = undefined;
    fs.closeSync(fd);
  }
}

/**
 * A layer that marks the change map before a write, trim or write-zeroes reaches the device
 * below; everything else passes through. A rewrite within the current period costs a compare.
 */
export class TrackingDevice extends PassThroughDevice {
  readonly #map: ChangeMap;

  constructor(base: BlockDevice, map: ChangeMap) {
    if (map.info().deviceSizeBytes !== base.size) throw new BdsnapError('EINVAL', `the change map is for ${map.info().deviceSizeBytes} bytes, the device has ${base.size}`);
    super(base);
    this.#map = map;
  }

  // close() closes the device below; the change map is closed by its owner (with the device's stamp).

  protected override modify(offsetBytes: number, lengthBytes: number, _fua: boolean, apply: () => Promise<void>): Promise<void> {
    let marked: void | Promise<void>;
    try {
      if (this.readOnly) throw new BdsnapError('EPERM', 'the device is read-only');
      checkRange(this, offsetBytes, lengthBytes, true);
      marked = this.#map.mark(offsetBytes, lengthBytes);
    } catch (err) {
      return Promise.reject(err);
    }
    // No await of ours when nothing new had to be made durable.
    return marked ? marked.then(apply) : apply();
  }
}
