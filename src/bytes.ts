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
