/**
 * `bdsnap mount` / `bdsnap umount` inside the daemon: the mounts this daemon made, each one
 * user hold on its device (so one mount of an active device is one session), recorded in
 * `<run-dir>/mounts.json` so a successor can clean up after a crash.
 *
 * A snapshot image (`<device>@<id>`) mounts the same way, through its export; it holds no
 * session of its own (its writes stay in the snapshot). One image is mounted once: two kernel
 * mounts of one filesystem would corrupt it, as for a device.
 */

import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { BdsnapError, toBdsnapError } from '../errors.js';
import { writeFileAtomic } from '../host/atomic-file.js';
import { checkNotInUse } from '../host/in-use.js';
import { ensurePrivateDir, whyOthersCanRename } from '../host/private-dir.js';
import type { ImageMountStatus, InstantRestoreInfo, MountResult, UmountResult } from './control-protocol.js';
import { describeRestoreMount } from './device-holders.js';
import type { DeviceTable, MountInfo, SessionEnd } from './device-table.js';
import { isMountpoint } from '../host/mountinfo.js';
import { attachAndMount, flushFilesystem, toRecord, unmountAndDetach, type AttachedMount } from './mount.js';
import { canonicalDevicePath, type Registry } from './registry.js';
import { SnapshotManager, type ImageMount } from './snapshots/index.js';
import { parseAsOfName } from './as-of-exports.js';
import type { ExportHandle } from '../nbd/exports.js';

interface MountRecord {
  /** The export mounted: a device path, or `<device>@<id>` for a snapshot image. */
  exportName: string;
  /** The device whose user hold this mount takes; null for an image. */
  devicePath: string | null;
  attached: AttachedMount;
}

export interface MountManagerOptions {
  runDir: string;
  nbdSocket: string;
  table: DeviceTable;
  registry: Registry;
  snapshots: SnapshotManager;
  /** Exports mounted as images (no session of their own): snapshot images, as-of views, targets under instant restore. */
  images: {
    /** The instant restore that serves the target `name` names (by any name of it), if any: its target is its export name. */
    restoreOf(name: string): Promise<InstantRestoreInfo | undefined>;
    open(name: string): Promise<ExportHandle | undefined>;
  };
  log: Logger;
  /** How long umount waits for other NBD clients of the device to let go. */
  detachTimeoutMs: number;
}

export const MOUNTS_FILE = 'mounts.json';

/** A mount that was still busy at shutdown, left mounted. */
export interface LeftMount {
  mountpoint: string;
  exportName: string;
  /** The device whose session it holds; null for a snapshot image. */
  devicePath: string | null;
  /** Why its flush failed; null when what was written to it reached the daemon. */
  flushError: string | null;
}

/** One line for the operator: what was left behind, and what to do. */
export function describeLeftMounts(left: LeftMount[]): string {
  const each = left.map((m) => `${m.mountpoint} (${m.exportName}) is still in use and was left mounted; ${m.flushError === null
    ? 'its data was flushed to the device first'
    : `flushing it failed (${m.flushError}), so its latest writes may not have reached the device`}`);
  return `${each.join('; ')}. Its session is recovered at the next start: stop what uses it (fuser -vm MOUNTPOINT), then start the daemon again to take it down`;
}

export class MountManager {
  readonly #options: MountManagerOptions;
  readonly #mounts = new Map<string, MountRecord>();
  /**
   * Mount points being set up, with the export being mounted there and, once the mount holds
   * it, the device it holds.
   */
  readonly #starting = new Map<string, { exportName: string; devicePath: string | null }>();
  readonly #workDir: string;
  readonly #mountsFile: string;

  constructor(options: MountManagerOptions) {
    this.#options = options;
    this.#workDir = path.join(options.runDir, 'mounts');
    this.#mountsFile = path.join(options.runDir, MOUNTS_FILE);
  }

  /**
   * Where a device is mounted through this daemon, from the moment the mount holds it (the
   * loop device is null until the filesystem is mounted) until it lets go. The one record of a
   * device's mount: the device table asks here.
   */
  mountOf(devicePath: string): MountInfo | undefined {
    for (const [mountpoint, record] of this.#mounts) {
      if (record.devicePath === devicePath) return { mountpoint, loopDevice: record.attached.blockDevice };
    }
    for (const [mountpoint, starting] of this.#starting) {
      if (starting.devicePath === devicePath) return { mountpoint, loopDevice: null };
    }
    return undefined;
  }

