/**
 * The settings of a session that an operator chooses (chunk size, durability), apart from the
 * store format so that the command line can declare and check them without loading the
 * format's schemas (zod): `bdsnap --help` must not pay for the snapshot engine.
 */

import { BdsnapError } from '../errors.js';

export const MIN_CHUNK_SIZE = 4096;
export const MAX_CHUNK_SIZE = 16 * 1024 * 1024;
export const DEFAULT_CHUNK_SIZE = 16 * 1024;

/**
 * What a session's store (and a change map) survives: a killed process ('process'), or a power
 * loss too ('strict': every copy is synced before the write it protects goes on).
 */
export const DURABILITIES = ['process', 'strict'] as const;
export type Durability = (typeof DURABILITIES)[number];

export function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

export function checkChunkSize(chunkSize: number): void {
  if (!isPowerOfTwo(chunkSize) || chunkSize < MIN_CHUNK_SIZE || chunkSize > MAX_CHUNK_SIZE) {
    throw new BdsnapError('EINVAL', `chunk size must be a power of two from ${MIN_CHUNK_SIZE} to ${MAX_CHUNK_SIZE} bytes, got ${chunkSize}`);
  }
}
