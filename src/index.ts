/** The bdsnap library surface. */

export { BdsnapError, type ErrorCode } from './errors.js';
export type { BlockDevice, BlockSizes, Extent, WriteOptions, ZeroOptions } from './device/block-device.js';
export { EXTENT_HOLE, EXTENT_ZERO } from './device/block-device.js';
export { FileDevice, type FileDeviceOptions, type DeviceIdentity } from './device/file-device.js';
