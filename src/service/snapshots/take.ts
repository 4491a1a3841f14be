/**
 * Taking a snapshot, in this order (each step undone if a later one fails, so a failed create
 * leaves nothing behind):
 *   1. check the request (devices exist, no duplicates, storage is a directory that is not on
 *      one of the devices) and hold every device open (a snapshot hold, not a user);
 *   2. create the difference storage and write the snapshot's record with state 'creating',
 *      so a daemon killed from here on finds and removes the leftovers at its next start;
 *   3. freeze the filesystems the daemon mounted (unless --no-freeze): that flushes their
 *      dirty data through this daemon, so it must come before the barrier;
 *   4. the barrier: hold new modifying requests on every device and wait for those in
 *      flight, add a point on every device, move the change maps on (in memory), release. A
 *      write acknowledged before this step is in every image; a write that had not reached a
 *      device's layer is in no image. The held time is the stall writers see, and is reported;
 *   5. thaw (always); then (strict durability) flush the devices, save the change maps' frozen
 *      views, and record the snapshot as 'ok' (no device is synced and no file written while
 *      writes are held or a filesystem is frozen).
 */

import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { BdsnapError, toBdsnapError } from '../../errors.js';
import { removePath } from '../../host/fd-io.js';
import { ensurePrivateDir } from '../../host/private-dir.js';
import { DiffStorage, type DiffStorageEvent } from '../../snapshot/diff-storage.js';
import type { SnapshotLayer } from '../../snapshot/snapshot-layer.js';
import type { DeviceTable } from '../device-table.js';
import { withFrozen } from '../freeze.js';
import { canonicalDevicePath, type Registry } from '../registry.js';
import { addImage, type LiveSnapshot } from './live.js';
import { newSnapshotId, RECORD_VERSION, writeRecord } from './record.js';
import type { SnapshotOwner } from './owner.js';
import type { SnapshotChangeTracking } from './tracking.js';

export interface CreateSnapshotOptions {
  storageDir?: string;
  limitBytes?: number;
  freeze?: boolean;
  /** The process the snapshot is taken for: it is destroyed once that process is gone (owner.ts). */
  owner?: SnapshotOwner;
}

/** What a take needs of the daemon. */
export interface TakeContext {
  /** The snapshots' folder: each snapshot gets a directory named by its id. */
  root: string;
  table: DeviceTable;
  registry: Registry;
  tracking: SnapshotChangeTracking | undefined;
  log: Logger;
  /** Where the daemon mounted each device (for freeze and the storage check). */
  mountpointOf: (devicePath: string) => string | undefined;
  /** The storage's events (low space, overflow, failure) for this snapshot. */
  onStorageEvent: (snapshot: LiveSnapshot, event: DiffStorageEvent) => void;
}

/** Take a snapshot of `devicesArg` at one point in time (steps 1 to 5). Errors: as BdsnapError, nothing kept. */
export async function takeSnapshot(ctx: TakeContext, devicesArg: string[], options: CreateSnapshotOptions): Promise<LiveSnapshot> {
  const { table, registry, log } = ctx;
  const devices = await checkDevices(devicesArg);
  const id = newSnapshotId();
  const dir = path.join(ctx.root, id);
  const storageDir = options.storageDir !== undefined ? await checkStorageDir(options.storageDir, devices, ctx.mountpointOf) : dir;
  const freeze = options.freeze ?? true;
  const mountpoints = freeze ? devices.flatMap((d) => ctx.mountpointOf(d) ?? []) : [];

  await ensurePrivateDir(dir, 0o700);
  const held: string[] = [];
  let storage: DiffStorage | undefined;
  const snapshot: LiveSnapshot = {
    record: {
      version: RECORD_VERSION, id, state: 'creating', reason: null, createdAt: new Date().toISOString(),
      chunkSize: table.chunkSize, durability: table.durability,
      storage: { dirs: [storageDir], limitBytes: options.limitBytes ?? null },
      devices: [], frozen: mountpoints, stallMs: 0,
      ...(options.owner !== undefined ? { owner: options.owner } : {}),
    },
    dir, storage: undefined as unknown as DiffStorage, images: [], destroying: false, closing: false,
  };
  try {
    for (const devicePath of devices) {
      await registry.register(devicePath);
      const { sizeBytes } = await table.attach(devicePath, { holder: 'snapshot' });
      held.push(devicePath);
      const identity = registry.get(devicePath)?.identity;
      snapshot.record.devices.push({ path: devicePath, key: held.length - 1, sizeBytes, cbt: null, ...(identity ? { identity } : {}) });
    }
    storage = await DiffStorage.create({
      id, dirs: [storageDir], chunkSize: table.chunkSize, durability: table.durability,
      ...(options.limitBytes !== undefined ? { limitBytes: options.limitBytes } : {}),
      onEvent: (event) => ctx.onStorageEvent(snapshot, event),
    });
    snapshot.storage = storage;
    await writeRecord(dir, snapshot.record);
    const layers = await withFrozen(mountpoints, () => barrier(ctx, snapshot));
    await settle(ctx, snapshot, layers);
    snapshot.record.state = 'ok';
    await writeRecord(dir, snapshot.record);
  } catch (err) {
    const e = toBdsnapError(err);
    log.error({ event: 'snapshot-create-failed', snapshot: id, devices, code: e.code, reason: e.message }, 'snapshot create failed; nothing kept');
    for (const image of snapshot.images) await image.layer.removePoint(image.image).catch(() => undefined);
    ctx.tracking?.forget(dir);
    await storage?.destroy().catch(() => undefined);
    for (const devicePath of held) await table.detach(devicePath, 'snapshot').catch(() => undefined);
    await removePath(dir, { recursive: true });
    throw e;
  }
  return snapshot;
}

