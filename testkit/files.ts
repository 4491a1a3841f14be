/**
 * Temporary directories that clean themselves up, test images with a recognisable
 * pattern, and sha256 of files, for byte-for-byte comparisons after a round trip.
 */

import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { cleanupOf } from './cleanup.js';

/** The part of node:test's TestContext the helpers use, so they also work from a bench. */
export interface AfterHook {
  after(fn: () => unknown): void;
}

/** A fresh directory under the system temp dir, removed after the test (even on failure). */
export function makeTempDir(t: AfterHook, prefix = 'bdsnap-test-'): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  cleanupOf(t).after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

export type ImagePattern =
  /** All zero bytes, sparse (truncate): the file has no data blocks. */
  | 'zero'
  /** Every 4 KiB block starts with its block number and is filled with a byte from it. */
  | 'blocks'
  /** Pseudo-random bytes from a seed: defeats compression and zero detection. */
  | 'random'
  /** Quarters of random, zero (a hole), repeated and text bytes from a seed: for backups. */
  | 'mixed'
  /** Every byte this value, written (0 gives zeroes that take disk space, unlike 'zero'). */
  | number
  /** Fills the whole image, given as one buffer of `sizeBytes` (small images). */
  | ((image: Buffer) => void);

const BLOCK_BYTES = 4096;
const WRITE_CHUNK_BYTES = 1 << 20;
const MIXED_QUARTER_MULTIPLE_BYTES = 1 << 20;

/** One step of xorshift32: the next state (a non-zero u32) after `x`. */
export function xorshift32(x: number): number {
  x ^= x << 13;
  x >>>= 0;
  x ^= x >>> 17;
  x ^= x << 5;
  return x >>> 0;
}

/** Deterministic xorshift32 fill; the same seed always gives the same bytes. */
export function fillRandom(target: Buffer, seed: number): number {
  let x = seed >>> 0 || 0x9e3779b9;
  for (let i = 0; i + 4 <= target.length; i += 4) {
    x = xorshift32(x);
    target.writeUInt32LE(x, i);
  }
  for (let i = target.length - (target.length % 4); i < target.length; i++) target[i] = x & 0xff;
  return x;
}

/**
 * Make an image file of `sizeBytes` with a pattern and return its path. With 'blocks' (the
 * default) the size is a multiple of 4096 and block N holds N as u32 LE at its start and the
 * byte N % 251 + 1 elsewhere, so a misplaced block is visible in a hex dump. 'mixed' needs a
 * size that is a multiple of 4 MiB. `seed` is for 'random' and 'mixed'.
 */
export function makeImage(filePath: string, sizeBytes: number, pattern: ImagePattern = 'blocks', seed = 1): string {
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0) throw new Error(`image size must be a positive integer, got ${sizeBytes}`);
  if (pattern === 'blocks' && sizeBytes % BLOCK_BYTES !== 0) {
    throw new Error(`a 'blocks' image size must be a multiple of ${BLOCK_BYTES}, got ${sizeBytes}`);
  }
  if (pattern === 'mixed' && sizeBytes % (4 * MIXED_QUARTER_MULTIPLE_BYTES) !== 0) {
    throw new Error(`a 'mixed' image size must be a multiple of ${4 * MIXED_QUARTER_MULTIPLE_BYTES}, got ${sizeBytes}`);
  }
  const fd = fs.openSync(filePath, 'w');
  try {
    fs.ftruncateSync(fd, sizeBytes);
    if (pattern === 'zero') return filePath;
    if (typeof pattern === 'function') {
      const image = Buffer.alloc(sizeBytes);
      pattern(image);
      writeAll(fd, image, 0);
    } else if (pattern === 'mixed') {
      writeMixed(fd, sizeBytes, seed);
    } else {
      writeChunked(fd, sizeBytes, pattern, seed);
    }
  } finally {
    fs.closeSync(fd);
  }
  return filePath;
}

function writeAll(fd: number, data: Buffer, offsetBytes: number): void {
  for (let done = 0; done < data.length;) done += fs.writeSync(fd, data, done, data.length - done, offsetBytes + done);
}

function writeChunked(fd: number, sizeBytes: number, pattern: 'blocks' | 'random' | number, seed: number): void {
  const chunk = Buffer.alloc(Math.min(WRITE_CHUNK_BYTES, sizeBytes), typeof pattern === 'number' ? pattern : 0);
  let state = seed;
  for (let offsetBytes = 0; offsetBytes < sizeBytes; offsetBytes += chunk.length) {
    const lengthBytes = Math.min(chunk.length, sizeBytes - offsetBytes);
    const view = chunk.subarray(0, lengthBytes);
    if (pattern === 'random') {
      state = fillRandom(view, state + offsetBytes);
    } else if (pattern === 'blocks') {
      for (let b = 0; b < lengthBytes; b += BLOCK_BYTES) {
        const blockNumber = (offsetBytes + b) / BLOCK_BYTES;
        view.fill((blockNumber % 251) + 1, b, b + BLOCK_BYTES);
        view.writeUInt32LE(blockNumber >>> 0, b);
      }
    }
    writeAll(fd, view, offsetBytes);
  }
}

/**
 * Four quarters: random (compresses not at all), zero (left a hole), one random MiB repeated
 * (deduplicates), and words of text (compresses well). One xorshift32 stream from `seed` feeds
 * all of them, so the same seed gives the same bytes.
 */
function writeMixed(fd: number, sizeBytes: number, seed: number): void {
  const quarterBytes = sizeBytes / 4;
  const chunk = Buffer.alloc(MIXED_QUARTER_MULTIPLE_BYTES);
  let x = seed;
  const rnd = (): number => (x = xorshift32(x));
  const repeated = Buffer.alloc(MIXED_QUARTER_MULTIPLE_BYTES);
  for (let i = 0; i < repeated.length; i += 4) repeated.writeUInt32LE(rnd(), i);
  const words = ['block', 'device', 'snapshot', 'backup', 'the', 'of', 'restore', 'piece', 'manifest', 'kernel', 'write', 'chunk', 'a', 'and'];
  for (let at = 0; at < sizeBytes; at += chunk.length) {
    const part = Math.floor(at / quarterBytes);
    if (part === 1) continue;
    if (part === 0) for (let i = 0; i < chunk.length; i += 4) chunk.writeUInt32LE(rnd(), i);
    else if (part === 2) repeated.copy(chunk);
    else {
      let text = '';
      while (text.length < chunk.length) text += `${words[rnd() % words.length]}${rnd() % 11 === 0 ? '\n' : ' '}${rnd() % 97 === 0 ? String(rnd()) : ''}`;
      chunk.write(text.slice(0, chunk.length), 'latin1');
    }
    writeAll(fd, chunk, at);
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

/** Total size of the files under `dir`. */
export function dirBytes(dir: string): number {
  let total = 0;
  for (const e of fs.readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (e.isFile()) total += fs.statSync(path.join(e.parentPath, e.name)).size;
  }
  return total;
}
