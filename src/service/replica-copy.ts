/**
 * Copy byte ranges of a snapshot image to a replica's target: data extents are read and
 * written, extents that read as zeroes (holes, zeroed ranges) become WRITE_ZEROES on the
 * target when it takes them, so no zero byte crosses the wire. A few pieces are in flight at
 * once; an optional rate caps the data bytes per second.
 */

import { setTimeout as delay } from 'node:timers/promises';
import type { ByteRange } from '../bytes.js';
import { EXTENT_ZERO, type BlockDevice } from '../device/block-device.js';
import { BdsnapError } from '../errors.js';
import { NBD_FLAG_SEND_WRITE_ZEROES } from '../nbd/constants.js';
import type { NbdClient } from '../nbd/client.js';

/** The largest piece read and written in one request. */
const PIECE_BYTES = 1024 * 1024;
const PIECES_IN_FLIGHT = 4;

export type { ByteRange };

export interface CopyCounters {
  /** Data bytes written to the target. */
  bytesSent: number;
  /** Bytes zeroed on the target without data. */
  zeroBytes: number;
}

/** Holds the data rate at or under `bytesPerSecond` from its creation on. */
export class RateLimit {
  readonly #bytesPerSecond: number;
  readonly #startMs = performance.now();
  #bytes = 0;

  constructor(bytesPerSecond: number) {
    this.#bytesPerSecond = bytesPerSecond;
  }

  async take(bytes: number, signal?: AbortSignal): Promise<void> {
    this.#bytes += bytes;
    const dueMs = this.#startMs + (this.#bytes / this.#bytesPerSecond) * 1000;
    const waitMs = dueMs - performance.now();
    if (waitMs > 0) await delay(waitMs, undefined, signal ? { signal } : undefined);
  }
}

interface Piece {
  offsetBytes: number;
  lengthBytes: number;
  zero: boolean;
}

/** The pieces of `ranges`, split by the source's extents and PIECE_BYTES, in order. */
async function* piecesOf(source: BlockDevice, ranges: readonly ByteRange[], maxPieceBytes: number): AsyncGenerator<Piece> {
  for (const range of ranges) {
    let at = range.offsetBytes;
    const end = range.offsetBytes + range.lengthBytes;
    while (at < end) {
      const extents = await source.extents(at, end - at);
      if (extents.length === 0) throw new BdsnapError('EIO', `the image gave no allocation status at ${at}`);
      for (const extent of extents) {
        const extentEnd = Math.min(end, at + extent.length);
        const zero = (extent.flags & EXTENT_ZERO) !== 0;
        // A zeroed extent goes in one request; data is cut to pieces a request can carry.
        const step = zero ? extentEnd - at : maxPieceBytes;
        for (let p = at; p < extentEnd; p += step) yield { offsetBytes: p, lengthBytes: Math.min(step, extentEnd - p), zero };
        at = extentEnd;
        if (at >= end) break;
      }
    }
  }
}

/**
 * Copy `ranges` (sorted, not overlapping) from `source` to `target`; counts as it goes.
 * The target is not flushed here.
 */
export async function copyRanges(source: BlockDevice, target: NbdClient, ranges: readonly ByteRange[], counters: CopyCounters,
  options: { rate?: RateLimit; signal?: AbortSignal } = {}): Promise<void> {
  const canZero = (target.transmissionFlags & NBD_FLAG_SEND_WRITE_ZEROES) !== 0;
  const maxPieceBytes = Math.max(4096, Math.min(PIECE_BYTES, target.blockSizes.maximum));
  const pieces = piecesOf(source, ranges, maxPieceBytes);
  let failure: unknown;
  // Workers pull from one generator; a generator runs one next() at a time, so each piece is taken once.
  const worker = async (): Promise<void> => {
    for (;;) {
      if (failure !== undefined) return;
      options.signal?.throwIfAborted();
      const next = await pieces.next();
      if (next.done) return;
      const piece = next.value;
      if (piece.zero && canZero) {
        await target.zero(piece.offsetBytes, piece.lengthBytes);
        counters.zeroBytes += piece.lengthBytes;
        continue;
      }
      for (let p = piece.offsetBytes; p < piece.offsetBytes + piece.lengthBytes; p += maxPieceBytes) {
        const buffer = Buffer.allocUnsafe(Math.min(maxPieceBytes, piece.offsetBytes + piece.lengthBytes - p));
        if (piece.zero) buffer.fill(0);
        else await source.read(buffer, p);
        await options.rate?.take(buffer.length, options.signal);
        await target.write(buffer, p);
        counters.bytesSent += buffer.length;
      }
    }
  };
  await Promise.all(Array.from({ length: PIECES_IN_FLIGHT }, () => worker().catch((err: unknown) => {
    failure ??= err;
  })));
  if (failure !== undefined) throw failure;
}