  /** The mount point of a device whose filesystem this daemon has mounted. */
  mountpointOf(devicePath: string): string | undefined {
    const mount = this.mountOf(devicePath);
    return mount?.loopDevice ? mount.mountpoint : undefined;
  }

  /** The mount of a snapshot image by this daemon, set up or being set up. */
  imageMountOf(exportName: string): ImageMount | undefined {
    for (const [mountpoint, record] of this.#mounts) {
      if (record.exportName === exportName) return { mountpoint, loopDevice: record.attached.blockDevice, starting: false };
    }
    for (const [mountpoint, starting] of this.#starting) {
      if (starting.exportName === exportName) return { mountpoint, loopDevice: null, starting: true };
    }
    return undefined;
  }

  /** The snapshot images of `devicePath` this daemon has mounted. */
  imageMountsOf(devicePath: string): ImageMountStatus[] {
    const out: ImageMountStatus[] = [];
    for (const [mountpoint, record] of this.#mounts) {
      const image = record.devicePath === null ? SnapshotManager.parseImageName(record.exportName) : undefined;
      if (image?.device !== devicePath) continue;
      out.push({ snapshot: image.id, exportName: record.exportName, mountpoint, loopDevice: record.attached.blockDevice });
    }
    return out;
  }

  async mount(device: string, mountpointArg: string, type?: string, mountOptions?: string): Promise<MountResult> {
    // Before anything is registered or attached: a mount that cannot happen leaves no trace.
    const mountpoint = await checkedMountpoint(path.resolve(mountpointArg));
    if (this.#mounts.has(mountpoint) || this.#starting.has(mountpoint)) throw new BdsnapError('EBUSY', `bdsnap already mounts something on ${mountpoint}`);
    const named = SnapshotManager.isImageName(device) || parseAsOfName(device) !== undefined;
    // A target under restore is mounted under its restore's export name, whatever name it was given, so that status finds the mount.
    const restore = named ? undefined : await this.#options.images.restoreOf(device);
    const image = named || restore !== undefined;
    const exportName = restore?.target ?? device;
    if (image) {
      const already = this.imageMountOf(exportName);
      if (already) throw new BdsnapError('EBUSY', `${exportName} is already ${already.starting ? 'being mounted' : 'mounted'} at ${already.mountpoint}`);
    }
    const starting = { exportName, devicePath: null };
    this.#starting.set(mountpoint, starting);
    try {
      if (restore) return { ...await this.#mountImage(exportName, mountpoint, type, mountOptions), noSession: describeRestoreMount(restore, this.#options.registry.get(exportName)?.active === true) };
      if (image) return await this.#mountImage(exportName, mountpoint, type, mountOptions);
      return await this.#mountDevice(await canonicalDevicePath(device), mountpoint, starting, type, mountOptions);
    } finally {
      this.#starting.delete(mountpoint);
    }
  }

  async umount(mountpointArg: string): Promise<UmountResult> {
    const given = path.resolve(mountpointArg);
    // Mounted under its real path (see checkedMountpoint), which the name given may lead to.
    const mountpoint = this.#mounts.has(given) ? given : await fs.promises.realpath(given).catch(() => given);
    const record = this.#mounts.get(mountpoint);
    if (!record) throw new BdsnapError('ENOENT', `bdsnap has nothing mounted on ${mountpoint}`);
    const end = await this.#end(mountpoint, record);
    return { device: record.exportName, mountpoint, sessionDir: end.dir, ...(end.failedReason !== undefined ? { sessionFailed: end.failedReason } : {}) };
  }

  /**
   * Shutdown, while the NBD server still serves: unmount everything this daemon mounted. A
   * filesystem that will not unmount (a process has its cwd or a file in it) is flushed
   * (syncfs), so what was written to it reaches the device while the daemon can still take it,
   * then tried once more; one still busy after that is left mounted and returned, its record
   * kept in the run directory so the next start tears it down.
   */
  async closeAll(): Promise<LeftMount[]> {
    const { log } = this.#options;
    const left: LeftMount[] = [];
    for (const [mountpoint, record] of [...this.#mounts]) {
      let failure = await this.#end(mountpoint, record).then(() => undefined, (err: unknown) => toBdsnapError(err));
      if (failure === undefined || !(await isMountpoint(mountpoint).catch(() => true))) {
        if (failure) log.error({ event: 'shutdown-umount-failed', mountpoint, reason: failure.message }, 'could not finish the unmount at shutdown');
        continue;
      }
      const flush = await flushFilesystem(mountpoint).then(() => undefined, (err: unknown) => toBdsnapError(err));
      log.warn({ event: 'shutdown-mount-busy', mountpoint, export: record.exportName, flushed: flush === undefined, ...(flush ? { flushError: flush.message } : {}) },
        'a mount is busy at shutdown: flushed, trying the unmount once more');
      failure = await this.#end(mountpoint, record).then(() => undefined, (err: unknown) => toBdsnapError(err));
      if (failure === undefined || !(await isMountpoint(mountpoint).catch(() => true))) continue;
      const entry: LeftMount = { mountpoint, exportName: record.exportName, devicePath: record.devicePath, flushError: flush?.message ?? null };
      log.error({ event: 'shutdown-mount-left', ...entry, reason: failure.message }, 'a mount is still busy at shutdown and is left behind');
      left.push(entry);
    }
    return left;
  }

  async #mountDevice(devicePath: string, mountpoint: string, starting: { devicePath: string | null }, type?: string, mountOptions?: string): Promise<MountResult> {
    const { table, registry, log } = this.#options;
    // A filesystem mounted twice, once here and once outside bdsnap (a loop mount of the image,
    // a mount of the node), is written by two kernels' caches and corrupted. A device this
    // daemon already has open is held O_EXCL by it, so the exclusive probe would only find us.
    await checkNotInUse(devicePath, {}, { exclusiveProbe: !table.isAttached(devicePath) });
    await registry.register(devicePath);
    const att = await table.attach(devicePath, { exclusive: true, mountTime: new Date(), holder: 'mount' });
    starting.devicePath = devicePath;
    let attached: AttachedMount;
    try {
      attached = await this.#attach(devicePath, mountpoint, type, mountOptions);
    } catch (err) {
      starting.devicePath = null;
      await table.detach(devicePath, 'mount');
      await att.ended?.catch(() => undefined);
      throw err;
    }
    await this.#record(mountpoint, { exportName: devicePath, devicePath, attached });
    const inSession = att.inSession;
    log.info({ event: 'mount', device: devicePath, mountpoint, blockDevice: attached.blockDevice, via: attached.via, session: inSession }, 'device mounted');
    return { device: devicePath, mountpoint, loopDevice: attached.blockDevice, inSession };
  }

  async #mountImage(name: string, mountpoint: string, type?: string, mountOptions?: string): Promise<MountResult> {
    const asOf = parseAsOfName(name) !== undefined;
    const handle = await this.#options.images.open(name);
    if (!handle) {
      throw new BdsnapError('ENOENT', asOf ? `no registered device for ${name} (see bdsnap status)` : `no snapshot image ${name} (see bdsnap snapshot list)`);
    }
    let attached: AttachedMount;
    let xfs = type === 'xfs';
    try {
      const magic = Buffer.alloc(4);
      xfs ||= handle.device.size >= magic.length && await handle.device.read(magic, 0).then(() => magic.toString('latin1') === 'XFSB', () => false);
      // Held until the mount has its own connection: an as-of view is built (and checked) once.
      attached = await this.#attach(name, mountpoint, type, mountOptions, handle.device.readOnly);
    } catch (err) {
      // The kernel refuses a second XFS with the UUID of one mounted, and mount(8) only says "wrong fs type".
      const nouuid = (mountOptions ?? '').split(',').includes('nouuid');
      if (!xfs || nouuid) throw err;
      const e = toBdsnapError(err);
      throw new BdsnapError(e.code, `${e.message}; an XFS image has its original's UUID: while the original is mounted, add -o nouuid`, { cause: err });
    } finally {
      await handle.release();
    }
    await this.#record(mountpoint, { exportName: name, devicePath: null, attached });
    this.#options.log.info({ event: 'mount', image: name, mountpoint, blockDevice: attached.blockDevice, via: attached.via, readOnly: handle.device.readOnly },
      asOf ? 'device mounted read-only as at an earlier session start' : 'image mounted');
    return { device: name, mountpoint, loopDevice: attached.blockDevice, inSession: false };
  }

