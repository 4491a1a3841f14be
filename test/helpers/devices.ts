/**
 * BlockDevice wrappers for tests, on the project's PassThroughDevice: one that holds chosen
 * requests until the test lets them go, so a test can observe what a server does while
 * requests are in flight (order of replies, backpressure).
 */

import type { BlockDevice, CloneResult, WriteOptions } from '../../src/device/block-device.js';
import { PassThroughDevice } from '../../src/device/pass-through.js';

export { PassThroughDevice };

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

/**
 * Remembers the range of every read that reached the device. Unless told `clones`, it offers
 * no reflink, so every original a copy-before-write layer keeps above it is read, and counted, here.
 */
export class ReadCountingDevice extends PassThroughDevice {
  readonly reads: Array<{ offsetBytes: number; lengthBytes: number }> = [];
  readonly #clones: boolean;

  constructor(base: BlockDevice, options: { clones?: boolean } = {}) {
    super(base);
    this.#clones = options.clones ?? false;
  }

  override read(target: Buffer, offsetBytes: number): Promise<void> {
    this.reads.push({ offsetBytes, lengthBytes: target.length });
    return super.read(target, offsetBytes);
  }

  override cloneRangeTo(offsetBytes: number, lengthBytes: number, dstFd: number, dstOffsetBytes: number): Promise<CloneResult> {
    return this.#clones ? super.cloneRangeTo(offsetBytes, lengthBytes, dstFd, dstOffsetBytes) : Promise.resolve('unsupported');
  }

  /** How many reads covered each unit of `unitBytes` (a chunk). */
  readsPerUnit(unitBytes: number, sizeBytes: number): number[] {
    const counts = new Array<number>(Math.ceil(sizeBytes / unitBytes)).fill(0);
    for (const r of this.reads) {
      if (r.lengthBytes === 0) continue;
      for (let u = Math.floor(r.offsetBytes / unitBytes); u <= Math.floor((r.offsetBytes + r.lengthBytes - 1) / unitBytes); u++) counts[u]!++;
    }
    return counts;
  }
}
