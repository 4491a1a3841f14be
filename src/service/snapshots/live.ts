/** A snapshot the daemon serves: its record, storage and images (one per device). */

import type { DiffStorage } from '../../snapshot/diff-storage.js';
import type { SnapshotImage, SnapshotLayer } from '../../snapshot/snapshot-layer.js';
import { ImageExport } from './image-export.js';
import type { SnapshotRecord } from './record.js';
import type { SnapshotChangeTracking } from './tracking.js';

export interface LiveImage {
  device: string;
  key: number;
  layer: SnapshotLayer;
  image: SnapshotImage;
  exported: ImageExport;
  /** Export handles open on this image (NBD connections, a bdsnap mount's among them). */
  connections: number;
}

export interface LiveSnapshot {
  record: SnapshotRecord;
  dir: string;
  storage: DiffStorage;
  images: LiveImage[];
  destroying: boolean;
  /** A destroy is deciding: no new client may open an image (I/O of those open goes on). */
  closing: boolean;
  /** The record write in flight, if any (writes of one record go one at a time; a destroy waits for it). */
  recordWrite?: Promise<void>;
  /** Each device's count of writers around bdsnap at the take (DeviceTable.writtenAroundCount): one found before the snapshot is listed voids it. */
  aroundAtTake?: ReadonlyMap<string, number>;
}

/**
 * Add the snapshot's point for device `device` (key `key`) on `layer` and its image. Call with
 * the layer held (no modifying request in flight).
 */
export function addImage(snapshot: LiveSnapshot, layer: SnapshotLayer, device: string, key: number, tracking: SnapshotChangeTracking | undefined): void {
  const image = layer.addPoint(snapshot.storage, key);
  snapshot.images.push({ device, key, layer, image, exported: new ImageExport(image, snapshot, device, key, tracking), connections: 0 });
}

