/** The backup repository as data: object stores, the format, packs and their index, encryption and keys, pieces, locks. No daemon, no CLI. */

export { LocalDirStore, checkObjectName, type ObjectStore, type ObjectInfo } from './object-store.js';
export type { S3Location, S3StoreOptions } from './s3-store.js';
export { openRepoStore, parseRepoLocation, type RepoLocation } from './location.js';
export { Repository, openLocalRepository, REPACK_BELOW_USED, type InitOptions, type OpenOptions, type PruneSummary, type BackupRecord, type KeyInfo } from './repository.js';
export { SCRYPT_DEFAULTS, type ScryptParams } from './crypto.js';
export { CODEC_CHOICES, type CodecChoice } from './codec.js';
export type { Manifest, DeviceEntry, RepoConfig } from './format.js';
export { BackupDevice, openBackupDevices, type PieceLoader } from './backup-device.js';
