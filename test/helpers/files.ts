/**
 * Temporary directories that clean themselves up, test images with a recognisable
 * pattern, and sha256 of files, for byte-for-byte comparisons after a round trip.
 */

import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

/** The part of node:test's TestContext the helpers use, so they also work from a bench. */
export interface AfterHook {
  after(fn: () => unknown): void;
}

/** A fresh directory under the system temp dir, removed after the test (even on failure). */
export function makeTempDir(t: AfterHook, prefix = 'bdsnap-test-'): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

export type ImagePattern =
  /** All zero bytes, sparse (truncate). */
  | 'zero'
  /** Every 4 KiB block starts with its block number and is filled with a byte from it. */
  | 'blocks'
  /** Pseudo-random bytes from a seed: defeats compression and zero detection. */
  | 'random';

const BLOCK_BYTES = 4096;
const WRITE_CHUNK_BYTES = 1 << 20;

/** Deterministic xorshift32 fill; the same seed always gives the same bytes. */
export function fillRandom(target: Buffer, seed: number): number {
  let x = seed >>> 0 || 0x9e3779b9;
  for (let i = 0; i + 4 <= target.length; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    target.writeUInt32LE(x, i);
  }
  for (let i = target.length - (target.length % 4); i < target.length; i++) target[i] = x & 0xff;
  return x;
}

/**
 * Make an image of `sizeBytes` (a multiple of 4096) with a pattern. With 'blocks', block N
 * holds N as u32 LE at its start and the byte N % 251 + 1 elsewhere, so a misplaced block is
 * visible in a hex dump.
 */
export function makeImage(filePath: string, sizeBytes: number, pattern: ImagePattern = 'blocks', seed = 1): void {
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % BLOCK_BYTES !== 0) {
    throw new Error(`image size must be a positive multiple of ${BLOCK_BYTES}, got ${sizeBytes}`);
  }
  const fd = fs.openSync(filePath, 'w');
  try {
    fs.ftruncateSync(fd, sizeBytes);
    if (pattern === 'zero') return;
    const chunk = Buffer.alloc(Math.min(WRITE_CHUNK_BYTES, sizeBytes));
    let state = seed;
    for (let offsetBytes = 0; offsetBytes < sizeBytes; offsetBytes += chunk.length) {
      const lengthBytes = Math.min(chunk.length, sizeBytes - offsetBytes);
      const view = chunk.subarray(0, lengthBytes);
      if (pattern === 'random') {
        state = fillRandom(view, state + offsetBytes);
      } else {
        for (let b = 0; b < lengthBytes; b += BLOCK_BYTES) {
          const blockNumber = (offsetBytes + b) / BLOCK_BYTES;
          view.fill((blockNumber % 251) + 1, b, b + BLOCK_BYTES);
          view.writeUInt32LE(blockNumber >>> 0, b);
        }
      }
      fs.writeSync(fd, view, 0, lengthBytes, offsetBytes);
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** sha256 (hex) of a whole file or block device, streamed. */
export async function sha256File(filePath: string): Promise<string> {
  const hash = createHash('sha256');
  const stream = fs.createReadStream(filePath, { highWaterMark: WRITE_CHUNK_BYTES });
  for await (const chunk of stream) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

export function sha256(data: Buffer | string): string {
  return createHash('sha256').update(data).digest('hex');
}

/** Read `lengthBytes` at `offsetBytes` of a file (for spot checks after a client wrote). */
export function readRange(filePath: string, offsetBytes: number, lengthBytes: number): Buffer {
  const fd = fs.openSync(filePath, 'r');
  try {
    const target = Buffer.alloc(lengthBytes);
    let done = 0;
    while (done < lengthBytes) {
      const n = fs.readSync(fd, target, done, lengthBytes - done, offsetBytes + done);
      if (n === 0) throw new Error(`${filePath}: short read at ${offsetBytes + done}`);
      done += n;
    }
    return target;
  } finally {
    fs.closeSync(fd);
  }
}
