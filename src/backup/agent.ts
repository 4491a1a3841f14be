/**
 * The backup agent: take one snapshot of every named device, back up each image (full, or the
 * ranges the change map reports since the device's last backup in this repository), and
 * destroy the snapshot whatever happens, failure and interruption included.
 *
 * Snapshots come from a SnapshotProvider. The daemon's client will provide one
 * (daemonSnapshotProvider); tests provide one over a real `bdsnap serve`.
 */

import path from 'node:path';
import { EXTENT_ZERO, type BlockDevice } from '../device/block-device.js';
import { BdsnapError } from '../errors.js';
import { createBackup, hostOf, type BackupSource, type BackupSummary, type CreateOptions } from './create.js';
import type { ByteRange } from './ranges.js';
import type { Repository } from '../repository/repository.js';

/** A change map's position: its generation, and the period number the snapshot closed. */
export interface ChangeMapPoint {
  generation: string;
  number: number;
}

/** What a backup reads an image with: its bytes, its zero extents, and close. */
export type ImageReader = Pick<BlockDevice, 'read' | 'extents'> & { close(): Promise<void> };

export interface SnapshotImage {
  device: string;
  sizeBytes: number;
  /** A reader of the image at the snapshot's point in time (an NBD client of `<device>@<id>`). */
  open(): Promise<ImageReader>;
  /** Where the device's change map stood at the snapshot; null if it has none. */
  changeMap: ChangeMapPoint | null;
  /**
   * The ranges changed between the point (generation, number) of an earlier snapshot and this
   * one; null when the map cannot tell (another generation, history dropped): then a full
   * backup is made.
   */
  changedSince(generation: string, number: number): Promise<ByteRange[] | null>;
}

export interface Snapshot {
  id: string;
  images: SnapshotImage[];
  /** Throws when the snapshot no longer holds its point (a device written around it since). */
  check?: () => Promise<void>;
}

export interface SnapshotProvider {
  /** One consistent snapshot of all `devices` (absolute paths). */
  take(devices: string[]): Promise<Snapshot>;
  destroy(id: string): Promise<void>;
}

export interface AgentOptions extends CreateOptions {
  /** Read every device whole, whatever the change map says. */
  full?: boolean;
  /** Told which kind of backup each device gets, and why, before reading starts. */
  onPlan?: (plans: Array<{ device: string; kind: 'full' | 'incremental'; why: string }>) => void;
}

const META_CHANGE_MAP = 'changeMap';
const META_SNAPSHOT = 'snapshot';

export async function backupDevices(repo: Repository, provider: SnapshotProvider, devices: string[], options: AgentOptions = {}): Promise<BackupSummary> {
  const paths = devices.map((d) => path.resolve(d));
  options = { ...options, host: hostOf(options) };
  const snapshot = await provider.take(paths);
  const opened: Array<{ close(): Promise<void> }> = [];
  let outcome: { ok: true; summary: BackupSummary } | { ok: false; err: unknown };
  try {
    const sources: BackupSource[] = [];
    for (const image of snapshot.images) {
      const reader = await image.open();
      opened.push(reader);
      sources.push(await sourceFor(repo, snapshot.id, image, reader, options.full ?? false, options.host!));
    }
    options.onPlan?.(sources.map((s) => ({ device: s.device, kind: s.changed === null ? 'full' : 'incremental', why: s.why })));
    const beforeCommit = async (): Promise<void> => {
      await snapshot.check?.();
      await options.beforeCommit?.();
    };
    outcome = { ok: true, summary: await createBackup(repo, sources, { ...options, beforeCommit }) };
  } catch (err) {
    outcome = { ok: false, err };
  }
  await Promise.allSettled(opened.map((r) => r.close()));
  try {
    await provider.destroy(snapshot.id);
  } catch (err) {
    // A failure to clean up must not hide the backup's own failure, nor pass unnoticed.
    if (outcome.ok) {
      throw new BdsnapError('EIO', `backup ${outcome.summary.id} is done, but snapshot ${snapshot.id} could not be destroyed: ${(err as Error).message}`, { cause: err });
    }
  }
  if (!outcome.ok) throw outcome.err;
  return outcome.summary;
}

/** Full or incremental, and why; the extents the image reports as zeroes are not read. */
async function sourceFor(repo: Repository, snapshotId: string, image: SnapshotImage, reader: ImageReader, full: boolean, host: string): Promise<BackupSource> {
  const meta: Record<string, unknown> = { [META_SNAPSHOT]: snapshotId, [META_CHANGE_MAP]: image.changeMap };
  const base = {
    device: image.device, sizeBytes: image.sizeBytes, read: (t: Buffer, o: number) => reader.read(t, o), meta,
    zeroRanges: await zeroExtents(reader, image.sizeBytes),
  };
  if (full) return { ...base, changed: null, why: '--full' };
  const last = await repo.lastBackupOf(image.device, host);
  if (!last) return { ...base, changed: null, why: 'first backup of this device' };
  const entry = last.devices.find((d) => d.device === image.device)!;
  const then = entry.meta[META_CHANGE_MAP] as ChangeMapPoint | null | undefined;
  if (entry.sizeBytes !== image.sizeBytes) return { ...base, changed: null, why: `the device changed size since ${last.id}` };
  if (!image.changeMap || !then) return { ...base, changed: null, why: 'no change map for this device' };
  if (then.generation !== image.changeMap.generation) {
    return { ...base, changed: null, why: `change map reset since ${last.id} (generation ${then.generation} -> ${image.changeMap.generation})` };
  }
  const changed = await image.changedSince(then.generation, then.number);
  if (changed === null) return { ...base, changed: null, why: `change map cannot tell what changed since ${last.id}` };
  return { ...base, changed, base: last.id, why: `changed blocks since ${last.id}` };
}

/** Ranges the image reports as reading zeroes (base:allocation), walked in 1 GiB requests. */
async function zeroExtents(reader: Pick<BlockDevice, 'extents'>, sizeBytes: number): Promise<ByteRange[]> {
  const out: ByteRange[] = [];
  const step = 1 << 30;
  let at = 0;
  while (at < sizeBytes) {
    const extents = await reader.extents(at, Math.min(step, sizeBytes - at));
    if (extents.length === 0) break;
    for (const e of extents) {
      if (e.length <= 0) return out;
      if (e.flags & EXTENT_ZERO) out.push({ offsetBytes: at, lengthBytes: Math.min(e.length, sizeBytes - at) });
      at += e.length;
      if (at >= sizeBytes) break;
    }
  }
  return out;
}
