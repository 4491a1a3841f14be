/**
 * Change-block tracking: the live map of a device (live-map.ts), the views frozen at snapshots
 * (frozen-map.ts), the layer that marks the map before a write (tracking-device.ts), and what
 * they share: range maths (ranges.ts), the file format (file-format.ts), the checks that decide
 * whether a map file is kept at open (trust.ts) and group commit (group-sync.ts).
 */

export { ChangeMap, type ChangeMapOptions, type ChangeMapInfo, type Durability } from './live-map.js';
export { FrozenChangeMap } from './frozen-map.js';
export { TrackingDevice } from './tracking-device.js';
export { dirtyBitmapContextName, trackingBlockSize, DIRTY_BITMAP_CHANGED, type ByteRange } from './ranges.js';
export type { ChangeMapReset, ChangeMapResetReason } from './trust.js';
export type { DeviceStamp } from '../../host/device-stamp.js';
