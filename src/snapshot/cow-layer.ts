/**
 * CowLayer: the copy-before-write engine. A BlockDevice layer that keeps any number of points
 * in time of the device below it: the mount's session (CowDevice) and each snapshot's image
 * (SnapshotLayer). A write, trim or write-zeroes first hands, to every point that does not hold
 * them yet, the original content of each chunk it touches: read once from the base for all of
 * those points (adjacent chunks in one read), each point storing what it lacks through its own
 * sink (the session store; a snapshot's difference storage). Only then does the request reach
 * the base. A point lacking a whole run whose sink keeps it by reflink (the session store on a
 * filesystem that clones) clones it instead: nothing is read for it.
 *
 * Invariants:
 * - A chunk's original is stored for every point whose sink is usable before any request
 *   touching that chunk reaches the base.
 * - `#copying` holds the copies in flight, one promise per run of chunks, claimed synchronously
 *   before the first await, so two requests racing for a chunk copy it once and the second
 *   waits. After waiting, a request checks again: a point added meanwhile (an image write can
 *   start a copy that no barrier waits for) may still lack the chunk.
 * - With no point, and for rewrites of chunks every point holds, a request goes to the base
 *   without an await of ours.
 * - A point whose sink is not usable is skipped: device I/O never fails or waits because a
 *   point is in trouble. Its reads fail from then on.
 * - hold() is the barrier of a snapshot's take: modifying requests that arrive while held wait
 *   (in order) for release(); hold() resolves once those already in flight, copies included,
 *   have finished. Points are added in between, so no request is half before and half after.
 *
 * The point-in-time reader (readPoint, extentsOf) reads a chunk from the point's sink once
 * preserved, else from the base. A base read is checked again afterwards: a write is only
 * issued once its chunks are preserved, so a chunk still neither preserved nor being copied
 * after the read was read before any change.
 */

import { BdsnapError } from '../errors.js';
import { checkRange, type BlockDevice, type Extent } from '../device/block-device.js';
import { BufferPool } from '../device/buffer-pool.js';
import { PassThroughDevice } from '../device/pass-through.js';
import type { ChunkBitmap } from './chunk-table.js';
import { checkChunkSize, MAX_RECORD_PAYLOAD_BYTES } from './format.js';
import { CopyClaims, InFlight } from './copy-claims.js';

/**
 * Largest run of adjacent chunks read and stored as one record. Its CRC-32 is computed inline
 * (about 4 GB/s, so ~0.5 ms for 2 MiB): small enough not to stall the event loop, large enough
 * that restore reads big pieces.
 */
export const MAX_RUN_BYTES = 2 * 1024 * 1024;
/**
 * Sequential first writes on a sink that clones reach ahead: when a request's first chunk
 * continues the last run claimed, the claim goes on CLONE_AHEAD_BYTES past the request. A clone
 * shares the device's extents (nothing is read or written but a record header), so the chunks
 * kept ahead cost next to nothing, and the requests that follow find their chunks preserved and
 * take the rewrite path: one clone, record and claim per 32 MiB instead of one per request.
 * Each costs about 0.7 ms of the event loop, and the requests in flight wait for it; measured
 * with 1 MiB writes at depth 4 on XFS (five alternated runs each, medians): 8 MiB ahead
 * 1.1-1.85 GB/s, 16 MiB 1.76 GB/s, 32 MiB 1.96 GB/s. Cloned runs may be MAX_CLONE_RUN_BYTES
 * long (a request and the chunks ahead of it), well within a record's payload limit.
 * Only a point that is alone on the layer reaches ahead: any other would need those chunks read.
 */
const CLONE_AHEAD_BYTES = 32 * 1024 * 1024;
export const MAX_CLONE_RUN_BYTES = Math.min(48 * 1024 * 1024, MAX_RECORD_PAYLOAD_BYTES);
/**
 * Cap on the copy buffers kept for reuse (16 requests in flight of 1 MiB). A fresh large buffer
 * costs a page fault and a zeroed page per 4 KiB on first touch, which is more than the copy.
 */
const SPARE_BUFFER_BYTES = 16 * 1024 * 1024;

/** A sink that may keep a run of originals by reflink instead of a copy (the session store). */
export interface CowCloner {
  /** Clones are known to work: runs may be long, and sequential writes may reach ahead. */
  readonly cloning: boolean;
  /** Whether a run of these bytes would be tried as a clone now. */
  clones(startBytes: number, lengthBytes: number): boolean;
  /** Whether chunks ahead of a sequential request may be kept by clone (room, alignment). */
  mayCloneAhead(): boolean;
  /**
   * Keep chunks first..last (marking them preserved once stored). If the clone is refused it
   * stores `bytes()` (the layer's read of the run, beside other points) or reads them itself.
   */
  cloneOriginal(firstChunk: number, lastChunk: number, bytes?: () => Promise<Buffer>): Promise<void>;
}

