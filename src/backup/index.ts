/** The backup agent: full and incremental backups, verify, restore and copy between repositories, over a repository (src/repository/). */

export * from '../repository/index.js';
export { createBackup, type BackupSource, type BackupSummary, type CreateOptions, type DeviceSummary, type ProgressSink } from './create.js';
export { verifyRepository, type VerifyOptions, type VerifySummary, type BadPiece } from './verify.js';
export { copyBackups, type CopyOptions, type CopySummary } from './copy.js';
export { restoreBackup, type RestoreOptions, type RestoreSummary } from './restore.js';
export {
  backupDevices,
  type AgentOptions, type ChangeMapPoint, type Snapshot, type SnapshotImage, type SnapshotProvider,
} from './agent.js';
export type { ByteRange } from './ranges.js';
export { daemonSnapshotProvider } from './daemon-provider.js';
