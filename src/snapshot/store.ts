/**
 * The session store's data file: an ordered append queue for the writer, and a scanner that
 * reads it back, verifies every record and rebuilds the index.
 *
 * Ordering is the crash-safety argument: records get consecutive file positions, are written
 * in batches (one writev each, a few batches at once), and a record's promise resolves only
 * after its batch's write(2) and those of every earlier batch have returned. So when a caller
 * issues its device write, its original and every record before it are in the file (page
 * cache); a process kill can only leave a torn or missing part after the last resolved record,
 * which the scanner cuts. In strict mode one batch is written at a time and fdatasync'ed before
 * it resolves: one sync for every chunk that queued up meanwhile (group commit).
 */

import fs from 'node:fs';
import { promisify } from 'node:util';
import { BdsnapError, toBdsnapError } from '../errors.js';
import { preadFully, pwriteOnce } from '../host/fd-io.js';
import { RECORD_HEADER_BYTES, decodeRecordHeader, encodeRecordHeader, payloadMatches } from './format.js';

const fdatasyncAsync = promisify(fs.fdatasync);
const fstatAsync = promisify(fs.fstat);

function writevAsync(fd: number, buffers: Buffer[], pos: number): Promise<number> {
  return new Promise((resolve, reject) => fs.writev(fd, buffers, pos, (err, n) => (err ? reject(err) : resolve(n))));
}

/** Largest number of batches written at once in 'process' durability. */
const MAX_BATCHES_IN_FLIGHT = 4;
/**
 * In 'process' durability a batch up to this size is written synchronously: into the page
 * cache that costs microseconds, where a thread-pool round trip costs a wake-up and, on a
 * machine with few cores, context switches that stall the request path. Bigger batches go to
 * the thread pool, so that large copies run beside the event loop.
 */
const SYNC_BATCH_MAX_BYTES = 256 * 1024;

interface Batch {
  pending: Pending[];
  /** File position after the batch. */
  end: number;
  state: 'writing' | 'written' | 'failed';
}

interface Pending {
  header: Buffer;
  payload: Buffer;
  bytes: number;
  resolve: (position: number | undefined) => void;
  position: number;
}

/**
 * Appends records to an open data file. `append` resolves with the record's position once it
 * is in the file, or with undefined when the store has failed (the caller then goes on without
 * preservation; the failure itself is reported through `onFailure`).
 */
export class StoreWriter {
  readonly #fd: number;
  readonly #strict: boolean;
  readonly #sizeLimitBytes: number;
  readonly #onFailure: (reason: string, err?: unknown) => void;
  readonly #maxBatches: number;
  #endBytes: number;
  #writtenBytes: number;
  #syncedBytes: number;
  #queue: Pending[] = [];
  /** Batches being written, in file order; they resolve strictly in this order. */
  #batches: Batch[] = [];
  #idleWaiters: Array<() => void> = [];
  #failed = false;
  #pumpScheduled = false;

  constructor(fd: number, startBytes: number, options: { strict: boolean; sizeLimitBytes?: number; onFailure: (reason: string, err?: unknown) => void }) {
    this.#fd = fd;
    this.#endBytes = startBytes;
    this.#writtenBytes = startBytes;
    this.#syncedBytes = startBytes;
    this.#strict = options.strict;
    this.#sizeLimitBytes = options.sizeLimitBytes ?? Infinity;
    this.#onFailure = options.onFailure;
    // Strict mode syncs after each batch: one at a time, so that a sync covers all before it.
    this.#maxBatches = this.#strict ? 1 : MAX_BATCHES_IN_FLIGHT;
  }

  get failed(): boolean {
    return this.#failed;
  }

  /** Bytes the file will hold once everything queued is written. */
  get sizeBytes(): number {
    return this.#endBytes;
  }

  get dirty(): boolean {
    return this.#syncedBytes !== this.#writtenBytes;
  }

  /** Bytes written to the file but not yet made durable by a sync. */
  get unsyncedBytes(): number {
    return this.#writtenBytes - this.#syncedBytes;
  }

  /** Queue one record holding the originals of chunks firstChunk.. (payload = their bytes). */
  append(firstChunk: number, payload: Buffer): Promise<number | undefined> {
    return this.appendRecord(encodeRecordHeader(firstChunk, payload), payload);
  }

