/** Shared pieces of the singlefilefs tests: temp dirs and a device that records writes. */

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { BlockDevice, Extent, WriteOptions, ZeroOptions } from '../../src/device/block-device.js';

export function tempDir(t: { after: (fn: () => void) => void }, prefix = 'bdsnap-sffs-'): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

export interface RecordedWrite {
  offsetBytes: number;
  lengthBytes: number;
}

/** Passes everything to `inner` and remembers every write, so tests see what reached the device. */
export class RecordingDevice implements BlockDevice {
  readonly writes: RecordedWrite[] = [];
  readonly #inner: BlockDevice;

  constructor(inner: BlockDevice) {
    this.#inner = inner;
  }

  get size(): number { return this.#inner.size; }
  get readOnly(): boolean { return this.#inner.readOnly; }
  get blockSizes() { return this.#inner.blockSizes; }
  get canTrim(): boolean { return this.#inner.canTrim; }
  get canFastZero(): boolean { return this.#inner.canFastZero; }
  get canMultiConn(): boolean { return this.#inner.canMultiConn; }

  read(target: Buffer, offsetBytes: number): Promise<void> {
    return this.#inner.read(target, offsetBytes);
  }

  write(data: Buffer, offsetBytes: number, options?: WriteOptions): Promise<void> {
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
