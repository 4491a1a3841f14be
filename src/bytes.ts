/**
 * Byte ranges and byte tests every layer needs, beside errors.ts so that any of them may import it.
 */

/** A run of bytes of a device or file: `lengthBytes` from `offsetBytes`. */
export interface ByteRange {
  offsetBytes: number;
  lengthBytes: number;
}

/** Compared a slice at a time, so the shared zero buffer stays small whatever the input. */
const ZERO_COMPARE_BYTES = 64 * 1024;
const zeroes = Buffer.alloc(ZERO_COMPARE_BYTES);

/** Whether `buf[start..]` is all zero bytes (memcmp against a shared zero buffer). */
export function isAllZero(buf: Uint8Array, start = 0): boolean {
  for (let at = start; at < buf.length; at += ZERO_COMPARE_BYTES) {
    const n = Math.min(ZERO_COMPARE_BYTES, buf.length - at);
    if (buf[at] !== 0 || zeroes.compare(buf, at, at + n, 0, n) !== 0) return false;
  }
  return true;
}

/**
 * 64-bit unsigned fields as numbers (offsets and sizes: safe integers, below 2^53), without
 * BigInt on the hot path: two 32-bit halves.
 */
const TWO_POW_32 = 0x1_0000_0000;

/** 64 bits big-endian (network order, as NBD has them) at `at`. */
export function readU64BE(buf: Buffer, at: number): number {
  return buf.readUInt32BE(at) * TWO_POW_32 + buf.readUInt32BE(at + 4);
}

/** Write `value`, a safe unsigned integer, as 64 bits big-endian at `at`. */
export function writeU64BE(buf: Buffer, value: number, at: number): void {
  buf.writeUInt32BE(Math.floor(value / TWO_POW_32), at);
  buf.writeUInt32BE(value >>> 0, at + 4);
}

/** 64 bits little-endian (the on-disk formats) at `at`. */
export function readU64LE(buf: Buffer, at: number): number {
  return buf.readUInt32LE(at) + buf.readUInt32LE(at + 4) * TWO_POW_32;
}

/** Write `value`, a safe unsigned integer, as 64 bits little-endian at `at`. */
export function writeU64LE(buf: Buffer, value: number, at: number): void {
  buf.writeUInt32LE(value >>> 0, at);
  buf.writeUInt32LE(Math.floor(value / TWO_POW_32), at + 4);
}
