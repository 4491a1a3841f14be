/**
 * Snapshots of live devices on demand: the registry of snapshots the daemon serves, their
 * take (take.ts), their images' exports (image-export.ts), their records (record.ts), and
 * putting them back after a restart.
 *
 * Images are exports named `<device path>@<id>`. They are writable; writes go to the
 * snapshot's storage only. When the storage overflows or fails, the snapshot is marked so
 * (persisted), its images answer EIO, and device I/O goes on untouched.
 *
 * A snapshot survives daemon restarts and SIGKILL: its record and storage are on disk, the
 * storage is rescanned at start and the points are put back before the NBD server accepts
 * a client (reopen.ts, which also holds back a snapshot whose device another process still
 * holds).
 *
 * Destroy cuts the images off: a filesystem mounted on one gets EIO and goes read-only. So
 * destroy refuses while an image is mounted by bdsnap or has NBD clients, and `force` first
 * unmounts (cleanly, through the mount manager), then cuts off whatever clients remain. While
 * destroy decides, the images take no new client, so none slips in between check and teardown.
 *
 * A snapshot taken for a process (`backup create`, owner.ts) is destroyed, with force, once
 * that process is gone: the daemon says when its control connection closes (ownerGone), and
 * after a restart the owners of the snapshots put back are checked every OWNER_CHECK_MS. A
 * killed owner has no NBD client left to cut off.
 */

import path from 'node:path';
import type { Logger } from 'pino';
import { BdsnapError } from '../../errors.js';
import { formatBytes } from '../../units.js';
import type { ExportHandle } from '../../nbd/exports.js';
import type { DiffStorageEvent } from '../../snapshot/diff-storage.js';
import { removePath } from '../../host/fd-io.js';
import type { SnapshotInfo } from '../control-protocol.js';
import type { DeviceTable } from '../device-table.js';
import type { EventLog } from '../events.js';
import { nbdUnixUri } from '../mount.js';
import type { Registry } from '../registry.js';
import type { LiveImage, LiveSnapshot } from './live.js';
import { OWNER_CHECK_MS, ownerState } from './owner.js';
import { imageExportName, parseImageName, SNAPSHOTS_DIR, writeRecord } from './record.js';
import { SnapshotRecovery } from './reopen.js';
import { checkStorageDir, takeSnapshot, type CreateSnapshotOptions } from './take.js';
import type { SnapshotChangeTracking } from './tracking.js';

/** A bdsnap mount of an image, as the mount manager reports it. */
export interface ImageMount {
  mountpoint: string;
  loopDevice: string | null;
  /** Still being set up: not yet mounted, not yet unmountable. */
  starting: boolean;
}

/**
 * How long destroy waits for image clients to let go before it counts them as attached: a
 * client that just disconnected (the nbdfuse of an unmount included) is released a moment
 * after it has gone.
 */
const IMAGE_RELEASE_WAIT_MS = 3000;

export interface SnapshotManagerOptions {
  stateDir: string;
  nbdSocket: string;
  table: DeviceTable;
  registry: Registry;
  events: EventLog;
  log: Logger;
  /** Where the daemon mounted each device (for freeze and the storage check). */
  mountpointOf: (devicePath: string) => string | undefined;
  /** The bdsnap mount of an image export, if any (shown by info; destroy refuses or unmounts it). */
  imageMountOf: (exportName: string) => ImageMount | undefined;
  /** `bdsnap umount`: destroy --force unmounts an image through it. */
  unmount: (mountpoint: string) => Promise<unknown>;
  tracking?: SnapshotChangeTracking;
}

export class SnapshotManager {
  readonly #root: string;
  readonly #options: SnapshotManagerOptions;
  readonly #snapshots = new Map<string, LiveSnapshot>();
  /** Serialises create/destroy/extend: one barrier at a time keeps the ordering simple. */
  #queue: Promise<unknown> = Promise.resolve();
  /** Devices found changed outside bdsnap while snapshots were being reopened. */
  readonly #pendingResets = new Map<string, string>();
  /** Called whenever an image handle is released (destroy waits on them). */
  readonly #onRelease = new Set<() => void>();
  readonly #recovery: SnapshotRecovery;
  /** Served snapshots whose owner is not tied to a connection of this daemon (put back at start). */
  readonly #watched = new Set<string>();
  #ownerTimer: NodeJS.Timeout | undefined;
  #closed = false;

