/**
 * The bdsnap library surface: devices and layers, the NBD server and client, the snapshot
 * engine (sessions, restore, point-in-time view, snapshots, change maps), the control-API
 * client, backups, and singlefilefs.
 */

export { BdsnapError, type ErrorCode } from './errors.js';
export type { BlockDevice, BlockSizes, DeviceIdentity, Extent, WriteOptions, ZeroOptions } from './device/block-device.js';
export { EXTENT_HOLE, EXTENT_ZERO } from './device/block-device.js';
export { FileDevice, type FileDeviceOptions } from './device/file-device.js';

export { NbdServer, NbdClient, StaticExports, type NbdServerOptions, type NbdClientOptions, type ExportHandle, type ExportProvider } from './nbd/index.js';

export {
  CowDevice, restore, listSessions, recoverSession, readSessionInfo, sessionDirName, checkNotInUse, type HostPaths,
  DEFAULT_CHUNK_SIZE, DEFAULT_SNAPSHOT_ROOT,
  type SessionOptions, type SessionSummary, type SessionEvent, type CowState, type RestoreOptions, type RestoreSummary, type SessionInfo, type SessionState,
} from './snapshot/index.js';
export {
  DiffStorage, SnapshotLayer, SnapshotImage, ChangeMap, FrozenChangeMap, TrackingDevice, dirtyBitmapContextName,
  type DiffStorageOptions, type DiffStorageEvent, type ChangeMapOptions, type ChangeMapReset, type ChangeMapInfo, type ByteRange,
} from './snapshot/index.js';

export { BdsnapClient, withClient, type MountOptions } from './service/client.js';
export { resolveRunDir } from './service/paths.js';
export type { SnapshotInfo, SnapshotImageInfo, DaemonEvent, EventsResult, CbtInfo } from './service/control-protocol.js';

export { SingleFileFs, mkfs as sffsMkfs, mkfsImage as sffsMkfsImage } from './fs/singlefilefs/index.js';

export {
  LocalDirStore, Repository, openLocalRepository, createBackup, backupDevices, daemonSnapshotProvider, verifyRepository, restoreBackup,
  type ObjectStore, type BackupSource, type BackupSummary, type SnapshotProvider,
} from './backup/index.js';
