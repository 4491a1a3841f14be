/**
 * The snapshot engine: one copy-before-write layer (CowLayer) whose points in time are a
 * mount's session (CowDevice: its on-disk store, crash recovery, point-in-time view and
 * offline restore) and snapshots of live devices (SnapshotLayer's images, each with a
 * difference storage).
 */

export { CowDevice, type SessionOptions, type SessionSummary, type SessionEvent, type CowState } from './cow-device.js';
export { restore, checkNotInUse, type HostPaths, type RestoreOptions, type RestoreSummary } from './restore/index.js';
export { listSessions, recoverSession, readSessionInfo, type SessionInfo } from './sessions.js';
export { forgetSessions, planForget, type ForgetPlan, type ForgetPolicy } from './forget.js';
export { sessionDirName, DEFAULT_CHUNK_SIZE, DEFAULT_SNAPSHOT_ROOT, type SessionState } from './format.js';
export {
  DiffStorage, LOW_SPACE_LIMIT_FRACTION, LOW_SPACE_FS_FREE_FRACTION, LOW_SPACE_FS_FREE_BYTES,
  type DiffStorageOptions, type DiffStorageState, type DiffStorageEvent,
} from './diff-storage.js';
export { CowLayer, type CowPoint, type CowSink, type CowCloner } from './cow-layer.js';
export { SnapshotLayer, SnapshotImage } from './snapshot-layer.js';
export {
  ChangeMap, FrozenChangeMap, TrackingDevice, dirtyBitmapContextName, trackingBlockSize, DIRTY_BITMAP_CHANGED,
  type ChangeMapOptions, type ChangeMapReset, type ChangeMapResetReason, type ChangeMapInfo, type DeviceStamp, type ByteRange,
} from './change-map/index.js';
