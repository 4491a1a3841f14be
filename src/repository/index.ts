/** The backup repository as data: object stores, the format, pieces, locks. No daemon, no CLI. */

export { LocalDirStore, checkObjectName, type ObjectStore, type ObjectInfo } from './object-store.js';
export type { S3Location, S3StoreOptions } from './s3-store.js';
export { openRepoStore, parseRepoLocation, type RepoLocation } from './location.js';
export { Repository, openLocalRepository, type InitOptions, type PruneSummary, type BackupRecord } from './repository.js';
export { CODEC_CHOICES, type CodecChoice } from './codec.js';
export type { Manifest, DeviceEntry, RepoConfig } from './format.js';
export { BackupDevice, openBackupDevices, type PieceLoader } from './backup-device.js';
