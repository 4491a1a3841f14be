/**
 * Whether a map file found at open can be trusted, and if not, why a new generation starts.
 *
 * - 'process' durability: a host crash may drop the file's last writes. The file records the
 *   boot id of the session that opened it and a clean flag set only by close(); an unclean
 *   file from another boot is not trusted (reset 'host-crash').
 * - The header holds the device's stamp (src/host/device-stamp.ts): the one read at open while
 *   the map is in use, the one read at close (after the device's last flush and close) once it
 *   is clean. The next open compares that with the stamp then: any difference is a change made
 *   while bdsnap did not serve the device, and starts a new generation ('changed-outside', or
 *   'cannot-verify' when nothing proves it either way). After an unclean stop an image file's
 *   stamp is compared with the one the header held while the daemon's own writes had settled
 *   (FLAG_IDLE); a header written while they ran, and a block device's counters, prove nothing
 *   (the daemon's own last writes moved them), so the map starts again.
 * - An entry is never above the header's number + 1; one above that is corruption.
 */

import fs from 'node:fs';
import { compareDeviceStamps, type DeviceStamp } from '../../host/device-stamp.js';
import { openFdSync, preadFullySync } from '../../host/fd-io.js';
import {
  CHANGE_MAP_MAGIC, FLAG_CLEAN, FLAG_IDLE, FLAG_POISONED, HEADER_BYTES, newGeneration, parseHeader, readEntries, readGeneration,
  type ParsedHeader,
} from './file-format.js';
import { trackingBlockSize } from './ranges.js';
import type { Durability } from '../format.js';

/**
 * 'changed-outside': the device was proven written (or replaced) while bdsnap did not serve it;
 * 'cannot-verify': nothing proves it unchanged (a block device after a reboot or an unclean
 * stop, a stamp that cannot be read, a map without one).
 */
export type ChangeMapResetReason = 'new' | 'host-crash' | 'changed-outside' | 'cannot-verify' | 'size-changed' | 'corrupt' | 'requested' | 'wrapped';

export type ChangeMapReset = { reason: ChangeMapResetReason; detail: string; previousGeneration: string | null };

/** The state a live map starts from: kept from its file, or a new generation. */
export interface MapState {
  generation: string;
  number: number;
  entries: Uint32Array;
  createdMs: number;
}

/** What open() found: the file kept open (fd) with its state, or (fd -1) a new generation and why. */
export interface LoadedMap {
  fd: number;
  state: MapState;
  reset: ChangeMapReset | null;
}

export interface LoadOptions {
  file: string;
  deviceSizeBytes: number;
  durability: Durability;
  bootId: string;
  /** The device's stamp now; undefined: nothing is compared. */
  stamp: DeviceStamp | undefined;
}

/** A new generation of `blocks` entries, all zero. */
export function freshState(blocks: number): MapState {
  return { generation: newGeneration(), number: 1, entries: new Uint32Array(blocks), createdMs: Date.now() };
}

/**
 * Read the map file and decide whether to keep it. Errors: only those opening the file
 * (anything wrong inside it is a reset).
 */
export function loadMap(options: LoadOptions): LoadedMap {
  const blocks = Math.ceil(options.deviceSizeBytes / trackingBlockSize(options.deviceSizeBytes));
  const fresh = (reason: ChangeMapResetReason, detail: string, previousGeneration: string | null): LoadedMap => (
    { fd: -1, state: freshState(blocks), reset: { reason, detail, previousGeneration } }
  );
  let fd: number;
  try {
    fd = openFdSync(options.file, 'r+');
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
      return fresh('cannot-verify', 'the map was written by an earlier version of bdsnap, which kept no complete stamp of the device', readGeneration(h, 16));
    }
    const parsed = parseHeader(h.subarray(0, headerBytes), fileBytes);
    if (typeof parsed === 'string') return fresh('corrupt', `${options.file}: ${parsed}`, null);
    const prev = parsed.generation;
    const distrust = distrustOf(parsed, options);
    if (distrust) return fresh(distrust.reason, distrust.detail, prev);
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

type Distrust = { reason: ChangeMapResetReason; detail: string };

/** Why a well-formed header cannot be trusted for this device now, or null. */
function distrustOf(parsed: ParsedHeader, options: LoadOptions): Distrust | null {
  if ((parsed.flags & FLAG_POISONED) !== 0) return { reason: 'corrupt', detail: 'an earlier write of the map file failed' };
  if (parsed.deviceSizeBytes !== options.deviceSizeBytes) {
    return { reason: 'size-changed', detail: `the device is ${options.deviceSizeBytes} bytes, the map was for ${parsed.deviceSizeBytes}` };
  }
  const blockSize = trackingBlockSize(options.deviceSizeBytes);
  if (parsed.blockSize !== blockSize) return { reason: 'corrupt', detail: `the map has blocks of ${parsed.blockSize} bytes, this version uses ${blockSize}` };
  const clean = (parsed.flags & FLAG_CLEAN) !== 0;
  const bootId = options.bootId;
  if (!clean && options.durability === 'process' && (parsed.bootId === '' || parsed.bootId !== bootId)) {
    return {
      reason: 'host-crash',
      detail: `the map was not closed cleanly and the host has restarted since (boot ${parsed.bootId || 'unknown'}, now ${bootId || 'unknown'}); its last writes may be lost`,
    };
  }
  const stamp = options.stamp;
  if (!stamp) return null;
  if (!clean) return uncleanChange(parsed.stamp, stamp, (parsed.flags & FLAG_IDLE) !== 0);
  if (!parsed.stamp) return { reason: 'cannot-verify', detail: 'the map has no record of the device to compare with (its stamp could not be read when it was closed)' };
  const compared = compareDeviceStamps(parsed.stamp, stamp);
  return compared.same ? null : { reason: compared.proven ? 'changed-outside' : 'cannot-verify', detail: compared.detail };
}

/**
 * After an unclean stop: an image file whose header was idle (no write of the daemon's in flight
 * or unsettled, the stamp read after its last one) must still have that stamp; one that was
 * being written cannot tell the daemon's last writes from anyone else's. Null: nothing against.
 */
function uncleanChange(recorded: DeviceStamp | undefined, now: DeviceStamp, idle: boolean): Distrust | null {
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
  if (!idle) {
    return {
      reason: 'cannot-verify',
      detail: 'the daemon stopped without closing the map (killed or crashed) while its own writes to the image file were in flight or had just ended: they cannot be told from anyone else\'s',
    };
  }
  const compared = compareDeviceStamps(recorded, now, 'after the daemon\'s last write');
  if (compared.same) return null;
  return { reason: 'changed-outside', detail: `the map was not closed cleanly, and ${compared.detail}` };
}

function devicePathWord(stamp: DeviceStamp): string {
  return stamp.kind === 'file' ? `the image file (${stamp.dev}:${stamp.ino})` : 'the block device';
}

