/**
 * SnapshotLayer: a BlockDevice layer that serves any number of points in time of the device
 * below it, each a SnapshotImage whose originals go to a DiffStorage. A write, trim or
 * write-zeroes first stores, for every point that does not hold them yet, the original content
 * of each chunk it touches: read once from the base for all of those points (adjacent chunks in
 * one read), appended to each point's storage. Only then does the request reach the base.
 *
 * Invariants:
 * - A chunk's original is stored for every point whose storage is usable before any request
 *   touching that chunk reaches the base.
 * - `#copying` holds the copies in flight, one promise per run of chunks, claimed synchronously
 *   before the first await, so two requests racing for a chunk copy it once and the second
 *   waits. After waiting, a request checks again: a point added meanwhile (an image write can
 *   start a copy that no barrier waits for) may still lack the chunk.
 * - With no point, and for rewrites of chunks every point holds, a request goes to the base
 *   without an await of ours.
 * - A point whose storage is not 'ok' is skipped: device I/O never fails or waits because a
 *   snapshot is in trouble. Its image answers EIO from then on.
 * - hold() is the barrier of a take: modifying requests that arrive while held wait (in
 *   order) for release(); hold() resolves once those already in flight, copies included, have
 *   finished. Points are added in between, so no request is half before and half after a point.
 *
 * SnapshotImage reads a chunk from its storage once preserved, else from the base. A base read
 * is checked again afterwards: a write is only issued once its chunks are preserved, so a chunk
 * still neither preserved nor being copied after the read was read before any change.
 */

import { BdsnapError } from '../errors.js';
import { checkRange, type BlockDevice, type BlockSizes, type Extent, type WriteOptions, type ZeroOptions } from '../device/block-device.js';
import { BufferPool } from '../device/buffer-pool.js';
import { PassThroughDevice } from '../device/pass-through.js';
import { ChunkBitmap } from './chunk-table.js';
import { checkChunkSize } from './format.js';
import type { DiffStorage } from './diff-storage.js';
import { CopyClaims, InFlight } from './copy-claims.js';

/** Largest run of adjacent chunks read and stored as one record (its CRC is computed inline). */
const MAX_RUN_BYTES = 2 * 1024 * 1024;
/** Cap on the copy buffers kept for reuse. */
const SPARE_BUFFER_BYTES = 16 * 1024 * 1024;

export class SnapshotLayer extends PassThroughDevice {
  readonly chunkSize: number;

  readonly #chunkCount: number;
  readonly #maxRunChunks: number;
  #points: SnapshotImage[] = [];
  readonly #copying = new CopyClaims();
  readonly #spare = new BufferPool(SPARE_BUFFER_BYTES);
  #holds = 0;
  #held: Array<() => void> = [];
  /** Modifying requests (and copies for image writes) between their start and their end. */
  readonly #inflight = new InFlight();
  #closing: Promise<void> | undefined;

  constructor(base: BlockDevice, options: { chunkSize: number }) {
    checkChunkSize(options.chunkSize);
    super(base);
    this.chunkSize = options.chunkSize;
    this.#chunkCount = Math.ceil(base.size / options.chunkSize);
    this.#maxRunChunks = Math.max(1, MAX_RUN_BYTES / options.chunkSize);
  }

