/** PointInTimeView: the read-only face of a point's content (a session's view()). */

import { BdsnapError } from '../errors.js';
import { checkRange, type BlockDevice, type BlockSizes, type Extent } from '../device/block-device.js';

export class PointInTimeView implements BlockDevice {
  readonly size: number;
  readonly readOnly = true;
  readonly blockSizes: BlockSizes;
  readonly canTrim = false;
  readonly canFastZero = false;
  readonly canMultiConn = true;
  readonly #read: (target: Buffer, offsetBytes: number) => Promise<void>;

  constructor(size: number, blockSizes: BlockSizes, read: (target: Buffer, offsetBytes: number) => Promise<void>) {
    this.size = size;
    this.blockSizes = blockSizes;
    this.#read = read;
  }

  read(target: Buffer, offsetBytes: number): Promise<void> {
    return this.#read(target, offsetBytes);
  }

  async write(): Promise<void> {
    throw new BdsnapError('EPERM', 'a point-in-time view is read-only');
  }

  async trim(): Promise<void> {
    throw new BdsnapError('EPERM', 'a point-in-time view is read-only');
  }

  async zero(): Promise<void> {
    throw new BdsnapError('EPERM', 'a point-in-time view is read-only');
  }

  async flush(): Promise<void> {}

  async cache(offsetBytes: number, lengthBytes: number): Promise<void> {
    checkRange(this, offsetBytes, lengthBytes, false);
  }

  async extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    checkRange(this, offsetBytes, lengthBytes, false);
    return [{ length: lengthBytes, flags: 0 }];
  }

  async close(): Promise<void> {}
}
