/**
 * A pass-through layer for a device served without a session (not active). The first
 * modifying request records, durably and before it reaches the device, that the device was
 * changed outside any session: a later restore must know its sessions no longer describe it.
 */

import type { BlockDevice } from './block-device.js';
import { PassThroughDevice } from './pass-through.js';

export class DirtyTracker extends PassThroughDevice {
  readonly #onFirstModify: () => Promise<void>;
  #marked: Promise<void> | undefined;

  constructor(base: BlockDevice, onFirstModify: () => Promise<void>) {
    super(base);
    this.#onFirstModify = onFirstModify;
  }

  /** Does not close the base: the attachment owns it. */
  override async close(): Promise<void> {}

  protected override async modify(_offsetBytes: number, _lengthBytes: number, _fua: boolean, apply: () => Promise<void>): Promise<void> {
    await this.#mark();
    return apply();
  }

  #mark(): Promise<void> {
    if (this.base.readOnly) return Promise.resolve();
    // A failed mark is retried by the next request rather than remembered as done.
    this.#marked ??= this.#onFirstModify().catch((err: unknown) => {
      this.#marked = undefined;
      throw err;
    });
    return this.#marked;
  }
}