  /** Points (images) currently served by this layer. */
  get pointCount(): number {
    return this.#points.length;
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

  /**
   * A point in time of the device, now: call it between hold() and release(). Chunks the
   * storage already holds for `deviceKey` (reopened after a restart) count as preserved.
   * Errors: EINVAL (chunk size differs), EBUSY (key already in use), ESHUTDOWN.
   */
  addPoint(storage: DiffStorage, deviceKey: number): SnapshotImage {
    if (this.#closing) throw new BdsnapError('ESHUTDOWN', 'the snapshot layer is closed');
    if (storage.chunkSize !== this.chunkSize) {
      throw new BdsnapError('EINVAL', `difference storage ${storage.id} has chunk size ${storage.chunkSize}, the layer ${this.chunkSize}`);
    }
    const held = storage.attach(deviceKey);
    const preserved = new ChunkBitmap(this.#chunkCount);
    for (const c of held) if (c < this.#chunkCount) preserved.add(c);
    const image = new SnapshotImage(this, this.base, storage, deviceKey, preserved);
    this.#points = [...this.#points, image];
    return image;
  }

  /** Stop serving a point: waits for copies in flight; its image then answers ESHUTDOWN. */
  async removePoint(image: SnapshotImage): Promise<void> {
    if (!this.#points.includes(image)) return;
    // A new array, so that a copy run iterating the old one is not disturbed.
    this.#points = this.#points.filter((p) => p !== image);
    await image.shutdown(this.#copying.promises());
  }

  // ---- BlockDevice (read, write, trim, zero, cache and extents: PassThroughDevice) ------

  /** The points' storages first, then the device: an acknowledged flush covers both. */
  override async flush(): Promise<void> {
    await this.#syncStorages();
    await this.base.flush();
  }

  /**
   * Waits for requests in flight; held requests fail with ESHUTDOWN. Does not close the base
   * (its opener does) nor the storages.
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
      if (this.#closing) throw new BdsnapError('ESHUTDOWN', 'the snapshot layer is closed');
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

  #modifyCopying(first: number, last: number, copy: boolean, fua: boolean, apply: () => Promise<void>): Promise<void> {
    return this.#inflight.track(async () => {
      if (copy) await this.preserve(first, last);
      // FUA: the originals of what this write replaces must be as durable as the write.
      if (fua) await this.#syncStorages();
      await apply();
    });
  }

  async #syncStorages(): Promise<void> {
    const storages = new Set(this.#points.map((p) => p.storage).filter((s) => s.usable));
    // A storage that fails to sync is marked failed by itself; the device goes on.
    await Promise.all([...storages].map((s) => s.sync().catch(() => undefined)));
  }

  /** Whether some point with a usable storage lacks a chunk of first..last. */
  #needsCopy(first: number, last: number): boolean {
    for (const p of this.#points) if (p.storage.usable && !p.preserved.hasAll(first, last)) return true;
    return false;
  }

  /**
   * Store the originals of chunks first..last for every point that lacks them. Resolves when
   * every usable point holds them (or its storage gave up).
   * @internal (SnapshotImage uses it before an image write)
   */
  async preserve(first: number, last: number): Promise<void> {
    while (this.#needsCopy(first, last)) {
      await Promise.all(this.#copying.claim(first, last, this.#maxRunChunks, (c) => this.#needsCopy(c, c), (a, b) => this.#copyRun(a, b)));
    }
  }

  /** Read chunks first..last once and store, for each point, the parts it lacks. */
  async #copyRun(first: number, last: number): Promise<void> {
    this.#inflight.enter();
    const cs = this.chunkSize;
    const startBytes = first * cs;
    const buf = this.#spare.get(Math.min((last + 1) * cs, this.size) - startBytes);
    try {
      await this.base.read(buf, startBytes);
      const stores: Promise<void>[] = [];
      for (const point of this.#points) {
        if (!point.storage.usable) continue;
        // Each run of chunks this point lacks becomes one record of its storage.
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
      await Promise.all(stores);
    } finally {
      // Every storage has written the bytes (or given up on them): nobody holds the buffer.
      if (!this.#closing) this.#spare.put(buf);
      this.#inflight.leave();
    }
  }

  /** The copy in flight for a chunk, if any. @internal */
  copyOf(chunk: number): Promise<void> | undefined {
    return this.#copying.get(chunk);
  }
}

type Segment = { from: number; to: number; location?: number };

/**
 * One point in time of a device, as a BlockDevice. Writable: writes change the image only (a
 * new image record per chunk in the storage), never the device.
 */
export class SnapshotImage implements BlockDevice {
  readonly size: number;
  readonly readOnly = false;
  readonly blockSizes: BlockSizes;
  readonly canTrim = false;
  readonly canFastZero = false;
  /** The storage is shared by every handle, so a flush on one covers them all. */
  readonly canMultiConn = true;
  readonly deviceKey: number;
  readonly storage: DiffStorage;
  /**
   * Called with the range of every image write (and write-zeroes) before the write is stored
   * and acknowledged: the daemon records it in the change map. An exception fails the write.
   */
  onImageWrite?: (offsetBytes: number, lengthBytes: number) => void;
  /** Set = the storage holds this chunk for this point. @internal */
  readonly preserved: ChunkBitmap;

  readonly #layer: SnapshotLayer;
  readonly #base: BlockDevice;
  readonly #chunkSize: number;
  /** Per-chunk tail of image writes: a partial write reads, patches and stores the whole chunk. */
  readonly #writing = new Map<number, Promise<void>>();
  readonly #inflight = new InFlight();
  #removed = false;

  /** @internal Made by SnapshotLayer.addPoint. */
  constructor(layer: SnapshotLayer, base: BlockDevice, storage: DiffStorage, deviceKey: number, preserved: ChunkBitmap) {
    this.#layer = layer;
    this.#base = base;
    this.#chunkSize = layer.chunkSize;
    this.storage = storage;
    this.deviceKey = deviceKey;
    this.preserved = preserved;
    this.size = base.size;
    this.blockSizes = base.blockSizes;
  }

  /** @internal */
  async storeOriginal(firstChunk: number, payload: Buffer): Promise<void> {
    if (await this.storage.append(this.deviceKey, 'original', firstChunk, payload)) {
      const last = firstChunk + Math.ceil(payload.length / this.#chunkSize) - 1;
      for (let c = firstChunk; c <= last; c++) this.preserved.add(c);
    }
  }

  /** @internal Called by SnapshotLayer.removePoint. */
  async shutdown(copies: Promise<void>[]): Promise<void> {
    this.#removed = true;
    await Promise.all(copies.map((p) => p.catch(() => undefined)));
    await this.#inflight.idle();
    this.storage.detach(this.deviceKey);
  }

  async read(target: Buffer, offsetBytes: number): Promise<void> {
    this.#checkUsable();
    checkRange(this, offsetBytes, target.length, false);
    if (target.length === 0) return;
    await this.#inflight.track(() => this.#readRange(target, offsetBytes));
  }

  write(data: Buffer, offsetBytes: number, options?: WriteOptions): Promise<void> {
    return this.#writeImage(offsetBytes, data.length, data, options?.fua ?? false);
  }

  /** Advisory, as on a FileDevice: the image keeps its content. */
  async trim(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    this.#checkUsable();
    checkRange(this, offsetBytes, lengthBytes, true);
    if (options?.fua) await this.flush();
  }

  async zero(offsetBytes: number, lengthBytes: number, options?: ZeroOptions): Promise<void> {
    if (options?.fastZero) throw new BdsnapError('ENOTSUP', 'fast zero is not supported by a snapshot image');
    return this.#writeImage(offsetBytes, lengthBytes, undefined, options?.fua ?? false);
  }

  async flush(): Promise<void> {
    this.#checkUsable();
    await this.storage.sync();
  }

  async cache(offsetBytes: number, lengthBytes: number): Promise<void> {
    checkRange(this, offsetBytes, lengthBytes, false);
  }

  /**
   * Preserved ranges are data; the rest is whatever the base says (base:allocation). A backup
   * skips what this calls zero, so it errs towards data: a run whose chunks began or finished
   * a copy while the base was asked is reported as data.
   */
  async extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    this.#checkUsable();
    checkRange(this, offsetBytes, lengthBytes, false);
    if (lengthBytes === 0) return [{ length: 0, flags: 0 }];
    const out: Extent[] = [];
    const push = (length: number, flags: number): void => {
      const lastExtent = out[out.length - 1];
      if (lastExtent && lastExtent.flags === flags) lastExtent.length += length;
      else out.push({ length, flags });
    };
    for (const seg of this.#segments(offsetBytes, offsetBytes + lengthBytes, false)) {
      if (seg.location !== undefined) {
        push(seg.to - seg.from, 0);
        continue;
      }
      let covered = 0;
      const baseExtents = await this.#base.extents(seg.from, seg.to - seg.from);
      const unchanged = this.#untouched(seg.from, seg.to) === true;
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

  /** A no-op: the image belongs to its layer and storage; removePoint() ends it. */
  async close(): Promise<void> {}

  // ---- reads ----------------------------------------------------------------------------

  /**
   * Split [fromBytes, toBytes) into runs of chunks read from the base and runs read from the
   * storage (chunks whose bytes follow each other in one file). `exact`: a chunk being copied
   * right now ends a base run (the caller waits for its copy).
   */
  #segments(fromBytes: number, toBytes: number, exact: boolean): Segment[] {
    const cs = this.#chunkSize;
    const out: Segment[] = [];
    let current: Segment | undefined;
    for (let c = Math.floor(fromBytes / cs); c * cs < toBytes; c++) {
      const from = Math.max(fromBytes, c * cs);
      const to = Math.min(toBytes, (c + 1) * cs);
      const location = this.preserved.has(c) ? this.storage.locate(this.deviceKey, c) : undefined;
      const at = location === undefined ? undefined : location + (from - c * cs);
      const copying = exact && at === undefined && this.#layer.copyOf(c) !== undefined;
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
   * Whether every chunk of [fromBytes, toBytes) still has its point-in-time content on the base
   * (true); else the copy in flight of one of them, or false when one is preserved already.
   */
  #untouched(fromBytes: number, toBytes: number): Promise<void> | boolean {
    const cs = this.#chunkSize;
    for (let c = Math.floor(fromBytes / cs); c * cs < toBytes; c++) {
      const copy = this.#layer.copyOf(c);
      if (copy) return copy;
      if (this.preserved.has(c)) return false;
    }
    return true;
  }

  async #readRange(target: Buffer, offsetBytes: number): Promise<void> {
    const parts: Promise<void>[] = [];
    for (const seg of this.#segments(offsetBytes, offsetBytes + target.length, true)) {
      const part = target.subarray(seg.from - offsetBytes, seg.to - offsetBytes);
      parts.push(seg.location !== undefined ? this.storage.readAt(seg.location, part) : this.#readBase(part, seg.from));
    }
    await Promise.all(parts);
    // The storage may have failed while we read the base: what we read may be new data.
    this.#checkUsable();
  }

  async #readBase(part: Buffer, fromBytes: number): Promise<void> {
    const untouched = (): Promise<void> | boolean => this.#untouched(fromBytes, fromBytes + part.length);
    const before = untouched();
    if (before === true) {
      await this.#base.read(part, fromBytes);
      this.#checkUsable();
      if (untouched() === true) return;
    } else if (before !== false) {
      await before.catch(() => undefined);
    }
    // A copy started or ended meanwhile: look again, chunk by chunk.
    this.#checkUsable();
    await this.#readRange(part, fromBytes);
  }

  // ---- writes ---------------------------------------------------------------------------

  async #writeImage(offsetBytes: number, lengthBytes: number, data: Buffer | undefined, fua: boolean): Promise<void> {
    this.#checkUsable();
    checkRange(this, offsetBytes, lengthBytes, true);
    if (lengthBytes === 0) return;
    const cs = this.#chunkSize;
    const first = Math.floor(offsetBytes / cs);
    const last = Math.floor((offsetBytes + lengthBytes - 1) / cs);
    this.#inflight.enter();
    // Image writes of a chunk are serialised: each reads the chunk, patches it and stores it.
    const before = new Set<Promise<void>>();
    for (let c = first; c <= last; c++) {
      const w = this.#writing.get(c);
      if (w) before.add(w);
    }
    let done!: () => void;
    const mine = new Promise<void>((resolve) => (done = resolve));
    for (let c = first; c <= last; c++) this.#writing.set(c, mine);
    try {
      await Promise.all(before);
      this.#checkUsable();
      // The original first: the chunk must read as the point in time before it is patched.
      await this.#layer.preserve(first, last);
      this.#checkUsable();
      this.onImageWrite?.(offsetBytes, lengthBytes);
      const maxRun = Math.max(1, Math.floor(MAX_RUN_BYTES / cs));
      const stores: Promise<boolean>[] = [];
      for (let runFirst = first; runFirst <= last; runFirst += maxRun) {
        const runLast = Math.min(last, runFirst + maxRun - 1);
        const startBytes = runFirst * cs;
        const endBytes = Math.min((runLast + 1) * cs, this.size);
        const payload = Buffer.allocUnsafe(endBytes - startBytes);
        // Edges not covered by the write keep the image's current content.
        const from = Math.max(offsetBytes, startBytes);
        const to = Math.min(offsetBytes + lengthBytes, endBytes);
        if (from > startBytes) await this.#readRange(payload.subarray(0, from - startBytes), startBytes);
        if (to < endBytes) await this.#readRange(payload.subarray(to - startBytes), to);
        if (data) data.copy(payload, from - startBytes, from - offsetBytes, to - offsetBytes);
        else payload.fill(0, from - startBytes, to - startBytes);
        stores.push(this.storage.append(this.deviceKey, 'image', runFirst, payload));
      }
      const stored = await Promise.all(stores);
      if (stored.includes(false)) {
        this.#checkUsable();
        throw new BdsnapError('EIO', `snapshot storage ${this.storage.id} could not store the image write`);
      }
      if (fua) await this.storage.sync();
    } finally {
      for (let c = first; c <= last; c++) if (this.#writing.get(c) === mine) this.#writing.delete(c);
      done();
      this.#inflight.leave();
    }
  }

  // ---- state ----------------------------------------------------------------------------

  #checkUsable(): void {
    if (this.#removed) throw new BdsnapError('ESHUTDOWN', `the snapshot image (storage ${this.storage.id}, device ${this.deviceKey}) was removed`);
    this.storage.checkReadable();
  }
}
