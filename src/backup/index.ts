/** Backups: a repository of content-addressed pieces behind an object-storage interface. */

export { LocalDirStore, checkObjectName, type ObjectStore, type ObjectInfo } from './object-store.js';
export { Repository, openLocalRepository, type InitOptions, type PruneSummary, type BackupRecord } from './repository.js';
export { createBackup, type BackupSource, type BackupSummary, type CreateOptions, type DeviceSummary, type ProgressSink } from './create.js';
export { verifyRepository, type VerifyOptions, type VerifySummary, type BadPiece } from './verify.js';
export { restoreBackup, type RestoreOptions, type RestoreSummary } from './restore.js';
export {
  backupDevices,
  type AgentOptions, type ChangeMapPoint, type Snapshot, type SnapshotImage, type SnapshotProvider,
} from './agent.js';
export type { ByteRange } from './ranges.js';
export { CODEC_CHOICES, type CodecChoice } from './codec.js';
export type { Manifest, DeviceEntry, RepoConfig } from './format.js';
export { daemonSnapshotProvider } from './daemon-provider.js';
