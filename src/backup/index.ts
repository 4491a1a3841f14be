/** The backup agent: full and incremental backups, verify, restore and copy between repositories, over a repository (src/repository/). */

export * from '../repository/index.js';
export { createBackup, hostOf, type BackupSource, type BackupSummary, type CreateOptions, type DeviceSummary, type ProgressSink } from './create.js';
export { verifyRepository, type VerifyOptions, type VerifySummary, type BadPiece, type UnreadPiece } from './verify.js';
export { PieceFaults, describeFaults, mendAdvice, whereOf, type PieceFault } from './piece-faults.js';
export { parseDataSubset, inDataSubset, type DataSubset } from './data-subset.js';
export { applyRetention, checkPolicy, type RetentionPolicy, type RetentionPlan } from './retention.js';
export { planForget, forgetPlanned, type ForgetPlan, type ForgetGroup, type ForgetOptions } from './forget.js';
export { copyBackups, type CopyOptions, type CopySummary } from './copy.js';
export { restoreBackup, type RestoreOptions, type RestoreSummary } from './restore.js';
export type { SizeBefore } from './restore-target.js';
export {
  backupDevices,
  type AgentOptions, type ChangeMapPoint, type Snapshot, type SnapshotImage, type SnapshotProvider,
} from './agent.js';
export type { ByteRange } from './ranges.js';
export { daemonSnapshotProvider, backupThroughDaemon } from './daemon-provider.js';
export { openBackupToServe, type ServedBackup } from './serve.js';
