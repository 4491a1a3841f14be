import { BdsnapError } from '../../errors.js';
import { checkRange, type BlockDevice } from '../../device/block-device.js';
import { PassThroughDevice } from '../../device/pass-through.js';
import type { ChangeMap } from './live-map.js';

/**
 * A layer that marks the change map before a write, trim or write-zeroes reaches the device
 * below, and tells the map when each has settled (ChangeMap.writing/written: the map knows
 * when the device holds only the daemon's settled writes); everything else passes through. A
 * rewrite within the current period costs a compare.
 */
export class TrackingDevice extends PassThroughDevice {
  readonly #map: ChangeMap;
  // One reaction per write for its settling (`finally` would cost several promises).
  readonly #done = (): void => this.#map.written();
  readonly #failed = (err: unknown): never => {
    this.#map.written();
    throw err;
  };

  constructor(base: BlockDevice, map: ChangeMap) {
    if (map.info().deviceSizeBytes !== base.size) throw new BdsnapError('EINVAL', `the change map is for ${map.info().deviceSizeBytes} bytes, the device has ${base.size}`);
    super(base);
    this.#map = map;
  }

  // close() closes the device below; the change map is closed by its owner (with the device's stamp).

  protected override modify(offsetBytes: number, lengthBytes: number, _fua: boolean, apply: () => Promise<void>): Promise<void> {
    let marked: void | Promise<void>;
    let begun: void | Promise<void>;
    try {
      if (this.readOnly) throw new BdsnapError('EPERM', 'the device is read-only');
      checkRange(this, offsetBytes, lengthBytes, true);
      marked = this.#map.mark(offsetBytes, lengthBytes);
    } catch (err) {
      return Promise.reject(err);
    }
    try {
      begun = this.#map.writing();
    } catch (err) {
      this.#map.written();
      return Promise.reject(err);
    }
    // No await of ours when nothing new had to be made durable.
    const ready = marked && begun ? Promise.all([marked, begun]) : marked ?? begun;
    return (ready ? ready.then(apply) : apply()).then(this.#done, this.#failed);
  }
}
