/**
 * Range maths of a change map: the tracking block size of a device, setting entries, and the
 * merged changed ranges and NBD dirty-bitmap extents of "changed since number N" (entry > N).
 * Pure functions over a Uint32Array of entries; the live map and the frozen views share them.
 */

import { BdsnapError } from '../../errors.js';
import type { ByteRange } from '../../bytes.js';

export const MIN_TRACKING_BLOCK_BYTES = 64 * 1024;
export const MAX_TRACKING_BLOCKS = 1 << 21;

export type { ByteRange };

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

/** First and last index changed by the latest setEntries() (reused: mark() allocates nothing). */
export const changedSpan = new Int32Array(2);

/**
 * Set entries first..last to n. Returns the first index that was not already n (or -1), and
 * leaves it and the last such index in changedSpan: the span to write to the file.
 */
export function setEntries(entries: Uint32Array, first: number, last: number, n: number): number {
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
export function visitChanged(
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

export function changedRanges(entries: Uint32Array, blockSize: number, deviceSizeBytes: number, since: number, offsetBytes?: number, lengthBytes?: number): ByteRange[] {
  const out: ByteRange[] = [];
  visitChanged(entries, blockSize, deviceSizeBytes, since, (o, l) => out.push({ offsetBytes: o, lengthBytes: l }), offsetBytes, lengthBytes);
  return out;
}

/** Contiguous extents from the offset, flag DIRTY_BITMAP_CHANGED where entry > since. */
export function changedExtents(entries: Uint32Array, blockSize: number, deviceSizeBytes: number, since: number, offsetBytes: number, lengthBytes: number): Array<{ length: number; flags: number }> {
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
