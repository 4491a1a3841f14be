/**
 * The base of a layer that wraps another BlockDevice, as an nbdkit filter wraps a plugin:
 * everything is forwarded to the device below, and the three modifying requests (write,
 * trim, write-zeroes) meet in one hook, `modify`, which a layer overrides to act before the
 * request reaches the device below (mark a map, copy an original, record a flag).
 *
 * A fast zero the device below cannot do is refused before `modify`, so a layer never acts
 * for a request that will not happen (the client falls back to writing zeroes).
 */

import { BdsnapError } from '../errors.js';
import type { BlockDevice, BlockSizes, CloneResult, Extent, DeviceStamp, WriteOptions, ZeroOptions } from './block-device.js';

export class PassThroughDevice implements BlockDevice {
  readonly #base: BlockDevice;

  constructor(base: BlockDevice) {
    this.#base = base;
  }

  /** The device below. */
  protected get base(): BlockDevice { return this.#base; }

  get size(): number { return this.#base.size; }
  get readOnly(): boolean { return this.#base.readOnly; }
  get blockSizes(): BlockSizes { return this.#base.blockSizes; }
  get canTrim(): boolean { return this.#base.canTrim; }
  get canFastZero(): boolean { return this.#base.canFastZero; }
  get canMultiConn(): boolean { return this.#base.canMultiConn; }

  read(target: Buffer, offsetBytes: number): Promise<void> {
    return this.#base.read(target, offsetBytes);
  }

  write(data: Buffer, offsetBytes: number, options?: WriteOptions): Promise<void> {
    return this.modify(offsetBytes, data.length, options?.fua ?? false, () => this.#base.write(data, offsetBytes, options));
  }

  trim(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    return this.modify(offsetBytes, lengthBytes, options?.fua ?? false, () => this.#base.trim(offsetBytes, lengthBytes, options));
  }

  zero(offsetBytes: number, lengthBytes: number, options?: ZeroOptions): Promise<void> {
    if (options?.fastZero && !this.#base.canFastZero) return Promise.reject(new BdsnapError('ENOTSUP', 'fast zero is not supported by this device'));
    return this.modify(offsetBytes, lengthBytes, options?.fua ?? false, () => this.#base.zero(offsetBytes, lengthBytes, options));
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

  close(): Promise<void> {
    return this.#base.close();
  }

  /** Like read: the content below is this layer's content. */
  cloneRangeTo(offsetBytes: number, lengthBytes: number, dstFd: number, dstOffsetBytes: number): Promise<CloneResult> {
    return this.#base.cloneRangeTo?.(offsetBytes, lengthBytes, dstFd, dstOffsetBytes) ?? Promise.resolve('unsupported');
  }

  /** Writes here reach the device below: its stamp is this layer's. */
  stamp(): Promise<DeviceStamp | undefined> {
    return this.#base.stamp?.() ?? Promise.resolve(undefined);
  }

  /** A write, trim or write-zeroes of the range (`fua`: force unit access); `apply` sends it to the device below. */
  protected modify(_offsetBytes: number, _lengthBytes: number, _fua: boolean, apply: () => Promise<void>): Promise<void> {
    return apply();
  }
}
