/**
 * A table of chunk digests: the chunks in increasing order and one digest of DIGEST_BYTES for
 * each, read in place from a larger buffer (a digests file's body, a worker's answer). A restore
 * checks hundreds of thousands of digests; a map of small buffers cost it more than the hashing
 * (a view and a map entry per chunk, and their garbage collection).
 */

import { DIGEST_BYTES } from './chunk-digest.js';

export class DigestTable {
  /**
   * `chunks` sorted and distinct; the digest of chunks[i] is the DIGEST_BYTES of `bytes` at
   * `offset + i * stride`.
   */
  constructor(
    readonly chunks: Float64Array,
    readonly bytes: Buffer,
    readonly offset = 0,
    readonly stride = DIGEST_BYTES,
  ) {}

  get size(): number {
    return this.chunks.length;
  }

  /** Where `chunk` is in the table, or -1 (binary search). */
  indexOf(chunk: number): number {
    const chunks = this.chunks;
    let lo = 0;
    let hi = chunks.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const c = chunks[mid]!;
      if (c === chunk) return mid;
      if (c < chunk) lo = mid + 1;
      else hi = mid - 1;
    }
    return -1;
  }

  /** The digest at position `i`, as a view. */
  digest(i: number): Buffer {
    const at = this.offset + i * this.stride;
    return this.bytes.subarray(at, at + DIGEST_BYTES);
  }

  /**
   * Whether the digest at `i` equals `other`'s at `j`, without making views of either. Byte by
   * byte in JavaScript: a call of Buffer#compare per digest cost a restore more than this loop.
   */
  sameAt(i: number, other: DigestTable, j: number): boolean {
    const mine = this.bytes;
    const theirs = other.bytes;
    const at = this.offset + i * this.stride;
    const them = other.offset + j * other.stride;
    for (let k = 0; k < DIGEST_BYTES; k++) if (mine[at + k] !== theirs[them + k]) return false;
    return true;
  }

  /** Whether `digest` equals the one at `i`. */
  equalsAt(i: number, digest: Buffer): boolean {
    const at = this.offset + i * this.stride;
    return this.bytes.compare(digest, 0, DIGEST_BYTES, at, at + DIGEST_BYTES) === 0;
  }

  /** Whether the table lists exactly the chunks of `index`. */
  sameChunksAs(index: ReadonlyMap<number, unknown>): boolean {
    if (this.chunks.length !== index.size) return false;
    for (const c of this.chunks) if (!index.has(c)) return false;
    return true;
  }

  /** Whether both tables list the same chunks in the same places. */
  alignedWith(other: DigestTable): boolean {
    const a = this.chunks;
    const b = other.chunks;
    if (a.length !== b.length) return false;
    for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
    return true;
  }
}
