/** Shared pieces of the singlefilefs tests: temp dirs and a device that records writes. */

import type { BlockDevice, BlockSizes, WriteOptions } from '../../src/device/block-device.js';
import { PassThroughDevice } from '../helpers/devices.js';
import { BdsnapError } from '../../src/errors.js';
import { makeTempDir, type AfterHook } from '../../testkit/files.js';

/** A temporary directory removed after the test (the one implementation is testkit/files.ts). */
export function tempDir(t: AfterHook, prefix = 'bdsnap-sffs-'): string {
  return makeTempDir(t, prefix);
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
export class RecordingDevice extends PassThroughDevice {
  readonly writes: RecordedWrite[] = [];
  readonly #minimumBytes: number | undefined;

  constructor(inner: BlockDevice, minimumBytes?: number) {
    super(inner);
    this.#minimumBytes = minimumBytes;
  }

  override get blockSizes(): BlockSizes {
    const sizes = this.base.blockSizes;
    return this.#minimumBytes === undefined ? sizes : { ...sizes, minimum: this.#minimumBytes };
  }

  override read(target: Buffer, offsetBytes: number): Promise<void> {
    const minimum = this.blockSizes.minimum;
    if (offsetBytes % minimum !== 0 || target.length % minimum !== 0) {
      return Promise.reject(new BdsnapError('EINVAL', `range ${offsetBytes}+${target.length} is not aligned to ${minimum} bytes`));
    }
    return this.base.read(target, offsetBytes);
  }

  override write(data: Buffer, offsetBytes: number, options?: WriteOptions): Promise<void> {
    const minimum = this.blockSizes.minimum;
    if (offsetBytes % minimum !== 0 || data.length % minimum !== 0) {
      return Promise.reject(new BdsnapError('EINVAL', `range ${offsetBytes}+${data.length} is not aligned to ${minimum} bytes`));
    }
    this.writes.push({ offsetBytes, lengthBytes: data.length });
    return this.base.write(data, offsetBytes, options);
  }
}
