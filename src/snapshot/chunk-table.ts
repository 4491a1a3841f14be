/**
 * Compact per-session bookkeeping whose memory follows the number of touched chunks, not the
 * device size (a session on a 64 GiB device that touches ten chunks must not cost megabytes):
 * - ChunkBitmap: one bit per chunk of the device (512 KiB for 64 GiB in 16 KiB chunks);
 * - ChunkTable: chunk index -> a number (a byte position), an open-addressing hash table over
 *   two Float64Arrays that doubles when 70% full, so about 23 to 46 bytes per entry, with no
 *   object per entry for the garbage collector to trace.
 * Chunk indexes and values are non-negative safe integers; entries are never removed (a value
 * may be replaced).
 */

import { BdsnapError } from '../errors.js';

export class ChunkBitmap {
  readonly #words: Uint32Array;
  readonly chunkCount: number;

  constructor(chunkCount: number) {
    if (!Number.isSafeInteger(chunkCount) || chunkCount < 0) throw new BdsnapError('EINVAL', `bad chunk count ${chunkCount}`);
    this.chunkCount = chunkCount;
    this.#words = new Uint32Array(Math.ceil(chunkCount / 32));
  }

  // Division, not shifts: chunk indexes may pass 2^32 on a large device with small chunks.
  has(chunk: number): boolean {
    return ((this.#words[Math.floor(chunk / 32)]! >>> (chunk % 32)) & 1) === 1;
  }

  add(chunk: number): void {
    const w = Math.floor(chunk / 32);
    this.#words[w] = this.#words[w]! | (1 << (chunk % 32));
  }

  /** Set chunks first..last (inclusive), a word at a time where whole words are covered. */
  addRange(first: number, last: number): void {
    let c = first;
    for (; c <= last && c % 32 !== 0; c++) this.add(c);
    for (; c + 31 <= last; c += 32) this.#words[c / 32] = 0xffffffff;
    for (; c <= last; c++) this.add(c);
  }

  /** Whether every chunk of first..last (inclusive) is set. */
  hasAll(first: number, last: number): boolean {
    for (let c = first; c <= last; c++) if (!this.has(c)) return false;
    return true;
  }

  get byteLength(): number {
    return this.#words.byteLength;
  }
}

const EMPTY = -1;
const INITIAL_CAPACITY = 64;
const MAX_LOAD = 0.7;

export class ChunkTable {
  #keys: Float64Array;
  #values: Float64Array;
  #mask: number;
  #size = 0;

  constructor() {
    this.#keys = new Float64Array(INITIAL_CAPACITY).fill(EMPTY);
    this.#values = new Float64Array(INITIAL_CAPACITY);
    this.#mask = INITIAL_CAPACITY - 1;
  }

  get size(): number {
    return this.#size;
  }

  /** Bytes held by the table's arrays. */
  get byteLength(): number {
    return this.#keys.byteLength + this.#values.byteLength;
  }

  /** The value stored for `chunk`, or undefined. */
  get(chunk: number): number | undefined {
    const keys = this.#keys;
    for (let i = slotOf(chunk, this.#mask); ; i = (i + 1) & this.#mask) {
      const k = keys[i]!;
      if (k === chunk) return this.#values[i];
      if (k === EMPTY) return undefined;
    }
  }

  has(chunk: number): boolean {
    return this.get(chunk) !== undefined;
  }

  /**
   * For each chunk of first..last, `value + (chunk - first) * step` unless it already has one
   * (a run of chunks stored together). The table grows once for the whole run.
   */
  setRunIfAbsent(first: number, last: number, value: number, step: number): void {
    this.#reserve(last - first + 1);
    for (let c = first; c <= last; c++) this.#put(c, value + (c - first) * step, false);
  }

  /** Store `value` for `chunk` unless it already has one (the first original wins). */
  setIfAbsent(chunk: number, value: number): void {
    this.#put(chunk, value, false);
  }

  /** Store `value` for `chunk`, replacing any earlier one (a newer image record wins). */
  set(chunk: number, value: number): void {
    this.#put(chunk, value, true);
  }

  #put(chunk: number, value: number, replace: boolean): void {
    if ((this.#size + 1) > MAX_LOAD * this.#keys.length) this.#grow();
    const keys = this.#keys;
    for (let i = slotOf(chunk, this.#mask); ; i = (i + 1) & this.#mask) {
      const k = keys[i]!;
      if (k === chunk) {
        if (replace) this.#values[i] = value;
        return;
      }
      if (k === EMPTY) {
        keys[i] = chunk;
        this.#values[i] = value;
        this.#size++;
        return;
      }
    }
  }

  /** Every entry, sorted by chunk index. */
  sorted(): { chunks: Float64Array; values: Float64Array } {
    const chunks = new Float64Array(this.#size);
    let n = 0;
    for (const k of this.#keys) if (k !== EMPTY) chunks[n++] = k;
    chunks.sort();
    const values = new Float64Array(this.#size);
    for (let i = 0; i < n; i++) values[i] = this.get(chunks[i]!)!;
    return { chunks, values };
  }

  /** Room for `more` entries without growing. */
  #reserve(more: number): void {
    let capacity = this.#keys.length;
    while (this.#size + more > MAX_LOAD * capacity) capacity *= 2;
    if (capacity !== this.#keys.length) this.#grow(capacity);
  }

  #grow(capacity = this.#keys.length * 2): void {
    const oldKeys = this.#keys;
    const oldValues = this.#values;
    this.#keys = new Float64Array(capacity).fill(EMPTY);
    this.#values = new Float64Array(capacity);
    this.#mask = capacity - 1;
    for (let j = 0; j < oldKeys.length; j++) {
      const k = oldKeys[j]!;
      if (k === EMPTY) continue;
      let i = slotOf(k, this.#mask);
      while (this.#keys[i] !== EMPTY) i = (i + 1) & this.#mask;
      this.#keys[i] = k;
      this.#values[i] = oldValues[j]!;
    }
  }
}

/** murmur3's finaliser: adjacent chunk indexes (the usual case) spread over the whole table. */
function slotOf(chunk: number, mask: number): number {
  let h = (chunk >>> 0) ^ Math.imul(Math.floor(chunk / 0x1_0000_0000), 0x85ebca6b);
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h & mask;
}
