/**
 * The snapshot engine: copy-before-write sessions over any BlockDevice, their on-disk store,
 * crash recovery, point-in-time views and offline restore.
 */

export { CowDevice, type SessionOptions, type SessionSummary, type SessionEvent, type CowState } from './cow-device.js';
export { restore, checkNotInUse, type HostPaths, type RestoreOptions, type RestoreSummary } from './restore/index.js';
export { listSessions, recoverSession, readSessionInfo, type SessionInfo } from './sessions.js';
export { sessionDirName, DEFAULT_CHUNK_SIZE, DEFAULT_SNAPSHOT_ROOT, type SessionState } from './format.js';