  async #attach(exportName: string, mountpoint: string, type?: string, mountOptions?: string, readOnly = false): Promise<AttachedMount> {
    try {
      await ensurePrivateDir(this.#workDir, 0o700);
      return await attachAndMount({
        nbdSocket: this.#options.nbdSocket, exportName, mountpoint, workDir: this.#workDir, readOnly,
        ...(type !== undefined ? { type } : {}), ...(mountOptions !== undefined ? { options: mountOptions } : {}),
      });
    } catch (err) {
      const e = toBdsnapError(err);
      this.#options.log.error({ event: 'mount-failed', export: exportName, mountpoint, code: e.code, reason: e.message }, 'mount failed');
      throw e;
    }
  }

  /** Unmount, detach, drop the mount's hold, and wait until the session is closed and durable. */
  async #end(mountpoint: string, record: MountRecord): Promise<SessionEnd> {
    const { table, log } = this.#options;
    const ended = record.devicePath !== null ? table.phaseEnded(record.devicePath) : undefined;
    try {
      await unmountAndDetach(record.attached);
    } catch (err) {
      const e = toBdsnapError(err);
      log.error({ event: 'umount-failed', export: record.exportName, mountpoint, code: e.code, reason: e.message }, 'unmount failed');
      throw e;
    }
    this.#mounts.delete(mountpoint);
    await this.#save('unmount');
    if (record.devicePath === null) {
      log.info({ event: 'umount', image: record.exportName, mountpoint }, 'snapshot image unmounted');
      return { dir: null };
    }
    await table.detach(record.devicePath, 'mount');
    if (!ended) return { dir: null };
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_resolve, reject) => {
      timer = setTimeout(() => reject(new BdsnapError('EBUSY',
        `${mountpoint} is unmounted, but other NBD clients still hold ${record.devicePath}; its session ends when they disconnect`)), this.#options.detachTimeoutMs);
    });
    try {
      const end = await Promise.race([ended, timeout]);
      log.info({ event: 'umount', device: record.devicePath, mountpoint, sessionDir: end.dir, ...(end.failedReason !== undefined ? { sessionFailed: end.failedReason } : {}) }, 'device unmounted');
      return end;
    } finally {
      clearTimeout(timer);
    }
  }

  async #record(mountpoint: string, record: MountRecord): Promise<void> {
    this.#mounts.set(mountpoint, record);
    await this.#save('mount');
  }

  async #save(what: 'mount' | 'unmount'): Promise<void> {
    const records = [...this.#mounts.values()].map((m) => toRecord(m.exportName, m.attached));
    await writeFileAtomic(this.#mountsFile, `${JSON.stringify(records)}\n`, 0o600).catch((err: unknown) => {
      this.#options.log.error({ event: 'mounts-file-write-failed', reason: (err as Error).message }, `cannot record the ${what} in the run directory`);
    });
  }
}

