/**
 * StoreWriter: the ordered append queue of a store file (a session's data.bin; each file of a
 * snapshot's difference storage). It encodes session records itself (append, appendCloned,
 * seal) and takes other layouts encoded (appendRecord); the scanners (store-scan.ts, and
 * diff-storage.ts, both through record-scan.ts) read them back.
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

import { crc32 } from 'node:zlib';
import { BdsnapError, toBdsnapError } from '../errors.js';
import { formatBytes } from '../units.js';
import { fdatasyncFd, preadFully, writevFully, writevFullySync } from '../host/fd-io.js';
import { SyncIoPolicy } from '../device/sync-io-policy.js';
import { RECORD_HEADER_BYTES, encodeClonedRecordHeader, encodeRecordHeader, encodeSealRecords, type SealEntry } from './format.js';

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
  fill: ClonedPayloadFill | undefined;
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
    return this.#enqueue(header, payload, undefined, header.length + payload.length, position, position);
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
    return this.#enqueue(header, EMPTY, fill, recordBytes, payloadPosition, position);
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

  /** Queue a record (its fields as Pending's; one object of one shape per record, on the path of every first write). */
  #enqueue(header: Buffer, payload: Buffer, fill: ClonedPayloadFill | undefined, bytes: number, position: number, start: number): Promise<number | undefined> {
    return new Promise((resolve) => {
      this.#queue.push({ header, payload, fill, bytes, resolve, position, start });
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