  /**
   * Queue one record of any layout: `header` (RECORD_HEADER_BYTES, already encoded) then
   * `payload`. The difference storage of snapshots writes its own record headers through this.
   */
  appendRecord(header: Buffer, payload: Buffer): Promise<number | undefined> {
    if (this.#failed) return Promise.resolve(undefined);
    const recordBytes = header.length + payload.length;
    if (this.#endBytes + recordBytes > this.#sizeLimitBytes) {
      this.#fail(`size limit reached: the store would grow past ${this.#sizeLimitBytes} bytes`);
      return Promise.resolve(undefined);
    }
    const position = this.#endBytes;
    this.#endBytes += recordBytes;
    return new Promise((resolve) => {
      this.#queue.push({ header, payload, bytes: recordBytes, resolve, position });
      if (!this.#pumpScheduled) {
        // Records queued by the requests of this turn are written as one batch.
        this.#pumpScheduled = true;
        queueMicrotask(() => {
          this.#pumpScheduled = false;
          this.#pump();
        });
      }
    });
  }

  /** Wait until everything queued so far is in the file (or the store failed). */
  async drain(): Promise<void> {
    while (this.#batches.length > 0 || this.#queue.length > 0) await new Promise<void>((resolve) => this.#idleWaiters.push(resolve));
  }

  /** Make everything written so far durable. */
  async sync(): Promise<void> {
    await this.drain();
    if (this.#failed || !this.dirty) return;
    const target = this.#writtenBytes;
    try {
      await fdatasyncAsync(this.#fd);
      if (target > this.#syncedBytes) this.#syncedBytes = target;
    } catch (err) {
      this.#fail(`cannot sync the store: ${(err as Error).message}`, err);
      throw toBdsnapError(err);
    }
  }

  /**
   * Start writing what is queued, up to #maxBatches writes at once at their own positions.
   * A kill can then leave a hole before a later batch, but no record of a batch is reported
   * written (so no device write is issued for it) before every earlier batch is in the file:
   * the scanner cuts at the hole and nothing acknowledged is behind it.
   */
  #pump(): void {
    while (this.#queue.length > 0 && this.#batches.length < this.#maxBatches) {
      const pending = this.#queue;
      this.#queue = [];
      const batch: Batch = { pending, end: 0, state: 'writing' };
      this.#batches.push(batch);
      if (this.#failed) {
        batch.state = 'failed';
        continue;
      }
      // Records have consecutive positions: the batch ends where its last record ends.
      const start = pending[0]!.position;
      const last = pending[pending.length - 1]!;
      batch.end = last.position + last.bytes;
      const buffers: Buffer[] = [];
      for (const p of pending) buffers.push(p.header, p.payload);
      if (!this.#strict && batch.end - start <= SYNC_BATCH_MAX_BYTES) {
        try {
          this.#writeAllSync(buffers, start, batch.end - start);
          batch.state = 'written';
        } catch (err) {
          this.#writeFailed(err);
          batch.state = 'failed';
        }
        continue;
      }
      this.#writeAll(buffers, start, batch.end - start)
        .then(() => (this.#strict ? fdatasyncAsync(this.#fd) : undefined))
        .then(() => {
          batch.state = 'written';
        }, (err: unknown) => {
          this.#writeFailed(err);
          batch.state = 'failed';
        })
        .finally(() => this.#settle());
    }
    this.#settle();
  }

  /** Resolve finished batches in file order; then start more. */
  #settle(): void {
    let head = this.#batches[0];
    while (head !== undefined && head.state !== 'writing') {
      this.#batches.shift();
      if (head.state === 'written') {
        this.#writtenBytes = head.end;
        if (this.#strict) this.#syncedBytes = head.end;
        for (const p of head.pending) p.resolve(p.position);
      } else {
        for (const p of head.pending) p.resolve(undefined);
      }
      head = this.#batches[0];
    }
    if (this.#queue.length > 0 && this.#batches.length < this.#maxBatches) {
      this.#pump();
      return;
    }
    if (this.#batches.length === 0 && this.#queue.length === 0) for (const w of this.#idleWaiters.splice(0)) w();
  }

  async #writeAll(buffers: Buffer[], position: number, total: number): Promise<void> {
    let done = await writevAsync(this.#fd, buffers, position);
    if (done === total) return;
    // A short writev: finish with plain writes of what is left.
    const rest = Buffer.concat(buffers).subarray(done);
    let off = 0;
    while (off < rest.length) {
      const bytesWritten = await pwriteOnce(this.#fd, rest, off, rest.length - off, position + done);
      off += bytesWritten;
      done += bytesWritten;
    }
  }

  #writeAllSync(buffers: Buffer[], position: number, total: number): void {
    let done = fs.writevSync(this.#fd, buffers, position);
    if (done === total) return;
    const rest = Buffer.concat(buffers).subarray(done);
    for (let off = 0; off < rest.length;) {
      const n = fs.writeSync(this.#fd, rest, off, rest.length - off, position + done);
      off += n;
      done += n;
    }
  }

  #writeFailed(err: unknown): void {
    const code = (err as NodeJS.ErrnoException).code;
    this.#fail(code === 'ENOSPC' || code === 'EDQUOT' ? 'the snapshot disk is full' : `cannot write the store: ${(err as Error).message}`, err);
  }

  #fail(reason: string, err?: unknown): void {
    if (this.#failed) return;
    this.#failed = true;
    this.#onFailure(reason, err);
  }
}

export interface ScannedRecord {
  /** Byte position of the header in data.bin. */
  position: number;
  firstChunk: number;
  payloadBytes: number;
}

export interface ScanResult {
  records: ScannedRecord[];
  /** chunk index -> byte position of its original in data.bin (first record wins). */
  index: Map<number, number>;
  /** Bytes of valid records from the start of the file. */
  validBytes: number;
  fileBytes: number;
  /** Why the scan stopped before the end of the file (only when a torn tail is allowed). */
  tornReason?: string;
  /** Sum of payload bytes of the indexed chunks. */
  preservedBytes: number;
}

export interface ScanOptions {
  chunkSize: number;
  deviceSize: number;
  /** Accept a bad record as the torn end of the file (recovery) instead of failing (ECORRUPT). */
  allowTornTail: boolean;
  /** Name used in error messages. */
  where: string;
}

/** Size of each read of data.bin while scanning. */
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
 * Bytes of data.bin, read sequentially through a window of large reads, with the next window
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

  async at(pos: number, len: number): Promise<Buffer | undefined> {
    if (pos + len > this.#fileBytes) return undefined;
    if (pos < this.#start || pos + len > this.#start + this.#filled) await this.#slide(pos, len);
    const from = this.#base + pos - this.#start;
    return this.#buf.subarray(from, from + len);
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

/**
 * Read data.bin from the start, verify every record (one checksum pass per record) and rebuild
 * the index.
 */
export async function scanData(fd: number, options: ScanOptions): Promise<ScanResult> {
  const { chunkSize, deviceSize, where } = options;
  const fileBytes = (await fstatAsync(fd).catch((err: unknown) => {
    throw toBdsnapError(err);
  })).size;
  const reader = new SequentialReader(fd, fileBytes);
  const records: ScannedRecord[] = [];
  const index = new Map<number, number>();
  let position = 0;
  let preservedBytes = 0;
  const chunkCount = Math.ceil(deviceSize / chunkSize);
  let tornReason: string | undefined;
  try {
    while (position < fileBytes) {
      const bad = (reason: string): void => {
        tornReason = `${reason} at byte ${position} of ${where}`;
      };
      const header = await reader.at(position, RECORD_HEADER_BYTES);
      if (header === undefined) {
        bad('truncated record header');
        break;
      }
      const h = decodeRecordHeader(header);
      if (typeof h === 'string') {
        bad(h);
        break;
      }
      const startBytes = h.firstChunk * chunkSize;
      const aligned = h.payloadBytes % chunkSize === 0 || startBytes + h.payloadBytes === deviceSize;
      if (h.firstChunk >= chunkCount || startBytes + h.payloadBytes > deviceSize || !aligned) {
        bad(`record for chunk ${h.firstChunk} (${h.payloadBytes} bytes) does not fit the device`);
        break;
      }
      const body = await reader.at(position + RECORD_HEADER_BYTES, h.payloadBytes);
      if (body === undefined) {
        bad('truncated record payload');
        break;
      }
      if (!payloadMatches(h, body)) {
        bad('record payload checksum mismatch');
        break;
      }
      records.push({ position, firstChunk: h.firstChunk, payloadBytes: h.payloadBytes });
      for (let i = 0; i * chunkSize < h.payloadBytes; i++) {
        const chunk = h.firstChunk + i;
        if (index.has(chunk)) continue;
        index.set(chunk, position + RECORD_HEADER_BYTES + i * chunkSize);
        preservedBytes += Math.min(chunkSize, h.payloadBytes - i * chunkSize);
      }
      position += RECORD_HEADER_BYTES + h.payloadBytes;
    }
  } finally {
    await reader.settle();
  }
  if (tornReason !== undefined && !options.allowTornTail) {
    throw new BdsnapError('ECORRUPT', `${where} is corrupt: ${tornReason}`);
  }
  return { records, index, validBytes: position, fileBytes, tornReason, preservedBytes };
}
