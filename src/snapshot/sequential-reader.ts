/**
 * SequentialReader: a store file read from start to end through large windows, the next one
 * read ahead while the caller checks the current one. The scanners of both stores use it.
 */

import { BdsnapError, toBdsnapError } from '../errors.js';
import { preadFully } from '../host/fd-io.js';

/** Size of each read of a store file while scanning. */
const SCAN_READ_BYTES = 8 * 1024 * 1024;
/**
 * Room kept in front of a read-ahead window for the part of a record that began in the window
 * before it (records are up to MAX_RUN_BYTES of the writer, 2 MiB, plus a header).
 */
const SCAN_CARRY_BYTES = 4 * 1024 * 1024;

interface ReadAhead {
  /** File position the read starts at. */
  pos: number;
  buf: Buffer;
  /** Bytes read, into buf after the carry room. */
  done: Promise<number>;
}

/**
 * Bytes of a store file, read sequentially through a window of large reads, with the next window
 * read ahead while the caller checks the current one. `at(pos, len)` gives a view of
 * [pos, pos + len) or undefined past the end of the file. Positions only move forward.
 */
export class SequentialReader {
  readonly #fd: number;
  readonly #fileBytes: number;
  /** Holds file bytes [#start, #start + #filled) from #base on. */
  #buf: Buffer = Buffer.alloc(0);
  #base = 0;
  #start = 0;
  #filled = 0;
  #ahead: ReadAhead | undefined;
  #spare: Buffer | undefined;
  /** SCAN_READ_BYTES and SCAN_CARRY_BYTES, or less for a small file. */
  readonly #window: number;
  readonly #carry: number;

  constructor(fd: number, fileBytes: number) {
    this.#fd = fd;
    this.#fileBytes = fileBytes;
    this.#window = Math.min(SCAN_READ_BYTES, fileBytes);
    this.#carry = Math.min(SCAN_CARRY_BYTES, fileBytes);
  }

  /**
   * The bytes at [pos, pos + len) when the window already holds them, else undefined (then
   * `at`). Most records of a scan are in the window: this spares them a promise each.
   */
  held(pos: number, len: number): Buffer | undefined {
    if (pos < this.#start || pos + len > this.#start + this.#filled) return undefined;
    const from = this.#base + pos - this.#start;
    return this.#buf.subarray(from, from + len);
  }

  async at(pos: number, len: number): Promise<Buffer | undefined> {
    if (pos + len > this.#fileBytes) return undefined;
    const held = this.held(pos, len);
    if (held !== undefined) return held;
    await this.#slide(pos, len);
    return this.held(pos, len);
  }

  /** Move the window to start at `pos`, keeping what it already holds from there on. */
  async #slide(pos: number, len: number): Promise<void> {
    const end = this.#start + this.#filled;
    const kept = pos >= this.#start && pos < end ? end - pos : 0;
    const ahead = this.#ahead;
    this.#ahead = undefined;
    const aheadBytes = ahead ? await ahead.done : 0;
    if (ahead && ahead.pos === end && kept <= this.#carry && (kept > 0 || pos === end) && pos + len <= end + aheadBytes) {
      // The usual step: the tail of this window, then the window read ahead.
      const base = this.#carry - kept;
      this.#buf.copy(ahead.buf, base, this.#base + pos - this.#start, this.#base + this.#filled);
      this.#spare = this.#buf;
      this.#buf = ahead.buf;
      this.#base = base;
      this.#start = pos;
      this.#filled = kept + aheadBytes;
    } else {
      // A jump, or a record larger than a window: read what is needed directly.
      if (ahead) this.#spare = ahead.buf;
      const want = Math.min(Math.max(len, this.#window), this.#fileBytes - pos);
      const buf = Buffer.allocUnsafe(this.#carry + Math.max(want, this.#window));
      const n = await this.#read(buf.subarray(this.#carry, this.#carry + want), pos);
      if (n < len) throw new BdsnapError('EIO', `data file ended at byte ${pos + n} while being read`);
      this.#buf = buf;
      this.#base = this.#carry;
      this.#start = pos;
      this.#filled = n;
    }
    this.#readAhead();
  }

  /** Start reading the window after the current one into the spare buffer. */
  #readAhead(): void {
    const pos = this.#start + this.#filled;
    if (pos >= this.#fileBytes) return;
    const size = this.#carry + this.#window;
    const buf = this.#spare !== undefined && this.#spare.length >= size ? this.#spare : Buffer.allocUnsafe(size);
    this.#spare = undefined;
    const want = Math.min(this.#window, this.#fileBytes - pos);
    const done = this.#read(buf.subarray(this.#carry, this.#carry + want), pos);
    // A failed read ahead is reported when (if) the scan gets there.
    done.catch(() => undefined);
    this.#ahead = { pos, buf, done };
  }

  /** Wait for a read still in flight, so that no read lands in a buffer after the scan. */
  async settle(): Promise<void> {
    await this.#ahead?.done.catch(() => undefined);
  }

  async #read(into: Buffer, pos: number): Promise<number> {
    try {
      return await preadFully(this.#fd, into, pos);
    } catch (err) {
      throw toBdsnapError(err);
    }
  }
}