/** What syncs a point's stored originals; points sharing one are synced once. */
export interface CowSink {
  readonly usable: boolean;
  sync(): Promise<void>;
}

/** A point in time kept by the layer. */
export interface CowPoint {
  /** Set = the point holds the chunk's point-in-time content. */
  readonly preserved: ChunkBitmap;
  /** False: the point takes no more originals (failed, full, gone); its reads fail. */
  readonly usable: boolean;
  readonly sink: CowSink;
  readonly cloner?: CowCloner;
  /** True once the sink can store, false if it never will; else a promise of either. */
  ready(): boolean | Promise<boolean>;
  /**
   * Store the original of chunks from `firstChunk` on (whole chunks; the device's last may be
   * short) and mark them preserved once stored. `payload` is the layer's: not kept after settling.
   */
  storeOriginal(firstChunk: number, payload: Buffer): Promise<void>;
  /** Where the stored content of `chunk` begins, for readAt (undefined: not stored). */
  locate(chunk: number): number | undefined;
  readAt(position: number, target: Buffer): Promise<void>;
  /** Throws why the point's content cannot be read any more. */
  checkReadable(): void;
}

type Segment = { from: number; to: number; location?: number };

function lacksAll(point: CowPoint, first: number, last: number): boolean {
  for (let c = first; c <= last; c++) if (point.preserved.has(c)) return false;
  return true;
}

export class CowLayer extends PassThroughDevice {
  readonly chunkSize: number;

  readonly #maxRunChunks: number;
  #points: CowPoint[] = [];
  readonly #copying = new CopyClaims();
  readonly #spare = new BufferPool(SPARE_BUFFER_BYTES);
  #holds = 0;
  #held: Array<() => void> = [];
  /** Modifying requests (and copies for image writes) between their start and their end. */
  readonly #inflight = new InFlight();
  #closing: Promise<void> | undefined;
  /** Last chunk of the last copy run started: a request starting right after it is sequential. */
  #claimedEnd = -2;

  constructor(base: BlockDevice, options: { chunkSize: number }) {
    checkChunkSize(options.chunkSize);
    super(base);
    this.chunkSize = options.chunkSize;
    this.#maxRunChunks = Math.max(1, MAX_RUN_BYTES / options.chunkSize);
  }

  /** Points currently kept by this layer. */
  get pointCount(): number {
    return this.#points.length;
  }

  /** Chunks of the device. */
  get chunkCount(): number {
    return Math.ceil(this.size / this.chunkSize);
  }

  /** The device below (reads of the layer are its reads). */
  get device(): BlockDevice {
    return this.base;
  }

  /**
   * Write barrier: modifying requests that arrive from now on wait until release(); resolves
   * once those in flight have reached the base. Reads, flush, cache and extents pass. Holds
   * nest: each hold() needs its release(), which must always come (a finally): held writers
   * wait for it. A filesystem freeze goes before hold(), not after: the freeze's own writes
   * would wait for release().
   */
  async hold(): Promise<void> {
    this.#holds++;
    await this.#inflight.idle();
  }

