/**
 * ByteQueue: the unread bytes of a stream, kept as the received chunks plus an offset into
 * the first one, so receiving never concatenates chunks. A fixed header that straddles two
 * chunks is copied into a small scratch buffer; a payload is sliced out of its chunk when it
 * lies in one, and copied once otherwise.
 *
 * Also holds the protocol error type raised by the decoders built on it: every framing error
 * names the absolute stream position of the offending byte.
 */

import { BdsnapError } from '../errors.js';

/** The peer sent bytes that break the protocol; the connection cannot go on. */
export class NbdProtocolError extends BdsnapError {
  /** Absolute position in the stream of the first offending byte. */
  readonly positionBytes: number;

  constructor(message: string, positionBytes: number) {
    super('EPROTO', `${message} at byte ${positionBytes}`);
    this.name = 'NbdProtocolError';
    this.positionBytes = positionBytes;
  }
}

const SCRATCH_BYTES = 64;

export class ByteQueue {
  #chunks: Buffer[] = [];
  #head = 0;
  #length = 0;
  #position = 0;
  #scratch = Buffer.allocUnsafe(SCRATCH_BYTES);
  /** Set by view(): the buffer holding the viewed bytes. */
  viewBuffer: Buffer = this.#scratch;

  /** Unread bytes. */
  get length(): number {
    return this.#length;
  }

  /** Absolute stream position of the next unread byte. */
  get position(): number {
    return this.#position;
  }

  append(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.#chunks.push(chunk);
    this.#length += chunk.length;
  }

  /**
   * Make the next `n` (≤ 64) bytes contiguous without consuming them. Returns the offset of
   * the first of them in `viewBuffer`. The caller has checked `length >= n`.
   */
  view(n: number): number {
    const first = this.#chunks[0]!;
    if (first.length - this.#head >= n) {
      this.viewBuffer = first;
      return this.#head;
    }
    this.#copyOut(this.#scratch, 0, n, false);
    this.viewBuffer = this.#scratch;
    return 0;
  }

  /** The next `n` bytes (n ≤ length) lie in one chunk. */
  contiguous(n: number): boolean {
    return n === 0 || this.#chunks[0]!.length - this.#head >= n;
  }

  skip(n: number): void {
    let left = n;
    while (left > 0) {
      const first = this.#chunks[0]!;
      const avail = first.length - this.#head;
      if (avail > left) {
        this.#head += left;
        break;
      }
      left -= avail;
      this.#chunks.shift();
      this.#head = 0;
    }
    this.#length -= n;
    this.#position += n;
  }

  /**
   * Consume `n` bytes as one buffer: a slice of a chunk when possible (unless `copy`, for
   * chunks that will be overwritten), else one copy into `allocate(n)`.
   */
  take(n: number, copy = false, allocate: (n: number) => Buffer = Buffer.allocUnsafe): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const first = this.#chunks[0]!;
    if (!copy && first.length - this.#head >= n) {
      const out = first.subarray(this.#head, this.#head + n);
      this.skip(n);
      return out;
    }
    const out = allocate(n);
    this.#copyOut(out, 0, n, true);
    return out;
  }

  /** Copy the unread bytes into memory of our own, so the chunks they came in can be reused. */
  detach(): void {
    if (this.#length === 0) {
      this.#chunks = [];
      this.#head = 0;
      return;
    }
    const own = Buffer.allocUnsafe(this.#length);
    this.#copyOut(own, 0, this.#length, false);
    this.#chunks = [own];
    this.#head = 0;
  }

  /** Consume `n` bytes into `target` at `targetOffset`. */
  copyTo(target: Buffer, targetOffset: number, n: number): void {
    this.#copyOut(target, targetOffset, n, true);
  }

  #copyOut(target: Buffer, targetOffset: number, n: number, consume: boolean): void {
    let copied = 0;
    let index = 0;
    let head = this.#head;
    while (copied < n) {
      const chunk = this.#chunks[index]!;
      const count = Math.min(chunk.length - head, n - copied);
      chunk.copy(target, targetOffset + copied, head, head + count);
      copied += count;
      head += count;
      if (head === chunk.length) {
        index++;
        head = 0;
      }
    }
    if (consume) {
      this.#chunks.splice(0, index);
      this.#head = head;
      this.#length -= n;
      this.#position += n;
    }
  }
}

/** A payload being filled across chunks: allocated once at its final size. */
export interface PartialPayload<T> {
  message: T;
  buffer: Buffer;
  filledBytes: number;
}

/** Move as many queued bytes as fit into `partial`; true when it is complete. */
export function fillPartial<T>(queue: ByteQueue, partial: PartialPayload<T>): boolean {
  const n = Math.min(queue.length, partial.buffer.length - partial.filledBytes);
  if (n > 0) {
    queue.copyTo(partial.buffer, partial.filledBytes, n);
    partial.filledBytes += n;
  }
  return partial.filledBytes === partial.buffer.length;
}
