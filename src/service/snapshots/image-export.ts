import type { Extent } from '../../device/block-device.js';
import { PassThroughDevice } from '../../device/pass-through.js';
import { BdsnapError } from '../../errors.js';
import type { SnapshotImage } from '../../snapshot/snapshot-layer.js';
import type { SnapshotRecord } from './record.js';
import type { SnapshotChangeTracking } from './tracking.js';

/** What an image export sees of its snapshot. */
export interface ImageOwner {
  readonly record: SnapshotRecord;
  readonly dir: string;
  /** Being destroyed: the images answer ESHUTDOWN. */
  readonly destroying: boolean;
}

/**
 * What an image export serves: the SnapshotImage, refusing with EIO once the snapshot has
 * overflowed or failed (the reason in the message), and recording image writes in the change
 * map before they are acknowledged so the next backup reads them again.
 */
export class ImageExport extends PassThroughDevice {
  readonly #snapshot: ImageOwner;
  readonly #device: string;
  readonly #key: number;
  readonly #tracking: SnapshotChangeTracking | undefined;

  constructor(image: SnapshotImage, snapshot: ImageOwner, device: string, key: number, tracking: SnapshotChangeTracking | undefined) {
    super(image);
    this.#snapshot = snapshot;
    this.#device = device;
    this.#key = key;
    this.#tracking = tracking;
  }

  override get readOnly(): boolean { return false; }
  override get canFastZero(): boolean { return false; }
  /** Image writes on one connection are visible to all: one storage behind them. */
  override get canMultiConn(): boolean { return true; }

  override async read(target: Buffer, offsetBytes: number): Promise<void> {
    this.#check();
    return super.read(target, offsetBytes);
  }

  override async flush(): Promise<void> {
    this.#check();
    return super.flush();
  }

  override async extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    this.#check();
    return super.extents(offsetBytes, lengthBytes);
  }

  /** The image belongs to its snapshot: a connection ending does not close it. */
  override async close(): Promise<void> {}

  protected override async modify(offsetBytes: number, lengthBytes: number, _fua: boolean, apply: () => Promise<void>): Promise<void> {
    this.#check();
    await this.#tracking?.imageWrite(this.#device, this.#snapshot.dir, this.#key, offsetBytes, lengthBytes);
    return apply();
  }

  #check(): void {
    const r = this.#snapshot.record;
    if (this.#snapshot.destroying) throw new BdsnapError('ESHUTDOWN', `snapshot ${r.id} is being destroyed`);
    if (r.state === 'overflowed' || r.state === 'failed') {
      throw new BdsnapError('EIO', `snapshot ${r.id} ${r.state}: ${r.reason ?? 'unknown reason'}; its images cannot be read`);
    }
  }
}