  /** Let the held requests go on, in the order they arrived. */
  release(): void {
    if (this.#holds === 0) throw new BdsnapError('EINVAL', 'release() without hold()');
    if (--this.#holds > 0) return;
    for (const go of this.#held.splice(0)) go();
  }

  /** Keep `point` from now on (a snapshot: between hold() and release()). */
  attachPoint(point: CowPoint): void {
    if (this.#closing) throw new BdsnapError('ESHUTDOWN', 'the copy-before-write layer is closed');
    this.#points = [...this.#points, point];
  }

  /** Stop keeping `point`: resolves once no copy in flight may still hand it an original. */
  async detachPoint(point: CowPoint): Promise<void> {
    if (!this.#points.includes(point)) return;
    // A new array, so that a copy run iterating the old one is not disturbed.
    this.#points = this.#points.filter((p) => p !== point);
    await Promise.all(this.#copying.promises().map((p) => p.catch(() => undefined)));
  }

  hasPoint(point: CowPoint): boolean {
    return this.#points.includes(point);
  }

  // ---- BlockDevice (read, write, trim, zero, cache and extents: PassThroughDevice) ------

  /** The points' sinks first, then the device: an acknowledged flush covers both. */
  override async flush(): Promise<void> {
    await this.#syncSinks();
    await this.base.flush();
  }

  /**
   * Waits for requests in flight; held requests fail with ESHUTDOWN. Does not close the base
   * (its opener does) nor the sinks.
   */
  override close(): Promise<void> {
    this.#closing ??= (async () => {
      this.#holds = 0;
      for (const go of this.#held.splice(0)) go();
      await this.#inflight.idle();
      this.#spare.clear();
    })();
    return this.#closing;
  }

  // ---- write path -----------------------------------------------------------------------

  protected override modify(offsetBytes: number, lengthBytes: number, fua: boolean, apply: () => Promise<void>): Promise<void> {
    try {
      if (this.#closing) throw new BdsnapError('ESHUTDOWN', 'the copy-before-write layer is closed');
      if (this.readOnly) throw new BdsnapError('EPERM', 'the device is read-only');
      checkRange(this, offsetBytes, lengthBytes, true);
    } catch (err) {
      return Promise.reject(err);
    }
    if (this.#holds > 0) {
      return new Promise<void>((resolve) => this.#held.push(resolve)).then(() => this.modify(offsetBytes, lengthBytes, fua, apply));
    }
    const first = Math.floor(offsetBytes / this.chunkSize);
    const last = Math.floor((offsetBytes + lengthBytes - 1) / this.chunkSize);
    const copy = lengthBytes > 0 && this.#needsCopy(first, last);
    if (copy || (fua && this.#points.length > 0)) return this.#modifyCopying(first, last, copy, fua, apply);
    // Nothing to copy: straight to the base, counted for hold() and close().
    return this.#inflight.run(apply);
  }

  /**
   * Counted for hold() and close() by hand rather than through InFlight.track: a first write
   * is the engine's hot path, and each async frame between the copy and the device write is
   * one more promise and microtask per request.
   */
  async #modifyCopying(first: number, last: number, copy: boolean, fua: boolean, apply: () => Promise<void>): Promise<void> {
    this.#inflight.enter();
    try {
      if (copy) {
        for (let wait = this.#claim(first, last, this.#reachAhead(first, last)); wait; wait = this.#claim(first, last, last)) await wait;
      }
      // FUA: the originals of what this write replaces must be as durable as the write.
      if (fua) await this.#syncSinks();
      await apply();
    } finally {
      this.#inflight.leave();
    }
  }

  async #syncSinks(): Promise<void> {
    const sinks = new Set(this.#points.map((p) => p.sink).filter((s) => s.usable));
    // A sink that fails to sync marks its point failed; the device goes on.
    await Promise.all([...sinks].map((s) => s.sync().catch(() => undefined)));
  }

  /** Whether some usable point lacks a chunk of first..last. */
  #needsCopy(first: number, last: number): boolean {
    for (const p of this.#points) if (p.usable && !p.preserved.hasAll(first, last)) return true;
    return false;
  }

  /**
   * Store the originals of chunks first..last for `point` where it lacks them (an image write
   * changes its image, not the device). Resolves when it holds them (or its sink gave up).
   * @internal (SnapshotImage uses it before an image write)
   */
  async preserve(first: number, last: number, point: CowPoint): Promise<void> {
    for (let wait = this.#claim(first, last, last, point); wait; wait = this.#claim(first, last, last, point)) await wait;
  }

  /**
   * Claim the copies chunks first..last still need (for every point, or `only` that one),
   * claiming on to `until` where those need it too, and return what to wait for before
   * looking again: undefined once nothing lacks them. Looking again after the wait matters:
   * a point added meanwhile (an image write can start a copy no barrier waits for) may lack
   * them still. Synchronous: #copying is claimed before anyone else can look.
   */
  #claim(first: number, last: number, until: number, only?: CowPoint): Promise<unknown> | undefined {
    if (only === undefined ? !this.#needsCopy(first, last) : !(only.usable && !only.preserved.hasAll(first, last))) return undefined;
    const maxRunChunks = this.#soleCloner() ? Math.max(1, MAX_CLONE_RUN_BYTES / this.chunkSize) : this.#maxRunChunks;
    const lacks = only === undefined ? (c: number): boolean => this.#needsCopy(c, c) : (c: number): boolean => only.usable && !only.preserved.has(c);
    const waits = this.#copying.claim(first, until, maxRunChunks, lacks, (a, b) => this.#copyRun(a, b, only));
    return waits.length === 1 ? waits[0] : Promise.all(waits);
  }

  /**
   * Where a device write's claim ends: its last chunk, or further ahead for a sequential write
   * whose only point clones (see CLONE_AHEAD_BYTES).
   */
  #reachAhead(first: number, last: number): number {
    if (first !== this.#claimedEnd && first !== this.#claimedEnd + 1) return last;
    const cloner = this.#soleCloner();
    if (!cloner?.mayCloneAhead()) return last;
    const cs = this.chunkSize;
    return Math.max(last, Math.min(last + CLONE_AHEAD_BYTES / cs, Math.floor(this.size / cs) - 1)); // whole chunks only
  }

  /** The layer's only point, when it is usable and known to clone. */
  #soleCloner(): CowCloner | undefined {
    if (this.#points.length !== 1) return undefined;
    const p = this.#points[0]!;
    return p.usable && p.cloner?.cloning === true ? p.cloner : undefined;
  }

  /** Read chunks first..last once and store, for each point (or `only` that one), the parts it lacks. */
  async #copyRun(first: number, last: number, only: CowPoint | undefined): Promise<void> {
    this.#claimedEnd = last;
    this.#inflight.enter();
    try {
      let lacking = this.#lacking(first, last, only);
      let waited = false;
      for (const p of lacking) {
        const ready = p.ready();
        if (ready === true) continue;
        if (ready !== false) await ready;
        waited = true;
      }
      if (waited) lacking = lacking.filter((p) => p.usable);
      if (lacking.length === 0) return;
      const cs = this.chunkSize;
      const startBytes = first * cs;
      const lengthBytes = Math.min((last + 1) * cs, this.size) - startBytes;
      // A point lacking the whole run whose sink clones it reads nothing; the others share one
      // read, which is also what a refused clone stores instead of reading the run again.
      let cloning: CowPoint[] | undefined;
      for (const p of lacking) {
        if (p.cloner?.clones(startBytes, lengthBytes) === true && lacksAll(p, first, last)) (cloning ??= []).push(p);
      }
      if (cloning?.length === 1 && lacking.length === 1) {
        await cloning[0]!.cloner!.cloneOriginal(first, last);
        return;
      }
      const buf = this.#spare.get(lengthBytes);
      try {
        if (cloning === undefined) {
          // Every point copies (a first write smaller than a clone): one read, then the stores.
          await this.base.read(buf, startBytes);
          await this.#store(lacking, first, last, buf);
        } else {
          const read = this.base.read(buf, startBytes);
          const bytes = (): Promise<Buffer> => read.then(() => buf);
          const copying = lacking.filter((p) => !cloning.includes(p));
          await Promise.all([...cloning.map((p) => p.cloner!.cloneOriginal(first, last, bytes)), read.then(() => this.#store(copying, first, last, buf))]);
        }
      } finally {
        // Every sink has written the bytes (or given up on them): nobody holds the buffer.
        if (!this.#closing) this.#spare.put(buf);
      }
    } finally {
      this.#inflight.leave();
    }
  }

  /** The usable points (or `only`, if usable) lacking some chunk of first..last. */
  #lacking(first: number, last: number, only: CowPoint | undefined): CowPoint[] {
    const points = only === undefined ? this.#points : [only];
    const lacks = (p: CowPoint): boolean => p.usable && !p.preserved.hasAll(first, last);
    // Usually every point lacks the run: then the array itself, without a copy per first write
    // (#points is replaced on attach and detach, never changed in place).
    for (const p of points) if (!lacks(p)) return points.filter(lacks);
    return points;
  }

  /** With `buf` holding chunks first..last, store for each point the runs of them it lacks. */
  #store(points: CowPoint[], first: number, last: number, buf: Buffer): Promise<unknown> {
    const cs = this.chunkSize;
    // The usual case: one point lacking the whole run takes the buffer itself, not a view of it
    // (a view is one more Buffer object per first write).
    if (points.length === 1 && lacksAll(points[0]!, first, last)) return points[0]!.storeOriginal(first, buf);
    const stores: Promise<void>[] = [];
    for (const point of points) {
      // Each run of chunks this point lacks becomes one record of its sink.
      let from = -1;
      for (let c = first; c <= last + 1; c++) {
        const lacks = c <= last && !point.preserved.has(c);
        if (lacks && from < 0) from = c;
        if (!lacks && from >= 0) {
          stores.push(point.storeOriginal(from, buf.subarray((from - first) * cs, Math.min((c - first) * cs, buf.length))));
          from = -1;
        }
      }
    }
    return stores.length === 1 ? stores[0]! : Promise.all(stores);
  }

  /** The copy in flight for a chunk, if any. */
  copyOf(chunk: number): Promise<void> | undefined {
    return this.#copying.get(chunk);
  }

  // ---- the point-in-time reader ---------------------------------------------------------

  /** Read `point`'s content: its sink where it holds a chunk, else the base. */
  async readPoint(point: CowPoint, target: Buffer, offsetBytes: number): Promise<void> {
    const parts: Promise<void>[] = [];
    for (const seg of this.#segments(point, offsetBytes, offsetBytes + target.length, true)) {
      const part = target.subarray(seg.from - offsetBytes, seg.to - offsetBytes);
      parts.push(seg.location !== undefined ? point.readAt(seg.location, part) : this.#readBase(point, part, seg.from));
    }
    if (parts.length === 1) await parts[0];
    else await Promise.all(parts);
    // The sink may have failed while we read the base: what we read may be new data.
    point.checkReadable();
  }

  /**
   * Preserved ranges are data; the rest is whatever the base says (base:allocation). A backup
   * skips what this calls zero, so it errs towards data: a run whose chunks began or finished
   * a copy while the base was asked is reported as data.
   */
  async extentsOf(point: CowPoint, offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    if (lengthBytes === 0) return [{ length: 0, flags: 0 }];
    const out: Extent[] = [];
    const push = (length: number, flags: number): void => {
      const lastExtent = out[out.length - 1];
      if (lastExtent && lastExtent.flags === flags) lastExtent.length += length;
      else out.push({ length, flags });
    };
    for (const seg of this.#segments(point, offsetBytes, offsetBytes + lengthBytes, false)) {
      if (seg.location !== undefined) {
        push(seg.to - seg.from, 0);
        continue;
      }
      let covered = 0;
      const baseExtents = await this.base.extents(seg.from, seg.to - seg.from);
      const unchanged = this.#untouched(point, seg.from, seg.to) === true;
      for (const e of baseExtents) {
        const length = Math.min(e.length, seg.to - seg.from - covered);
        if (length <= 0) break;
        push(length, unchanged ? e.flags : 0);
        covered += length;
      }
      // The base answered for less than asked: the answer may stop here.
      if (covered < seg.to - seg.from) break;
    }
    return out;
  }

  /**
   * Split [fromBytes, toBytes) into runs of chunks read from the base and runs read from the
   * sink (chunks whose bytes follow each other). `exact`: a chunk being copied right now ends a
   * base run (the caller waits for its copy).
   */
  #segments(point: CowPoint, fromBytes: number, toBytes: number, exact: boolean): Segment[] {
    const cs = this.chunkSize;
    const out: Segment[] = [];
    let current: Segment | undefined;
    for (let c = Math.floor(fromBytes / cs); c * cs < toBytes; c++) {
      const from = Math.max(fromBytes, c * cs);
      const to = Math.min(toBytes, (c + 1) * cs);
      const location = point.preserved.has(c) ? point.locate(c) : undefined;
      const at = location === undefined ? undefined : location + (from - c * cs);
      const copying = exact && at === undefined && this.#copying.has(c);
      const continues = current !== undefined && !copying && current.to === from
        && (at === undefined ? current.location === undefined : current.location !== undefined && current.location + (current.to - current.from) === at);
      if (continues) {
        current!.to = to;
      } else {
        current = at === undefined ? { from, to } : { from, to, location: at };
        out.push(current);
      }
    }
    return out;
  }

  /**
   * Whether every chunk of [fromBytes, toBytes) still has `point`'s content on the base (true);
   * else the copy in flight of one of them, or false when one is preserved already.
   */
  #untouched(point: CowPoint, fromBytes: number, toBytes: number): Promise<void> | boolean {
    const cs = this.chunkSize;
    for (let c = Math.floor(fromBytes / cs); c * cs < toBytes; c++) {
      const copy = this.#copying.get(c);
      if (copy) return copy;
      if (point.preserved.has(c)) return false;
    }
    return true;
  }

  async #readBase(point: CowPoint, part: Buffer, fromBytes: number): Promise<void> {
    const untouched = (): Promise<void> | boolean => this.#untouched(point, fromBytes, fromBytes + part.length);
    const before = untouched();
    if (before === true) {
      await this.base.read(part, fromBytes);
      point.checkReadable();
      if (untouched() === true) return;
    } else if (before !== false) {
      await before.catch(() => undefined);
    }
    // A copy started or ended meanwhile: look again, chunk by chunk.
    point.checkReadable();
    await this.readPoint(point, part, fromBytes);
  }
}
