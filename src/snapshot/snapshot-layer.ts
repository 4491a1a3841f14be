/**
 * SnapshotLayer: the copy-before-write engine (CowLayer) as the snapshots of a device use it:
 * each point in time is a SnapshotImage whose originals go to a DiffStorage. The engine reads
 * an original once and hands it to every point that lacks it, the mount's session included.
 *
 * SnapshotImage is a point's face as a BlockDevice: it reads through the engine's
 * point-in-time reader, and its writes change the image only (records in its storage).
 */

import { BdsnapError } from '../errors.js';
import { checkRange, type BlockDevice, type BlockSizes, type Extent, type WriteOptions, type ZeroOptions } from '../device/block-device.js';
import { ChunkBitmap } from './chunk-table.js';
import type { DiffStorage } from './diff-storage.js';
import { InFlight } from './copy-claims.js';
import { CowLayer, MAX_RUN_BYTES, type CowPoint } from './cow-layer.js';

export class SnapshotLayer extends CowLayer {
  /**
   * A point in time of the device, now: call it between hold() and release(). Chunks the
   * storage already holds for `deviceKey` (reopened after a restart) count as preserved.
   * Errors: EINVAL (chunk size differs), EBUSY (key already in use), ESHUTDOWN.
   */
  addPoint(storage: DiffStorage, deviceKey: number): SnapshotImage {
    if (storage.chunkSize !== this.chunkSize) {
      throw new BdsnapError('EINVAL', `difference storage ${storage.id} has chunk size ${storage.chunkSize}, the layer ${this.chunkSize}`);
    }
    const held = storage.attach(deviceKey);
    const preserved = new ChunkBitmap(this.chunkCount);
    for (const c of held) if (c < this.chunkCount) preserved.add(c);
    const image = new SnapshotImage(this, this.device, storage, deviceKey, preserved);
    try {
      this.attachPoint(image);
    } catch (err) {
      storage.detach(deviceKey);
      throw err;
    }
    return image;
  }

  /** Stop serving a point: waits for copies in flight; its image then answers ESHUTDOWN. */
  async removePoint(image: SnapshotImage): Promise<void> {
    if (!this.hasPoint(image)) return;
    const detached = this.detachPoint(image);
    await image.shutdown(detached);
  }
}

/**
 * One point in time of a device, as a BlockDevice. Writable: writes change the image only (a
 * new image record per chunk in the storage), never the device.
 */
export class SnapshotImage implements BlockDevice, CowPoint {
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
  readonly #chunkSize: number;
  /** Per-chunk tail of image writes: a partial write reads, patches and stores the whole chunk. */
  readonly #writing = new Map<number, Promise<void>>();
  readonly #inflight = new InFlight();
  #removed = false;

  /** @internal Made by SnapshotLayer.addPoint. */
  constructor(layer: SnapshotLayer, base: BlockDevice, storage: DiffStorage, deviceKey: number, preserved: ChunkBitmap) {
    this.#layer = layer;
    this.#chunkSize = layer.chunkSize;
    this.storage = storage;
    this.deviceKey = deviceKey;
    this.preserved = preserved;
    this.size = base.size;
    this.blockSizes = base.blockSizes;
  }

  // ---- CowPoint (for the layer) ----------------------------------------------------------

  /** @internal */
  get usable(): boolean {
    return this.storage.usable;
  }

  /** @internal */
  get sink(): DiffStorage {
    return this.storage;
  }

  /** @internal */
  ready(): true {
    return true;
  }

  /** @internal */
  locate(chunk: number): number | undefined {
    return this.storage.locate(this.deviceKey, chunk);
  }

  /** @internal */
  readAt(position: number, target: Buffer): Promise<void> {
    return this.storage.readAt(position, target);
  }

  /** @internal */
  checkReadable(): void {
    this.#checkUsable();
  }

  /** @internal */
  async storeOriginal(firstChunk: number, payload: Buffer): Promise<void> {
    if (await this.storage.append(this.deviceKey, 'original', firstChunk, payload)) {
      const last = firstChunk + Math.ceil(payload.length / this.#chunkSize) - 1;
      for (let c = firstChunk; c <= last; c++) this.preserved.add(c);
    }
  }

  /** @internal Called by SnapshotLayer.removePoint. */
  async shutdown(detached: Promise<void>): Promise<void> {
    this.#removed = true;
    await detached;
    await this.#inflight.idle();
    this.storage.detach(this.deviceKey);
  }

  async read(target: Buffer, offsetBytes: number): Promise<void> {
    this.#checkUsable();
    checkRange(this, offsetBytes, target.length, false);
    if (target.length === 0) return;
    await this.#inflight.track(() => this.#layer.readPoint(this, target, offsetBytes));
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
    return this.#layer.extentsOf(this, offsetBytes, lengthBytes);
  }

  /** A no-op: the image belongs to its layer and storage; removePoint() ends it. */
  async close(): Promise<void> {}

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
      await this.#layer.preserve(first, last, this);
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
        if (from > startBytes) await this.#layer.readPoint(this, payload.subarray(0, from - startBytes), startBytes);
        if (to < endBytes) await this.#layer.readPoint(this, payload.subarray(to - startBytes), to);
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
