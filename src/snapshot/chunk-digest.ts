/**
 * The end digest of a chunk (see chunkDigest). A module of its own, importing nothing but
 * Node's hashes, so the digest worker threads of a restore start without loading the session
 * format and its schema library.
 */

import { createHash } from 'node:crypto';
import { crc32 } from 'node:zlib';

export type DigestAlgorithm = 'sha256' | 'crc32x8';
/** What new sessions write. */
export const DIGEST_ALGORITHM: DigestAlgorithm = 'crc32x8';
export const DIGEST_BYTES = 32;

/** Smallest part of a chunk with a CRC of its own in a `crc32x8` digest. */
const DIGEST_PART_MIN_BYTES = 4096;

/**
 * The end digest of one chunk's content, 32 bytes.
 *
 * `crc32x8`: the CRC-32 of each of up to eight equal parts of the chunk (parts of at least
 * 4 KiB, so one part for a 4 KiB chunk), u32 LE each, unused slots zero. The end digests
 * guard against a device changed outside bdsnap after the session: accidental change, not an
 * adversary (who could as well change a chunk that no session touched, which no digest
 * covers). A CRC catches every change confined to 32 bits of its part and any other change but
 * for about 2^-32 per part, and restore refuses if any chunk differs, at the speed of one
 * CRC-32 pass: about 2x sha256 here, paid over every touched chunk before restore writes a
 * byte. Whole-chunk sha256 is the digest of sessions written before the algorithm was recorded.
 */
export function chunkDigest(data: Buffer, algorithm: DigestAlgorithm, into?: Buffer, at = 0): Buffer {
  const out = into ?? Buffer.allocUnsafe(DIGEST_BYTES);
  if (algorithm === 'sha256') {
    createHash('sha256').update(data).digest().copy(out, at);
    return out;
  }
  const n = data.length;
  const parts = Math.max(1, Math.min(8, Math.floor(n / DIGEST_PART_MIN_BYTES)));
  if (parts === 1) {
    out.writeUInt32LE(crc32(data), at);
  } else {
    for (let i = 0; i < parts; i++) out.writeUInt32LE(crc32(data.subarray(Math.floor((i * n) / parts), Math.floor(((i + 1) * n) / parts))), at + i * 4);
  }
  // Unused slots are zero (a restore digests every chunk: no call where all eight are used).
  if (parts < 8) out.fill(0, at + parts * 4, at + DIGEST_BYTES);
  return out;
}
