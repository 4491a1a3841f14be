/**
 * Snapshots of live devices: the manager (manager.ts), putting them back after a restart
 * (reopen.ts), a take and its barrier (take.ts), image exports (image-export.ts), records
 * (record.ts), the owner of a snapshot taken for a process (owner.ts), and the contract with
 * the change tracker (tracking.ts).
 */

export { SnapshotManager, type ImageMount, type SnapshotManagerOptions } from './manager.js';
export type { CreateSnapshotOptions } from './take.js';
export type { SnapshotRecord } from './record.js';
export { ownerOf, type SnapshotOwner } from './owner.js';
export type { SnapshotChangeTracking } from './tracking.js';
