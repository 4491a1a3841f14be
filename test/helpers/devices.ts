/**
 * BlockDevice wrappers for tests: one that passes everything through (the base of the
 * others), and one that holds chosen requests until the test lets them go, so a test can
 * observe what a server does while requests are in flight (order of replies, backpressure).
 */

import type { BlockDevice, BlockSizes, Extent, WriteOptions, ZeroOptions } from '../../src/device/block-device.js';

/** Forwards every call to `inner`; subclasses override what they watch. */
export class PassThroughDevice implements BlockDevice {
  protected readonly inner: BlockDevice;

  constructor(inner: BlockDevice) {
    this.inner = inner;
  }

  get size(): number { return this.inner.size; }
  get readOnly(): boolean { return this.inner.readOnly; }
  get blockSizes(): BlockSizes { return this.inner.blockSizes; }
  get canTrim(): boolean { return this.inner.canTrim; }
  get canFastZero(): boolean { return this.inner.canFastZero; }
  get canMultiConn(): boolean { return this.inner.canMultiConn; }

  read(target: Buffer, offsetBytes: number): Promise<void> { return this.inner.read(target, offsetBytes); }
  write(data: Buffer, offsetBytes: number, options?: WriteOptions): Promise<void> { return this.inner.write(data, offsetBytes, options); }
  flush(): Promise<void> { return this.inner.flush(); }
  trim(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> { return this.inner.trim(offsetBytes, lengthBytes, options); }
  zero(offsetBytes: number, lengthBytes: number, options?: ZeroOptions): Promise<void> { return this.inner.zero(offsetBytes, lengthBytes, options); }
  cache(offsetBytes: number, lengthBytes: number): Promise<void> { return this.inner.cache(offsetBytes, lengthBytes); }
  extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> { return this.inner.extents(offsetBytes, lengthBytes); }
  close(): Promise<void> { return this.inner.close(); }
}

export type HeldKind = 'read' | 'write';

/**
 * Reads and writes for which `holds(kind, offsetBytes)` is true wait until `release()`;
 * `started` lists every read and write that reached the device, held or not, in order.
 */
export class GatedDevice extends PassThroughDevice {
  readonly started: Array<{ kind: HeldKind; offsetBytes: number }> = [];
  #holds: (kind: HeldKind, offsetBytes: number) => boolean = () => false;
  #gate: Promise<void> = Promise.resolve();
  #open: () => void = () => undefined;

  /** From now on, hold the requests `holds` picks (until release()). */
  hold(holds: (kind: HeldKind, offsetBytes: number) => boolean): void {
    this.#holds = holds;
    this.#gate = new Promise((resolve) => (this.#open = resolve));
  }

  /** Let every held request go, and hold nothing more. */
  release(): void {
    this.#holds = () => false;
    this.#open();
  }

  override async read(target: Buffer, offsetBytes: number): Promise<void> {
    await this.#pass('read', offsetBytes);
    return super.read(target, offsetBytes);
  }

  override async write(data: Buffer, offsetBytes: number, options?: WriteOptions): Promise<void> {
    await this.#pass('write', offsetBytes);
    return super.write(data, offsetBytes, options);
  }

  async #pass(kind: HeldKind, offsetBytes: number): Promise<void> {
    this.started.push({ kind, offsetBytes });
    if (this.#holds(kind, offsetBytes)) await this.#gate;
  }
}