/** The canonical paths of the devices asked for; EINVAL for none or one named twice. */
async function checkDevices(devicesArg: string[]): Promise<string[]> {
  if (devicesArg.length === 0) throw new BdsnapError('EINVAL', 'snapshot create needs at least one device');
  const devices: string[] = [];
  for (const d of devicesArg) {
    const devicePath = await canonicalDevicePath(d);
    if (devices.includes(devicePath)) throw new BdsnapError('EINVAL', `${devicePath} is named twice`);
    devices.push(devicePath);
  }
  return devices;
}

/** Step 4 of the take: the point in time on every device at once. Returns the devices' layers. */
async function barrier(ctx: TakeContext, snapshot: LiveSnapshot): Promise<SnapshotLayer[]> {
  const layers = snapshot.record.devices.map((d) => ctx.table.snapshotLayer(d.path));
  const started = performance.now();
  const holding: SnapshotLayer[] = [];
  try {
    await Promise.all(layers.map(async (layer) => {
      await layer.hold();
      holding.push(layer);
    }));
    // A write by another process before this point is in no change map: the map starts again now.
    for (const d of snapshot.record.devices) await ctx.table.checkWrittenAround(d.path);
    snapshot.aroundAtTake = new Map(snapshot.record.devices.map((d) => [d.path, ctx.table.writtenAroundCount(d.path)]));
    for (const [i, d] of snapshot.record.devices.entries()) addImage(snapshot, layers[i]!, d.path, d.key, ctx.tracking);
    for (const d of snapshot.record.devices) {
      d.cbt = ctx.tracking?.take(d.path, snapshot.dir, d.key) ?? null;
    }
  } finally {
    for (const layer of holding) layer.release();
    snapshot.record.stallMs = Math.round((performance.now() - started) * 1000) / 1000;
  }
  return layers;
}

/**
 * After the barrier and the thaw, before the snapshot is recorded 'ok': make it safe to build
 * on. Nothing here holds a writer or keeps a filesystem frozen.
 */
async function settle(ctx: TakeContext, snapshot: LiveSnapshot, layers: SnapshotLayer[]): Promise<void> {
  // The point is the base of the next incremental backup: a write before it that a power loss
  // could still undo would leave the device differing from that backup in a block a change
  // map that survives the power loss ('strict') counts as unchanged since. So with durable
  // maps every device is flushed before the snapshot is saved and recorded 'ok', which a
  // backup waits for; a power loss before that finds the snapshot 'creating' and removes it,
  // so no backup is based on a point whose writes were not durable. The flush comes after the
  // release and the thaw, not under the barrier, where it held writers 30-90 ms under random
  // writes; the writes it also makes durable from after the point are in the next period,
  // which is safe.
  // Other maps are reset after a power loss and need no flush.
  if (ctx.tracking?.durable === true) await Promise.all(layers.map((layer) => layer.flush()));
  for (const d of snapshot.record.devices) await ctx.tracking?.persist(snapshot.dir, d.key);
}

/** The resolved storage directory: it must exist, be a directory, and not be on one of `devices`. */
export async function checkStorageDir(dirArg: string, devices: string[], mountpointOf: (devicePath: string) => string | undefined): Promise<string> {
  const dir = path.resolve(dirArg);
  let st: fs.Stats;
  try {
    st = await fs.promises.stat(dir);
  } catch {
    throw new BdsnapError('ENOENT', `storage directory ${dir} does not exist; create it first`);
  }
  if (!st.isDirectory()) throw new BdsnapError('EINVAL', `storage ${dir} is not a directory`);
  for (const devicePath of devices) {
    const mountpoint = mountpointOf(devicePath);
    const mst = mountpoint !== undefined ? await fs.promises.stat(mountpoint).catch(() => undefined) : undefined;
    const dst = await fs.promises.stat(devicePath).catch(() => undefined);
    const onMount = mst !== undefined && mst.dev === st.dev;
    const onNode = dst !== undefined && dst.isBlockDevice() && dst.rdev === st.dev;
    if (onMount || onNode) {
      throw new BdsnapError('EINVAL', `storage directory ${dir} is on ${devicePath} itself; put the difference storage on another filesystem`);
    }
  }
  return dir;
}
