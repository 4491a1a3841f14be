/**
 * What the change tracker does for snapshots (service/change-tracking.ts implements it); absent
 * where tracking is off. Its own module so the tracker and the snapshot manager meet here
 * without importing each other.
 */

import type { MetaContextSource } from '../../nbd/exports.js';

export interface SnapshotChangeTracking {
  /**
   * The maps survive a power loss ('strict' durability). Only then must a take flush the
   * devices before it records the snapshot (take.ts): a 'process' map that was not closed
   * cleanly is reset after a reboot, so no write a power loss undid can hide behind it.
   */
  readonly durable: boolean;
  /**
   * Under the barrier: keep the device map's frozen view for this snapshot and move the device
   * to the next number. In memory only, so the barrier holds writes no longer than it must.
   */
  take(devicePath: string, dir: string, key: number): { generation: string; number: number } | null;
  /**
   * After the barrier: save the frozen view in `dir`. A daemon killed before this finds the
   * snapshot still 'creating' at its next start and removes it, so no saved snapshot lacks it.
   */
  persist(dir: string, key: number): Promise<void>;
  /** After a restart: the frozen view of an existing snapshot (null if it is gone). */
  load(devicePath: string, dir: string, key: number): Promise<void>;
  /** An image write: mark the device map and the snapshot's frozen view. */
  imageWrite(devicePath: string, dir: string, key: number, offsetBytes: number, lengthBytes: number): void | Promise<void>;
  /** Ranges changed in the frozen view since `since` of `generation`; null when it cannot tell. */
  frozenChangedSince(dir: string, key: number, generation: string, since: number): Array<{ offsetBytes: number; lengthBytes: number }> | null;
  /** The qemu:dirty-bitmap contexts an image offers. */
  contexts(devicePath: string, dir: string, key: number): MetaContextSource[];
  /** The snapshot is gone: forget its frozen views. */
  forget(dir: string): void;
}
