/** Shared pieces of the singlefilefs tests: temp dirs and a device that records writes. */

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { BlockDevice, BlockSizes, Extent, WriteOptions, ZeroOptions } from '../../src/device/block-device.js';
import { BdsnapError } from '../../src/errors.js';

export function tempDir(t: { after: (fn: () => void) => void }, prefix = 'bdsnap-sffs-'): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

export interface RecordedWrite {
  offsetBytes: number;
  lengthBytes: number;
}

/**
 * Passes everything to `inner` and remembers every write, so tests see what reached the
 * device. `minimumBytes` overrides the advertised minimum block size and is enforced, as an
 * NBD server enforces it.
 */
export class RecordingDevice implements BlockDevice {
  readonly writes: RecordedWrite[] = [];
  readonly #inner: BlockDevice;
  readonly #minimumBytes: number | undefined;

  constructor(inner: BlockDevice, minimumBytes?: number) {
    this.#inner = inner;
    this.#minimumBytes = minimumBytes;
  }

  get size(): number { return this.#inner.size; }
  get readOnly(): boolean { return this.#inner.readOnly; }
  get blockSizes(): BlockSizes {
    const sizes = this.#inner.blockSizes;
    return this.#minimumBytes === undefined ? sizes : { ...sizes, minimum: this.#minimumBytes };
  }
  get canTrim(): boolean { return this.#inner.canTrim; }
  get canFastZero(): boolean { return this.#inner.canFastZero; }
  get canMultiConn(): boolean { return this.#inner.canMultiConn; }

  read(target: Buffer, offsetBytes: number): Promise<void> {
    const minimum = this.blockSizes.minimum;
    if (offsetBytes % minimum !== 0 || target.length % minimum !== 0) {
      return Promise.reject(new BdsnapError('EINVAL', `range ${offsetBytes}+${target.length} is not aligned to ${minimum} bytes`));
    }
    return this.#inner.read(target, offsetBytes);
  }

  write(data: Buffer, offsetBytes: number, options?: WriteOptions): Promise<void> {
    const minimum = this.blockSizes.minimum;
    if (offsetBytes % minimum !== 0 || data.length % minimum !== 0) {
      return Promise.reject(new BdsnapError('EINVAL', `range ${offsetBytes}+${data.length} is not aligned to ${minimum} bytes`));
    }
    this.writes.push({ offsetBytes, lengthBytes: data.length });
    return this.#inner.write(data, offsetBytes, options);
  }

  flush(): Promise<void> { return this.#inner.flush(); }
  trim(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    return this.#inner.trim(offsetBytes, lengthBytes, options);
  }
  zero(offsetBytes: number, lengthBytes: number, options?: ZeroOptions): Promise<void> {
    return this.#inner.zero(offsetBytes, lengthBytes, options);
  }
  cache(offsetBytes: number, lengthBytes: number): Promise<void> { return this.#inner.cache(offsetBytes, lengthBytes); }
  extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> { return this.#inner.extents(offsetBytes, lengthBytes); }
  close(): Promise<void> { return this.#inner.close(); }
}
