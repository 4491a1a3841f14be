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
 *
 * A cloned record (an original kept by reflink) is placed the same way, its payload at the
 * next filesystem-block boundary after its header. Its batch first fills the payload (the
 * clone, done by the caller's function), then writes the headers: so after a kill a header in
 * the file always has its whole payload behind it. In strict mode (one batch at a time) the
 * clone also grows the file past the header before the header is written, and the filesystem
 * logs the size after the clone's remapping: after a power loss the header is only there if
 * the clone is. Its checksum comes later, in a seal record (`seal()`, when the session is
 * quiet and at its end; recovery seals what a crash left unsealed). A record whose fill hands
 * back bytes (a refused clone; `appendUnsealed`, a large copy in 'process' durability) has
 * them written before its header, with a sync in between in strict mode.
 */

import { BdsnapError, toBdsnapError } from '../errors.js';
import { formatBytes } from '../units.js';
import { crc32 } from 'node:zlib';
import { fdatasyncFd, fstatFd, preadFully, writevFully, writevFullySync } from '../host/fd-io.js';
import { SyncIoPolicy } from '../device/sync-io-policy.js';
import {
  RECORD_HEADER_BYTES, decodeRecordHeader, decodeSealPayload, encodeClonedRecordHeader, encodeRecordHeader, encodeSealRecords, payloadMatches, type SealEntry,
} from './format.js';

/** Largest number of batches written at once in 'process' durability. */
const MAX_BATCHES_IN_FLIGHT = 4;
/**
 * In 'process' durability a batch up to this size is always written synchronously: into the
 * page cache that costs microseconds, where a thread-pool round trip costs a wake-up and, on a
 * machine with few cores, context switches that stall the request path. Bigger batches, up to
 * the large limit of SyncIoPolicy (4 MiB), are written synchronously while such writes stay
 * fast, and on the thread pool for a while after a slow one (see sync-io-policy.ts). Measured
 * with a session's sequential 1 MiB first writes: 610-654 MB/s with every batch above 256 KiB
 * on the thread pool, 852-918 MB/s written synchronously.
 */
const SYNC_BATCH_MAX_BYTES = 256 * 1024;

interface Batch {
  pending: Pending[];
  /** File position after the batch. */
  end: number;
  state: 'writing' | 'written' | 'failed';
}

interface Pending {
  /** The header; for a cloned record also the zero padding up to its payload. */
  header: Buffer;
  /** Empty for a cloned record: its fill puts the payload in place (or the batch writes it first). */
  payload: Buffer;
  /** A cloned record's: put the payload in place, or return its bytes to write. */
  fill?: ClonedPayloadFill;
  bytes: number;
  resolve: (position: number | undefined) => void;
  /** What `resolve` gets: the header's position, or a cloned record's payload position. */
  position: number;
  /** Where the record begins in the file. */
  start: number;
}

/**
 * Put a cloned record's payload into the data file at `dstOffsetBytes` (FICLONERANGE on
 * `dstFd`) and resolve with undefined, or resolve with the payload's bytes when it could not
 * be cloned (the writer then writes them there). A rejection fails the store.
 */
export type ClonedPayloadFill = (dstFd: number, dstOffsetBytes: number) => Promise<Buffer | undefined>;

const EMPTY = Buffer.alloc(0);

/** Size of each read of a cloned payload while sealing. */
const SEAL_READ_BYTES = 2 * 1024 * 1024;

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
  readonly #syncIo = new SyncIoPolicy(SYNC_BATCH_MAX_BYTES);
  /** Batches being written, in file order; they resolve strictly in this order. */
  #batches: Batch[] = [];
  #idleWaiters: Array<() => void> = [];
  #failed = false;
  #pumpScheduled = false;
  /** Fills of cloned records running right now (a clone into this file, or bytes handed back). */
  #fillsInFlight = 0;
  /** Cloned records written and not yet sealed: header position, payload position and length. */
  #unsealed: Array<{ position: number; payloadPosition: number; payloadBytes: number; payloadEnd: number }> = [];

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
    if (!this.#reserve(header.length + payload.length)) return Promise.resolve(undefined);
    const position = this.#endBytes;
    this.#endBytes += header.length + payload.length;
    return this.#enqueue({ header, payload, bytes: header.length + payload.length, position, start: position });
  }

  /**
   * Queue one cloned record for chunks firstChunk.. whose payload of `payloadBytes` is put in
   * place by `fill`, at the next multiple of `alignBytes` (the filesystem block size) after
   * its header. Resolves with the payload's position (not the header's), or undefined when
   * the store has failed.
   */
  appendCloned(firstChunk: number, payloadBytes: number, alignBytes: number, fill: ClonedPayloadFill): Promise<number | undefined> {
    const position = this.#endBytes;
    const payloadPosition = Math.ceil((position + RECORD_HEADER_BYTES) / alignBytes) * alignBytes;
    const recordBytes = payloadPosition - position + payloadBytes;
    if (!this.#reserve(recordBytes)) return Promise.resolve(undefined);
    this.#endBytes += recordBytes;
    const header = Buffer.alloc(payloadPosition - position);
    encodeClonedRecordHeader(firstChunk, payloadBytes, position, payloadPosition).copy(header);
    this.#unsealed.push({ position, payloadPosition, payloadBytes, payloadEnd: payloadPosition + payloadBytes });
    return this.#enqueue({ header, payload: EMPTY, fill, bytes: recordBytes, position: payloadPosition, start: position });
  }

  /**
   * Queue one record for chunks firstChunk.. whose checksum comes later, in a seal (the layout
   * of a cloned record, payload right after the header): `payload` goes into the file before
   * the header. This keeps the CRC-32 of a large copy off the request path; only for
   * 'process' durability, where a kill is what must be survived (strict mode keeps the
   * checksum in the header, before the sync). Resolves like appendCloned.
   */
  appendUnsealed(firstChunk: number, payload: Buffer): Promise<number | undefined> {
    return this.appendCloned(firstChunk, payload.length, 1, () => Promise.resolve(payload));
  }

  /** Cloned records not sealed yet. */
  get unsealedRecords(): number {
    return this.#unsealed.length;
  }

  /**
   * Give the cloned records written so far their checksum: read each payload back from the
   * file (the store's copy, which later device writes never change) and append seal records.
   * Appends may go on meanwhile; records not yet in the file wait for the next seal. Sync
   * afterwards to make the seals durable. Errors fail the store.
   */
  async seal(): Promise<void> {
    if (this.#failed) return;
    // Only records whose batch is written: their fill has run, their bytes are final.
    let written = 0;
    while (written < this.#unsealed.length && this.#unsealed[written]!.payloadEnd <= this.#writtenBytes) written++;
    const records = this.#unsealed.splice(0, written);
    if (records.length === 0) return;
    const entries: SealEntry[] = [];
    const buf = Buffer.allocUnsafe(SEAL_READ_BYTES);
    try {
      for (const r of records) {
        let crc = 0;
        for (let done = 0; done < r.payloadBytes;) {
          const piece = buf.subarray(0, Math.min(buf.length, r.payloadBytes - done));
          if ((await preadFully(this.#fd, piece, r.payloadPosition + done)) !== piece.length) {
            throw new BdsnapError('EIO', `the data file ended inside the cloned record at byte ${r.position}`);
          }
          crc = crc32(piece, crc);
          done += piece.length;
        }
        entries.push({ position: r.position, crc });
      }
    } catch (err) {
      this.#fail(`cannot read back a cloned original: ${(err as Error).message}`, err);
      throw toBdsnapError(err);
    }
    await Promise.all(encodeSealRecords(entries).map(({ header, payload }) => this.appendRecord(header, payload)));
  }

  /** Whether `recordBytes` more fit; fails the store when they do not. */
  #reserve(recordBytes: number): boolean {
    if (this.#failed) return false;
    if (this.#endBytes + recordBytes > this.#sizeLimitBytes) {
      this.#fail(`size limit reached: a record of ${formatBytes(recordBytes)} did not fit (${formatBytes(this.#endBytes)} of ${formatBytes(this.#sizeLimitBytes)} used)`);
      return false;
    }
    return true;
  }

  #enqueue(p: Omit<Pending, 'resolve'>): Promise<number | undefined> {
    return new Promise((resolve) => {
      this.#queue.push({ ...p, resolve });
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
      await fdatasyncFd(this.#fd);
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
      const last = pending[pending.length - 1]!;
      batch.end = last.start + last.bytes;
      const cloned = pending.some((p) => p.fill !== undefined);
      const bytes = batch.end - pending[0]!.start;
      if (!cloned && !this.#strict && this.#syncIo.sync(bytes)) {
        try {
          this.#writeNow(segments(pending), bytes);
          batch.state = 'written';
        } catch (err) {
          this.#writeFailed(err);
          batch.state = 'failed';
        }
        continue;
      }
      this.#writeBatch(pending)
        .then(() => (this.#strict ? fdatasyncFd(this.#fd) : undefined))
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

  /**
   * Fill the cloned payloads first (in order; the bytes of a refused clone are written then),
   * then write every header and copied payload. The
   * write runs on this thread when it is small (SyncIoPolicy) and no other batch's clone is in
   * flight; otherwise on the thread pool: a write to the store waits for its inode lock, which
   * a clone of another batch may hold while it waits for the device's, and that must not stall
   * the event loop. Strict batches always go to the pool (they are synced there too).
   */
  async #writeBatch(pending: Pending[]): Promise<void> {
    // Payloads handed back as bytes (a refused clone, an unsealed copy) go into the file before
    // their headers, as a clone would: a header must never stand in front of a payload that a
    // kill (or, in strict mode, a power loss) could leave half written, since recovery seals
    // what it finds behind an unsealed header.
    const placed: Segment[] = [];
    for (const p of pending) {
      if (p.fill === undefined) continue;
      this.#fillsInFlight++;
      let bytes: Buffer | undefined;
      try {
        bytes = await p.fill(this.#fd, p.position);
      } finally {
        this.#fillsInFlight--;
      }
      if (bytes !== undefined && bytes.length > 0) placed.push({ position: p.position, buffers: [bytes], bytes: bytes.length });
    }
    const list = segments(pending);
    const all = placed.concat(list);
    const bytes = all.reduce((sum, segment) => sum + segment.bytes, 0);
    if (!this.#strict && this.#fillsInFlight === 0 && this.#syncIo.sync(bytes)) {
      // No clone into this file is running (every one is a fill of this writer), so the write
      // cannot wait behind one for the file's lock: written here, without a thread-pool round
      // trip that would hold every request waiting for this record for a turn of the loop.
      this.#writeNow(all, bytes);
      return;
    }
    for (const segment of placed) await writevFully(this.#fd, segment.buffers, segment.position);
    if (this.#strict && placed.length > 0) await fdatasyncFd(this.#fd);
    for (const segment of list) await writevFully(this.#fd, segment.buffers, segment.position);
  }

  /** Write `list` (of `bytes` in all, which SyncIoPolicy allowed) on this thread, in its order. */
  #writeNow(list: Segment[], bytes: number): void {
    this.#syncIo.run(bytes, () => {
      for (const segment of list) writevFullySync(this.#fd, segment.buffers, segment.position);
    });
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

/** Bytes written at one position: `buffers` back to back, `bytes` in all. */
interface Segment {
  position: number;
  buffers: Buffer[];
  bytes: number;
}

/**
 * The contiguous runs of bytes a batch writes: every header (with its padding) and copied
 * payload, split where a cloned payload already sits in the file (its fill has put it there,
 * or the batch wrote its bytes first).
 */
function segments(pending: Pending[]): Segment[] {
  const out: Segment[] = [];
  let current: Segment | undefined;
  const add = (position: number, buf: Buffer): void => {
    if (buf.length === 0) return;
    if (current === undefined || current.position + current.bytes !== position) {
      current = { position, buffers: [], bytes: 0 };
      out.push(current);
    }
    current.buffers.push(buf);
    current.bytes += buf.length;
  };
  for (const p of pending) {
    add(p.start, p.header);
    add(p.start + p.header.length, p.payload);
  }
  return out;
}

/** A record holding originals (seal records are not listed). */
export interface ScannedRecord {
  /** Byte position of the header in data.bin. */
  position: number;
  firstChunk: number;
  payloadBytes: number;
  /** Byte position of the payload: after the header, or a cloned record's aligned one. */
  payloadPosition: number;
  cloned: boolean;
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
  /**
   * Cloned records with no seal yet, with the CRC-32 of their payload as read now (only when a
   * torn tail is allowed: a session that did not end cleanly). Recovery seals them.
   */
  unsealed: SealEntry[];
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

/**
 * Read data.bin from the start, verify every record (one checksum pass per record) and rebuild
 * the index.
 */
export async function scanData(fd: number, options: ScanOptions): Promise<ScanResult> {
  const { chunkSize, deviceSize, where } = options;
  const fileBytes = (await fstatFd(fd).catch((err: unknown) => {
    throw toBdsnapError(err);
  })).size;
  const reader = new SequentialReader(fd, fileBytes);
  const records: ScannedRecord[] = [];
  const index = new Map<number, number>();
  /** Cloned records met and not yet sealed: header position -> CRC-32 of the payload. */
  const unsealed = new Map<number, number>();
  let position = 0;
  let preservedBytes = 0;
  const chunkCount = Math.ceil(deviceSize / chunkSize);
  let tornReason: string | undefined;
  try {
    while (position < fileBytes) {
      const bad = (reason: string): void => {
        tornReason = `${reason} at byte ${position} of ${where}`;
      };
      const header = reader.held(position, RECORD_HEADER_BYTES) ?? await reader.at(position, RECORD_HEADER_BYTES);
      if (header === undefined) {
        bad('truncated record header');
        break;
      }
      const h = decodeRecordHeader(header);
      if (typeof h === 'string') {
        bad(h);
        break;
      }
      if (h.kind === 'seal') {
        const body = await reader.at(position + RECORD_HEADER_BYTES, h.payloadBytes);
        if (body === undefined) {
          bad('truncated seal record');
          break;
        }
        const entries = payloadMatches(h, body) ? decodeSealPayload(body) : 'seal record checksum mismatch';
        if (typeof entries === 'string') {
          bad(entries);
          break;
        }
        // A seal is whole and checked: a cloned record it contradicts is corrupt, not torn.
        for (const e of entries) {
          const crc = unsealed.get(e.position);
          if (crc === undefined) throw new BdsnapError('ECORRUPT', `${where} is corrupt: the seal record at byte ${position} names no unsealed cloned record at byte ${e.position}`);
          if (crc !== e.crc) throw new BdsnapError('ECORRUPT', `${where} is corrupt: cloned record payload checksum mismatch at byte ${e.position} (sealed at byte ${position})`);
          unsealed.delete(e.position);
        }
        position += RECORD_HEADER_BYTES + h.payloadBytes;
        continue;
      }
      const startBytes = h.firstChunk * chunkSize;
      const aligned = h.payloadBytes % chunkSize === 0 || startBytes + h.payloadBytes === deviceSize;
      if (h.firstChunk >= chunkCount || startBytes + h.payloadBytes > deviceSize || !aligned) {
        bad(`record for chunk ${h.firstChunk} (${h.payloadBytes} bytes) does not fit the device`);
        break;
      }
      const payloadPosition = position + h.payloadOffset;
      const body = reader.held(payloadPosition, h.payloadBytes) ?? await reader.at(payloadPosition, h.payloadBytes);
      if (body === undefined) {
        bad('truncated record payload');
        break;
      }
      if (h.kind === 'cloned') {
        unsealed.set(position, crc32(body));
      } else if (!payloadMatches(h, body)) {
        bad('record payload checksum mismatch');
        break;
      }
      records.push({ position, firstChunk: h.firstChunk, payloadBytes: h.payloadBytes, payloadPosition, cloned: h.kind === 'cloned' });
      for (let i = 0; i * chunkSize < h.payloadBytes; i++) {
        const chunk = h.firstChunk + i;
        if (index.has(chunk)) continue;
        index.set(chunk, payloadPosition + i * chunkSize);
        preservedBytes += Math.min(chunkSize, h.payloadBytes - i * chunkSize);
      }
      position = payloadPosition + h.payloadBytes;
    }
  } finally {
    await reader.settle();
  }
  if (tornReason !== undefined && !options.allowTornTail) {
    throw new BdsnapError('ECORRUPT', `${where} is corrupt: ${tornReason}`);
  }
  const [firstUnsealed] = unsealed.keys();
  if (firstUnsealed !== undefined && !options.allowTornTail) {
    throw new BdsnapError('ECORRUPT', `${where} is corrupt: the cloned record at byte ${firstUnsealed} has no seal (${unsealed.size} unsealed), so its payload cannot be checked`);
  }
  return {
    records, index, validBytes: position, fileBytes, tornReason, preservedBytes, unsealed: [...unsealed].map(([p, crc]) => ({ position: p, crc })),
  };
}