/**
 * The real path of the mount point `given`, an existing directory that no other user can swap
 * for another (a link to /etc, say) between this check and the mount, or during the mount,
 * when the unmount goes by the same name: mount(8) and umount(8) follow links at their own
 * time, so a name another user can change would let that user choose where the filesystem
 * goes. Errors: ENOENT, EINVAL (not a directory), EPERM.
 */
async function checkedMountpoint(given: string): Promise<string> {
  const mountpoint = await fs.promises.realpath(given).catch(() => undefined);
  const st = mountpoint === undefined ? undefined : await fs.promises.stat(mountpoint).catch(() => undefined);
  if (mountpoint === undefined || !st) throw new BdsnapError('ENOENT', `the mount point ${given} does not exist; create it first`);
  if (!st.isDirectory()) throw new BdsnapError('EINVAL', `the mount point ${given} is not a directory`);
  const why = await whyOthersCanRedirect(given, mountpoint);
  if (why !== undefined) {
    throw new BdsnapError('EPERM', `refusing to mount on ${given}: another user could put a link to any directory in its place before the mount or the unmount (${why}); use a mount point that only root can change, such as a directory under /mnt`);
  }
  return mountpoint;
}

/**
 * Why another user could make `given` (whose real path is `real`) lead somewhere else, or
 * undefined: each name on the way, links included, is judged in the real directory that holds
 * it (whyOthersCanRename), and a link must be root's or this user's.
 */
async function whyOthersCanRedirect(given: string, real: string): Promise<string | undefined> {
  const euid = process.geteuid?.() ?? 0;
  const parts = given.split(path.sep).filter((p) => p !== '');
  for (let i = 1; i <= parts.length; i++) {
    const name = path.join(path.sep, ...parts.slice(0, i));
    const where = path.join(await fs.promises.realpath(path.dirname(name)), path.basename(name));
    const why = await whyOthersCanRename(where);
    if (why !== undefined) return why;
    const st = await fs.promises.lstat(where);
    if (st.isSymbolicLink() && st.uid !== 0 && st.uid !== euid) return `${where} is a link of uid ${st.uid}`;
  }
  return whyOthersCanRename(real);
}