  constructor(options: SnapshotManagerOptions) {
    this.#options = options;
    this.#root = path.join(options.stateDir, SNAPSHOTS_DIR);
    this.#recovery = new SnapshotRecovery({
      root: this.#root, table: options.table, registry: options.registry, events: options.events, log: options.log, tracking: options.tracking,
      serve: (snapshot) => {
        this.#snapshots.set(snapshot.record.id, snapshot);
        if (snapshot.record.owner !== undefined) this.#watchOwner(snapshot.record.id);
      },
      onStorageEvent: (snapshot, event) => this.#onStorageEvent(snapshot, event),
      markBroken: (snapshot, state, reason) => this.#markBroken(snapshot, state, reason),
      changedOutside: (devicePath) => this.#pendingResets.get(devicePath),
    });
  }

  /** Snapshot ids that hold `devicePath`. */
  snapshotsOf(devicePath: string): string[] {
    return [...this.#snapshots.values()].filter((s) => s.images.some((i) => i.device === devicePath)).map((s) => s.record.id);
  }

  exportNames(): string[] {
    return [...this.#snapshots.values()].flatMap((s) => s.images.map((i) => imageExportName(i.device, s.record.id)));
  }

  /** The export of an image name `<device>@<id>`, or undefined when it is not one. */
  openImage(name: string): ExportHandle | undefined {
    const at = name.lastIndexOf('@');
    if (at <= 0) return undefined;
    const snapshot = this.#snapshots.get(name.slice(at + 1));
    const image = snapshot?.images.find((i) => i.device === name.slice(0, at));
    if (!snapshot || !image || snapshot.destroying || snapshot.closing) return undefined;
    const contexts = this.#options.tracking?.contexts(image.device, snapshot.dir, image.key) ?? [];
    image.connections++;
    let released = false;
    return {
      name, device: image.exported, metaContexts: contexts,
      release: async () => {
        if (released) return;
        released = true;
        image.connections--;
        for (const wake of [...this.#onRelease]) wake();
      },
    };
  }

  /** Whether `name` names a snapshot image (existing or not): `<path>@<id>` with an id's shape. */
  static isImageName(name: string): boolean {
    return SnapshotManager.parseImageName(name) !== undefined;
  }

  /** The device and snapshot id of an image name `<path>@<id>`; undefined when it is not one. */
  static parseImageName(name: string): { device: string; id: string } | undefined {
    return parseImageName(name);
  }

  list(): SnapshotInfo[] {
    return [...this.#snapshots.values()].sort((a, b) => a.record.createdAt.localeCompare(b.record.createdAt)).map((s) => this.#info(s));
  }

  info(id: string): SnapshotInfo {
    return this.#info(this.#get(id));
  }

  /** What changed in the image of `device` since the point (generation, since); null: cannot tell. */
  changes(id: string, device: string, generation: string, since: number): Array<{ offsetBytes: number; lengthBytes: number }> | null {
    const snapshot = this.#get(id);
    const d = snapshot.record.devices.find((x) => x.path === path.resolve(device));
    if (!d) throw new BdsnapError('ENOENT', `snapshot ${id} has no image of ${device}`);
    // The image's frozen view answers, or says it cannot tell (another generation, a number not before it).
    return this.#options.tracking?.frozenChangedSince(snapshot.dir, d.key, generation, since) ?? null;
  }

  create(devices: string[], options: CreateSnapshotOptions): Promise<SnapshotInfo> {
    return this.#serial(() => this.#create(devices, options));
  }

  extend(id: string, options: { limitBytes?: number; storageDir?: string }): Promise<SnapshotInfo> {
    return this.#serial(async () => {
      const snapshot = this.#get(id);
      if (options.limitBytes === undefined && options.storageDir === undefined) {
        throw new BdsnapError('EINVAL', 'extend needs --limit SIZE or --storage DIR (or both)');
      }
      const currentLimit = snapshot.storage.usage().limitBytes;
      if (options.limitBytes !== undefined && currentLimit !== null && options.limitBytes < currentLimit) {
        // extend only grows: a lower cap would make a snapshot in use overflow sooner, unasked.
        throw new BdsnapError('EINVAL', `a limit of ${formatBytes(options.limitBytes)} is below snapshot ${id}'s current limit of ${formatBytes(currentLimit)}; extend only raises it`);
      }
      let dir: string | undefined;
      if (options.storageDir !== undefined) {
        dir = await checkStorageDir(options.storageDir, snapshot.images.map((i) => i.device), this.#options.mountpointOf);
        if (snapshot.record.storage.dirs.includes(dir)) throw new BdsnapError('EINVAL', `${dir} is already a storage directory of snapshot ${id}`);
      }
      await snapshot.storage.extend({
        ...(options.limitBytes !== undefined ? { limitBytes: options.limitBytes } : {}),
        ...(dir !== undefined ? { dir } : {}),
      });
      snapshot.record.storage = {
        dirs: dir !== undefined ? [...snapshot.record.storage.dirs, dir] : snapshot.record.storage.dirs,
        limitBytes: options.limitBytes ?? snapshot.record.storage.limitBytes,
      };
      await this.#save(snapshot);
      const usage = snapshot.storage.usage();
      this.#options.events.emit('snapshot-extended', { snapshot: id, details: { limitBytes: usage.limitBytes, usedBytes: usage.usedBytes, dirs: usage.dirs } });
      return this.#info(snapshot);
    });
  }

  /**
   * Remove a snapshot. Errors: ENOENT; EBUSY while an image is mounted by bdsnap or has NBD
   * clients, unless `force`, which unmounts the images first and then cuts off other clients.
   */
  destroy(id: string, options: { force?: boolean } = {}): Promise<{ id: string }> {
    return this.#serial(async () => {
      await this.#destroy(this.#get(id), options.force ?? false);
      return { id };
    });
  }

  /**
   * The owner of snapshot `id` is gone (`why` says how): destroy the snapshot, cutting off
   * any image client. Nothing when it has no owner, is gone already, or the daemon is
   * stopping (the next start checks the owner). Never rejects: a failure is logged.
   */
  ownerGone(id: string, why: string): Promise<void> {
    return this.#serial(async () => {
      const snapshot = this.#snapshots.get(id);
      if (this.#closed || snapshot === undefined || snapshot.destroying || snapshot.record.owner === undefined) return;
      const reason = `owner process ${snapshot.record.owner.pid} ${why}`;
      this.#options.log.warn({ event: 'snapshot-owner-gone', snapshot: id, owner: snapshot.record.owner.pid, reason }, 'the process a snapshot was taken for is gone; destroying the snapshot');
      await this.#destroy(snapshot, true, reason);
    }).catch((err: unknown) => {
      this.#options.log.error({ event: 'snapshot-destroy-failed', snapshot: id, reason: (err as Error).message }, 'cannot destroy a snapshot whose owner is gone');
    });
  }

  /**
   * A device's change map was reset. When the reason is that something wrote the device around
   * bdsnap (while bdsnap did not serve it, or while it did: another process writing the file),
   * the snapshots that hold it no longer describe it: mark them failed.
   */
  deviceReset(devicePath: string, reason: string, detail: string): void {
    if (reason !== 'changed-outside' && reason !== 'size-changed') return;
    for (const snapshot of this.#snapshots.values()) {
      if (!snapshot.record.devices.some((d) => d.path === devicePath)) continue;
      this.#markBroken(snapshot, 'failed', `${devicePath} was written around bdsnap (${detail})`);
    }
    this.#pendingResets.set(devicePath, detail);
  }

  /** Daemon start: put back every snapshot on disk; remove what a killed create left. */
  recover(): Promise<void> {
    return this.#recovery.recover();
  }

  /**
   * Before a user attaches `devicePath`: put back the held-back snapshots that cover it, or
   * refuse (EBUSY), so the device is never written past a snapshot that does not see it.
   */
  bringBack(devicePath: string): Promise<void> {
    return this.#recovery.bringBack(devicePath);
  }

  /** Daemon stop: close storages and drop holds; the snapshots stay on disk for the next start. */
  async closeAll(): Promise<void> {
    this.#closed = true;
    clearInterval(this.#ownerTimer);
    for (const snapshot of this.#snapshots.values()) {
      for (const image of snapshot.images) await image.layer.removePoint(image.image).catch(() => undefined);
      await snapshot.storage.close().catch(() => undefined);
      for (const image of snapshot.images) await this.#options.table.detach(image.device, 'snapshot').catch(() => undefined);
    }
    this.#snapshots.clear();
  }
  async #create(devices: string[], options: CreateSnapshotOptions): Promise<SnapshotInfo> {
    const { table, registry, tracking, log, mountpointOf } = this.#options;
    const snapshot = await takeSnapshot({
      root: this.#root, table, registry, tracking, log, mountpointOf,
      onStorageEvent: (s, event) => this.#onStorageEvent(s, event),
    }, devices, options);
    const { id, frozen, stallMs, storage } = snapshot.record;
    this.#snapshots.set(id, snapshot);
    // A writer around bdsnap found between the take and now voided no listed snapshot: this one.
    for (const [device, count] of snapshot.aroundAtTake ?? []) {
      if (table.writtenAroundCount(device) !== count) this.#markBroken(snapshot, 'failed', `${device} was written around bdsnap while the snapshot was being taken`);
    }
    const info = this.#info(snapshot);
    this.#options.events.emit('snapshot-created', {
      snapshot: id,
      details: { devices: snapshot.record.devices.map((d) => d.path), stallMs, frozen, storage },
    });
    return info;
  }


  async #destroy(snapshot: LiveSnapshot, force: boolean, reason?: string): Promise<void> {
    snapshot.closing = true;
    try {
      await this.#letGo(snapshot, force);
    } catch (err) {
      snapshot.closing = false;
      throw err;
    }
    await this.#teardown(snapshot);
    this.#options.events.emit('snapshot-destroyed', {
      snapshot: snapshot.record.id, details: { devices: snapshot.images.map((i) => i.device), ...(reason !== undefined ? { reason } : {}) },
    });
  }

  /** Look whether the owner of snapshot `id` has ended every OWNER_CHECK_MS, until it has or the snapshot is gone. */
  #watchOwner(id: string): void {
    this.#watched.add(id);
    if (this.#ownerTimer !== undefined) return;
    let checking = false;
    this.#ownerTimer = setInterval(() => {
      if (checking) return;
      checking = true;
      void this.#checkOwners().finally(() => (checking = false));
    }, OWNER_CHECK_MS);
    this.#ownerTimer.unref();
  }

  async #checkOwners(): Promise<void> {
    for (const id of [...this.#watched]) {
      const owner = this.#snapshots.get(id)?.record.owner;
      // 'unknown' is looked at again next time: an owner is never taken for gone unseen.
      if (owner !== undefined && await ownerState(owner) !== 'gone') continue;
      this.#watched.delete(id);
      if (owner !== undefined) await this.ownerGone(id, 'has ended');
    }
    if (this.#watched.size === 0) {
      clearInterval(this.#ownerTimer);
      this.#ownerTimer = undefined;
    }
  }

  /** Unmount (force) or refuse while the images are mounted or attached. */
  async #letGo(snapshot: LiveSnapshot, force: boolean): Promise<void> {
    const id = snapshot.record.id;
    for (const image of snapshot.images) {
      const exportName = imageExportName(image.device, id);
      const mount = this.#options.imageMountOf(exportName);
      if (mount === undefined) continue;
      if (mount.starting) throw new BdsnapError('EBUSY', `snapshot ${id}: ${exportName} is being mounted at ${mount.mountpoint}; try again once that is done`);
      if (!force) {
        throw new BdsnapError('EBUSY', `snapshot ${id}: ${exportName} is mounted at ${mount.mountpoint}; unmount it first (bdsnap umount ${mount.mountpoint}) or destroy with --force`);
      }
      this.#options.log.info({ event: 'snapshot-destroy-unmount', snapshot: id, image: exportName, mountpoint: mount.mountpoint }, 'destroy --force: unmounting the image first');
      await this.#options.unmount(mount.mountpoint);
    }
    const attached = await this.#released(snapshot, IMAGE_RELEASE_WAIT_MS);
    if (attached.length === 0) return;
    const which = attached.map((i) => `${i.device}@${id} (${i.connections} NBD connection${i.connections === 1 ? '' : 's'})`).join(', ');
    if (!force) throw new BdsnapError('EBUSY', `snapshot ${id} is attached: ${which}; disconnect the clients first or destroy with --force`);
    this.#options.log.warn({ event: 'snapshot-destroy-forced', snapshot: id, attached: which }, 'destroy --force: NBD clients of the images are cut off');
  }

  /** Wait until no image of `snapshot` has a client, or `timeoutMs`; the images still attached. */
  #released(snapshot: LiveSnapshot, timeoutMs: number): Promise<LiveImage[]> {
    const attached = (): LiveImage[] => snapshot.images.filter((i) => i.connections > 0);
    if (attached().length === 0) return Promise.resolve([]);
    return new Promise((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        this.#onRelease.delete(check);
        resolve(attached());
      };
      const check = (): void => {
        if (attached().length === 0) done();
      };
      const timer = setTimeout(done, timeoutMs);
      this.#onRelease.add(check);
    });
  }

  async #teardown(snapshot: LiveSnapshot): Promise<void> {
    snapshot.destroying = true;
    for (const image of snapshot.images) await image.layer.removePoint(image.image);
    await snapshot.storage.destroy();
    this.#options.tracking?.forget(snapshot.dir);
    for (const image of snapshot.images) await this.#options.table.detach(image.device, 'snapshot');
    // A record write started before the destroy (the snapshot marked failed) ends before the
    // directory goes, or the removal meets its temp file.
    await snapshot.recordWrite;
    await removePath(snapshot.dir, { recursive: true });
    this.#snapshots.delete(snapshot.record.id);
  }

  #onStorageEvent(snapshot: LiveSnapshot, event: DiffStorageEvent): void {
    const id = snapshot.record.id;
    if (event.type === 'low-space') {
      this.#options.events.emit('snapshot-low-space', {
        snapshot: id, details: { usedBytes: event.usedBytes, limitBytes: event.limitBytes, freeBytes: event.freeBytes, dir: event.dir },
      });
      return;
    }
    this.#markBroken(snapshot, event.type, event.reason);
  }

  #markBroken(snapshot: LiveSnapshot, state: 'overflowed' | 'failed', reason: string): void {
    if (snapshot.record.state === 'overflowed' || snapshot.record.state === 'failed') return;
    const wasCreating = snapshot.record.state === 'creating';
    snapshot.record.state = state;
    snapshot.record.reason = reason;
    // The storage stops taking originals at once: its images answer EIO from now on, so what
    // it kept after this would be wasted room and a copy on every first write. Its own event
    // comes back here and finds the snapshot marked already.
    snapshot.storage.fail(state, reason);
    this.#options.events.emit(state === 'overflowed' ? 'snapshot-overflowed' : 'snapshot-failed', {
      snapshot: snapshot.record.id, details: { reason, devices: snapshot.record.devices.map((d) => d.path) },
    });
    // Being destroyed: its directory is going, so its record is not written again.
    if (!wasCreating && !snapshot.destroying) {
      this.#save(snapshot).catch((err: unknown) => {
        this.#options.log.error({ event: 'snapshot-record-write-failed', snapshot: snapshot.record.id, reason: (err as Error).message }, 'cannot record the snapshot state');
      });
    }
  }

  #info(snapshot: LiveSnapshot): SnapshotInfo {
    const r = snapshot.record;
    const usage = snapshot.storage.usage();
    return {
      id: r.id, state: r.state, reason: r.reason, createdAt: r.createdAt, chunkSize: r.chunkSize,
      storage: { dirs: usage.dirs, limitBytes: usage.limitBytes, usedBytes: usage.usedBytes },
      images: r.devices.map((d) => {
        const exportName = imageExportName(d.path, r.id);
        const mount = this.#options.imageMountOf(exportName);
        return {
          device: d.path, exportName, uri: nbdUnixUri(this.#options.nbdSocket, exportName), sizeBytes: d.sizeBytes, cbt: d.cbt,
          mountpoint: mount?.mountpoint ?? null, loopDevice: mount?.loopDevice ?? null,
          connections: snapshot.images.find((i) => i.device === d.path)?.connections ?? 0,
        };
      }),
      frozen: r.frozen, stallMs: r.stallMs, owner: r.owner !== undefined ? { pid: r.owner.pid } : null,
    };
  }

  #get(id: string): LiveSnapshot {
    const snapshot = this.#snapshots.get(id);
    if (!snapshot || snapshot.destroying) throw new BdsnapError('ENOENT', `no snapshot ${id} (see bdsnap snapshot list)`);
    return snapshot;
  }

  async #save(snapshot: LiveSnapshot): Promise<void> {
    const write = (snapshot.recordWrite ?? Promise.resolve()).then(() => writeRecord(snapshot.dir, snapshot.record));
    snapshot.recordWrite = write.catch(() => undefined);
    await write;
  }

  #serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#queue.then(fn, fn);
    this.#queue = run.catch(() => undefined);
    return run;
  }
}

