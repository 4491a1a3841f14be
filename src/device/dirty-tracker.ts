/**
 * A pass-through layer for a device served without a session (not active). The first
 * modifying request records, durably and before it reaches the device, that the device was
 * changed outside any session: a later restore must know its sessions no longer describe it.
 */

import type { BlockDevice, Extent, WriteOptions, ZeroOptions } from './block-device.js';

export class DirtyTracker implements BlockDevice {
  readonly #base: BlockDevice;
  readonly #onFirstModify: () => Promise<void>;
  #marked: Promise<void> | undefined;

  constructor(base: BlockDevice, onFirstModify: () => Promise<void>) {
    this.#base = base;
    this.#onFirstModify = onFirstModify;
  }

  get size(): number { return this.#base.size; }
  get readOnly(): boolean { return this.#base.readOnly; }
  get blockSizes(): BlockDevice['blockSizes'] { return this.#base.blockSizes; }
  get canTrim(): boolean { return this.#base.canTrim; }
  get canFastZero(): boolean { return this.#base.canFastZero; }
  get canMultiConn(): boolean { return this.#base.canMultiConn; }

  read(target: Buffer, offsetBytes: number): Promise<void> {
    return this.#base.read(target, offsetBytes);
  }

  async write(data: Buffer, offsetBytes: number, options?: WriteOptions): Promise<void> {
    await this.#mark();
    return this.#base.write(data, offsetBytes, options);
  }

  async trim(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    await this.#mark();
    return this.#base.trim(offsetBytes, lengthBytes, options);
  }

  async zero(offsetBytes: number, lengthBytes: number, options?: ZeroOptions): Promise<void> {
    await this.#mark();
    return this.#base.zero(offsetBytes, lengthBytes, options);
  }

  flush(): Promise<void> {
    return this.#base.flush();
  }

  cache(offsetBytes: number, lengthBytes: number): Promise<void> {
    return this.#base.cache(offsetBytes, lengthBytes);
  }

  extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    return this.#base.extents(offsetBytes, lengthBytes);
  }

  /** Does not close the base: the attachment owns it. */
  async close(): Promise<void> {}

  #mark(): Promise<void> {
    if (this.#base.readOnly) return Promise.resolve();
    // A failed mark is retried by the next request rather than remembered as done.
    this.#marked ??= this.#onFirstModify().catch((err: unknown) => {
      this.#marked = undefined;
      throw err;
    });
    return this.#marked;
  }
}
