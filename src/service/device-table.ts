/**
 * The daemon's live view of registered devices: what the NBD server may serve, the session
 * lifecycle around each mount, and the stack of layers every open device runs through.
 *
 * - Only registered devices are served; any other export name is unknown to the server.
 * - An attachment is one open FileDevice and its stack, shared by every holder, so multi-conn
 *   clients see one device:
 *       FileDevice -> TrackingDevice (change map) -> SnapshotLayer (copy-before-write engine)
 *         -> CowDevice (session) | DirtyTracker
 *   The SnapshotLayer is there for the whole attachment; its points are the snapshots' images
 *   and, while there is one, the session, so a first write reads each original once for all
 *   of them. The top layer exists while users
 *   (NBD connections, a `bdsnap mount`) hold the device: that span is one *user phase*.
 * - Two kinds of holders. Users decide the session: the first one of a phase starts it (an
 *   active device gets a CowDevice, whose directory appears on the first modifying request;
 *   an inactive one a DirtyTracker); the last one ends it durably. Snapshots hold the device
 *   open for their points in time without a session and without counting as users, so a
 *   device in a snapshot can still be mounted exclusively and gets one session per mount.
 * - The file is closed (and its lock dropped, so an offline restore may run) only when no
 *   holder of either kind remains.
 * - Attach and release of one device run one at a time (a per-device queue), so a release
 *   closing a session never races an attach opening the next one.
 */

import type { Logger } from 'pino';
import type { BlockDevice } from '../device/block-device.js';
import { FileDevice } from '../device/file-device.js';
import { BdsnapError, toBdsnapError } from '../errors.js';
import type { ExportHandle } from '../nbd/exports.js';
import { CowDevice, type SessionSummary as CowSessionSummary } from '../snapshot/cow-device.js';
import { DEFAULT_CHUNK_SIZE, type Durability } from '../snapshot/format.js';
import { TrackingDevice } from '../snapshot/change-map/index.js';
import { SnapshotLayer } from '../snapshot/snapshot-layer.js';
import { refuseUnfinishedRestore } from '../snapshot/restore/chain.js';
import { refuseInterruptedBackupRestore } from '../device/interrupted-restore.js';
import type { ChangeTracker } from './change-tracking.js';
import type { DeviceStatus } from './control-protocol.js';
import { DirtyTracker } from '../device/dirty-tracker.js';
import type { EventLog } from './events.js';
import { KeyedQueue } from '../serial-queue.js';
import type { Registry } from './registry.js';
import {
  describeIdentity, identityOfStamp, readDeviceIdentity, readDeviceStamp, sameIdentity, type DeviceStamp, type StampIdentity,
} from '../host/device-stamp.js';
import { checkNotInUse } from '../host/in-use.js';
import { WRITE_WATCH_POLL_MS, type WriteWatch } from '../host/write-watch.js';

export interface SessionSettings {
  chunkSize?: number;
  durability?: Durability;
  sizeLimitBytes?: number;
}

export type HolderKind = 'connection' | 'mount' | 'snapshot';

export interface AttachOptions {
  /** Refuse (EBUSY) if any user holds the device already: used by `bdsnap mount`. */
  exclusive?: boolean;
  /** The session's mount time (names its directory); default now. */
  mountTime?: Date;
  holder: HolderKind;
}

export interface MountInfo {
  mountpoint: string;
  loopDevice: string | null;
}

/** From the first user hold to the last one: one session (or none, for an inactive device). */
export interface UserPhase {
  readonly top: BlockDevice;
  readonly cow: CowDevice | undefined;
  sessionDir: string | null;
  /** Settles when the phase has ended (session durable), with the session dir. */
  readonly ended: Promise<SessionEnd>;
  readonly settle: (result: SessionEnd | { error: unknown }) => void;
}

/** How a user phase ended: its session's directory (null: no session, or nothing was written) and, for a failed session, why. */
export interface SessionEnd {
  readonly dir: string | null;
  /** The session cannot be restored: what failed it (a write around bdsnap, a full store...). */
  readonly failedReason?: string;
}

interface Attachment {
  readonly devicePath: string;
  readonly file: FileDevice;
  /** Writes by other processes to the open file (undefined where they cannot be watched), read every WRITE_WATCH_POLL_MS and at each session end, take and close. */
  watch: WriteWatch | undefined;
  watchTimer: NodeJS.Timeout | undefined;
  /** Copy-before-write for the snapshots of this device. */
  readonly layer: SnapshotLayer;
  phase: UserPhase | undefined;
  userHolds: number;
  snapshotHolds: number;
  connections: number;
  /** What was opened: a later hold checks that the name still names it. */
  readonly identity: StampIdentity;
}

/**
 * What a holder gets from attach(): the device as it was opened, read-only to the holder (the
 * table alone counts holds and starts and ends user phases).
 */
export interface AttachedDevice {
  readonly devicePath: string;
  readonly sizeBytes: number;
  readonly file: FileDevice;
  /** Copy-before-write for the snapshots of this device. */
  readonly layer: SnapshotLayer;
  /** A user hold: whether the phase it joined runs a session. */
  readonly inSession: boolean;
  /** A user hold: settles when the phase it joined has ended and its session is durable (with its dir). */
  readonly ended: Promise<SessionEnd> | undefined;
}

/** What the table tells of how an open device is used. */
export interface DeviceUse {
  readonly file: FileDevice;
  /** Holds of users (NBD connections and mounts); 0 while only snapshots hold the device. */
  readonly userHolds: number;
  readonly connections: number;
  readonly mount: MountInfo | undefined;
  /** The session of the user phase, if one runs. */
  readonly cow: CowDevice | undefined;
}

function attachedView(att: Attachment): AttachedDevice {
  return { devicePath: att.devicePath, sizeBytes: att.file.size, file: att.file, layer: att.layer, inSession: att.phase?.cow !== undefined, ended: att.phase?.ended };
}

function endSignal(): Pick<UserPhase, 'ended' | 'settle'> {
  let settle!: UserPhase['settle'];
  const ended = new Promise<SessionEnd>((resolve, reject) => {
    settle = (result) => ('error' in result ? reject(result.error) : resolve(result));
  });
  // Nobody may be waiting; an unobserved failure is already logged by #endPhase.
  ended.catch(() => undefined);
  return { ended, settle };
}

/** The open device's stamp, or why it cannot be read. */
function stampOf(file: FileDevice): Promise<DeviceStamp | Error> {
  return file.stamp().then((st) => st ?? new BdsnapError('EIO', `${file.path} has no stamp`), (err: unknown) => err as Error);
}

export class DeviceTable {
  readonly #registry: Registry;
  readonly #snapshotRoot: string;
  readonly #log: Logger;
  readonly #events: EventLog;
  #watchUnavailableLogged = false;
  readonly #writtenAroundCounts = new Map<string, number>();
  readonly #session: SessionSettings;
  readonly #tracking: ChangeTracker | undefined;
  readonly #attachments = new Map<string, Attachment>();
  readonly #queues = new KeyedQueue();

  constructor(registry: Registry, snapshotRoot: string, log: Logger, events: EventLog, session: SessionSettings = {}, tracking?: ChangeTracker) {
    this.#registry = registry;
    this.#tracking = tracking;
    this.#snapshotRoot = snapshotRoot;
    this.#log = log;
    this.#events = events;
    this.#session = session;
  }

  /** The copy unit of snapshots (the sessions' chunk size). */
  get chunkSize(): number {
    return this.#session.chunkSize ?? DEFAULT_CHUNK_SIZE;
  }

  get durability(): Durability {
    return this.#session.durability ?? 'process';
  }

  names(): string[] {
    return this.#registry.list().map((d) => d.path);
  }

  /** An export handle for a registered device (undefined for an unknown name). */
  async open(name: string, purpose: 'info' | 'go'): Promise<ExportHandle | undefined> {
    if (!this.#registry.get(name)) {
      this.#log.warn({ event: 'export-refused', export: name }, 'NBD client asked for an export that is not registered');
      return undefined;
    }
    if (purpose === 'info') {
      const attached = this.#attachments.get(name);
      if (attached) return { name, device: attached.phase?.top ?? attached.layer, release: async () => {} };
      // A second name of a registered device is refused here too, not only at activation.
      await this.#registry.claimIdentity(name, await readDeviceIdentity(name));
      // Only the size and flags are needed: a shared read-only handle leaves the lock alone.
      const file = await FileDevice.open(name, { readOnly: true, shared: true });
      return { name, device: file, release: () => file.close() };
    }
    const att = await this.#attach(name, { holder: 'connection' });
    const phase = att.phase;
    if (!phase) throw new BdsnapError('EIO', `${name} has no user phase after attach`);
    att.connections++;
    let released = false;
    return {
      name,
      device: phase.top,
      release: async () => {
        if (released) return;
        released = true;
        att.connections--;
        await this.detach(name, 'connection');
      },
    };
  }

  /** How an open device is used now (a copy: the table alone changes it); undefined when it is not open. */
  use(devicePath: string): DeviceUse | undefined {
    const att = this.#attachments.get(devicePath);
    if (!att) return undefined;
    return { file: att.file, userHolds: att.userHolds, connections: att.connections, mount: this.mountOf?.(devicePath), cow: att.phase?.cow };
  }

  /** The snapshot layer of an open device. Errors: EIO when it is not open. */
  snapshotLayer(devicePath: string): SnapshotLayer {
    const att = this.#attachments.get(devicePath);
    if (!att) throw new BdsnapError('EIO', `${devicePath} is not open`);
    return att.layer;
  }

  /** While a user phase runs on the device: settles when it has ended (with its session dir). */
  phaseEnded(devicePath: string): Promise<SessionEnd> | undefined {
    return this.#attachments.get(devicePath)?.phase?.ended;
  }

  isAttached(devicePath: string): boolean {
    return this.#attachments.has(devicePath);
  }

  /**
   * Called before every user hold, outside the device's queue (it may attach the device for a
   * snapshot): throws to refuse the hold. The snapshot manager puts back snapshots here.
   */
  beforeUserAttach: ((devicePath: string) => Promise<void>) | undefined;

  /** Called before every hold of any kind: throws to refuse it (a device under instant restore). */
  checkAttach: ((devicePath: string) => Promise<void>) | undefined;

  /**
   * Called when another process wrote a held device (`detail` says who): its change map starts
   * again and its snapshots are void (the table has failed the session in progress itself).
   */
  onWrittenAround: ((devicePath: string, detail: string) => Promise<void>) | undefined;

  /** How many writers around bdsnap were found on the device since the daemon started (a snapshot take compares it before and after). */
  writtenAroundCount(devicePath: string): number {
    return this.#writtenAroundCounts.get(devicePath) ?? 0;
  }

  /**
   * Read the device's write watch: another process that wrote the device, or has it open for
   * writing, while the daemon holds it wrote around copy-before-write and the change map. The
   * session in progress then cannot restore exactly and is failed with the reason first;
   * onWrittenAround does the rest. A watch that cannot tell counts as such a write.
   */
  async checkWrittenAround(devicePath: string): Promise<void> {
    const att = this.#attachments.get(devicePath);
    const detail = await att?.watch?.check(devicePath, 'while bdsnap held it', 'copy-before-write and the change map');
    if (att === undefined || detail === undefined) return;
    this.#writtenAroundCounts.set(devicePath, this.writtenAroundCount(devicePath) + 1);
    this.#log.warn({ event: 'written-around', device: devicePath }, detail);
    att.phase?.cow?.writtenAround(detail);
    await this.onWrittenAround?.(devicePath, detail);
  }

  /** checkWrittenAround where nobody waits for it (the watch's round, a session end, a close): a failure to record what it found is logged. */
  async #checkWrittenAroundLogged(devicePath: string): Promise<void> {
    await this.checkWrittenAround(devicePath).catch((err: unknown) => {
      this.#log.error({ event: 'written-around-failed', device: devicePath, reason: (err as Error).message }, 'a write around bdsnap was found but could not be recorded');
    });
  }

  /** Where a device is mounted through the daemon: the mount manager knows, the table asks it. */
  mountOf: ((devicePath: string) => MountInfo | undefined) | undefined;

  /** Take a hold on the device, opening it for the first holder and starting a user phase for the first user. */
  async attach(devicePath: string, options: AttachOptions): Promise<AttachedDevice> {
    return attachedView(await this.#attach(devicePath, options));
  }

  async #attach(devicePath: string, options: AttachOptions): Promise<Attachment> {
    const user = options.holder !== 'snapshot';
    await this.checkAttach?.(devicePath);
    if (user) await this.beforeUserAttach?.(devicePath);
    return this.#serial(devicePath, async () => {
      let att = this.#attachments.get(devicePath);
      if (att && user && options.exclusive && att.userHolds > 0) {
        const mount = this.mountOf?.(devicePath);
        const where = mount
          ? `mounted through bdsnap at ${mount.mountpoint}; run bdsnap umount ${mount.mountpoint} first`
          : `open by ${att.connections} NBD client(s) of the bdsnap daemon; disconnect them first`;
        throw new BdsnapError('EBUSY', `${devicePath} is already ${where}`);
      }
      const record = this.#registry.get(devicePath);
      if (!record) throw new BdsnapError('ENOENT', `${devicePath} is not registered with bdsnap`);
      if (att) {
        await refuseReplaced(att);
        // A loop device or a mount set up on the file since it was opened writes around bdsnap;
        // so does anything that wrote the file while the daemon held it and did not write it.
        await checkNotInUse(devicePath, {}, { exclusiveProbe: false });
        await this.#tracking?.verifyOpen(devicePath);
      } else {
        const file = await FileDevice.open(devicePath);
        let tracked: BlockDevice = file;
        let identity: StampIdentity;
        try {
          // A device an interrupted restore left half way is neither state: nothing may read
          // or write it through the daemon until that restore is finished (checked under the
          // device's lock).
          await refuseUnfinishedRestore(this.#snapshotRoot, devicePath);
          await refuseInterruptedBackupRestore(devicePath, file.identity);
          // Whatever else writes the device (a loop device, a mount, a stacked device) would
          // write around copy-before-write and the change map. A block device is held O_EXCL
          // by now: the probe would only find this hold.
          await checkNotInUse(devicePath, {}, { exclusiveProbe: false });
          // Writes someone else left in the device's page cache reach the device, its
          // counters and its backing file now, before its stamp is read.
          await file.flush();
          const stamp = await stampOf(file);
          // What was opened, not what the name named a moment ago: a second name of a
          // registered device is refused (a hard link made after both were registered).
          identity = stamp instanceof Error ? await readDeviceIdentity(devicePath) : identityOfStamp(stamp);
          const replaced = await this.#registry.claimIdentity(devicePath, identity);
          if (replaced) {
            this.#log.warn({ event: 'device-replaced', device: devicePath, was: describeIdentity(replaced), now: describeIdentity(identity) },
              'the device name now names another file or device than when it was last opened');
          }
          if (this.#tracking) tracked = new TrackingDevice(file, await this.#tracking.openMap(devicePath, file.size, stamp, () => file.stamp()));
        } catch (err) {
          await file.close();
          throw err;
        }
        const layer = new SnapshotLayer(tracked, { chunkSize: this.chunkSize });
        att = { devicePath, file, layer, phase: undefined, userHolds: 0, snapshotHolds: 0, connections: 0, identity, ...this.#watch(devicePath, file) };
        this.#attachments.set(devicePath, att);
      }
      if (!user) {
        att.snapshotHolds++;
        return att;
      }
      if (att.userHolds === 0) att.phase = this.#startPhase(att, record.active, options);
      att.userHolds++;
      return att;
    });
  }

  /** Start watching `file` for writes by other processes, or say once why that cannot be done here. */
  #watch(devicePath: string, file: FileDevice): Pick<Attachment, 'watch' | 'watchTimer'> {
    const watch = file.watchWrites();
    if ('reason' in watch) {
      if (!this.#watchUnavailableLogged) {
        this.#watchUnavailableLogged = true;
        this.#log.warn({ event: 'write-watch-unavailable', reason: watch.reason },
          `writes by other processes to a held device are not watched (${watch.reason}); they are found only by the checks at each hold and by the devices' stamps`);
      }
      return { watch: undefined, watchTimer: undefined };
    }
    const watchTimer = setInterval(() => void this.#checkWrittenAroundLogged(devicePath), WRITE_WATCH_POLL_MS).unref();
    return { watch, watchTimer };
  }

  /** Drop a hold. The last user ends the session durably (returns its dir); the last holder closes the device. */
  detach(devicePath: string, holder: HolderKind): Promise<string | null> {
    return this.#serial(devicePath, async () => {
      const att = this.#attachments.get(devicePath);
      if (!att) return null;
      let sessionDir: string | null = null;
      if (holder === 'snapshot') {
        att.snapshotHolds = Math.max(0, att.snapshotHolds - 1);
      } else if (att.userHolds > 0) {
        att.userHolds--;
        if (att.userHolds === 0) sessionDir = (await this.#endPhase(att)).dir;
      }
      if (att.userHolds === 0 && att.snapshotHolds === 0) await this.#closeFile(att);
      return sessionDir;
    });
  }

  /** Each registered device as `status` shows it, but for the mounts of its images (the mount manager's). */
  status(snapshotsOf: (devicePath: string) => string[]): Array<Omit<DeviceStatus, 'imageMounts' | 'asOfViews'>> {
    return this.#registry.list().map((record) => {
      const att = this.#attachments.get(record.path);
      const cow = att?.phase?.cow;
      const stats = cow?.stats();
      const mount = att ? this.mountOf?.(record.path) : undefined;
      return {
        device: record.path,
        active: record.active,
        attached: att !== undefined && att.userHolds > 0,
        connections: att?.connections ?? 0,
        mountpoint: mount?.mountpoint ?? null,
        loopDevice: mount?.loopDevice ?? null,
        currentSession: cow?.sessionDir ?? att?.phase?.sessionDir ?? null,
        inSession: cow !== undefined,
        bytesPreserved: stats?.preservedBytes ?? 0,
        sessionState: cow?.state ?? null,
        sessionCount: record.sessions.length,
        dirtyOutsideSession: record.dirtyOutsideSession,
        snapshots: snapshotsOf(record.path),
      };
    });
  }

  /**
   * Shutdown: end every attachment whatever its holders (the NBD server is already closed).
   * The devices in `leave` are still in use (a filesystem that would not unmount): their
   * sessions are left for the next start to recover, never marked complete, and their change
   * maps are closed without a stamp, so nothing vouches for what happens to them next.
   */
  async closeAll(leave: ReadonlySet<string> = new Set()): Promise<void> {
    await Promise.all([...this.#attachments.keys()].map((devicePath) => this.#serial(devicePath, async () => {
      const att = this.#attachments.get(devicePath);
      if (!att) return;
      if (leave.has(devicePath)) {
        try {
          await this.#leavePhase(att);
        } finally {
          await this.#closeFile(att, false);
        }
        return;
      }
      try {
        await this.#endPhase(att);
      } finally {
        await this.#closeFile(att);
      }
    })));
  }

  async #leavePhase(att: Attachment): Promise<void> {
    const phase = att.phase;
    if (!phase) return;
    att.phase = undefined;
    att.userHolds = 0;
    try {
      await phase.cow?.leaveForRecovery();
      this.#log.warn({ event: 'session-left', device: att.devicePath, sessionDir: phase.cow?.sessionDir ?? null },
        'the device is still in use at shutdown: its session is left open, for the next start to recover');
    } finally {
      phase.settle({ error: new BdsnapError('ESHUTDOWN', `the daemon stopped while ${att.devicePath} was still in use; its session is recovered at the next start`) });
    }
  }

  #startPhase(att: Attachment, active: boolean, options: AttachOptions): UserPhase {
    const devicePath = att.devicePath;
    if (active) {
      const mountTime = options.mountTime ?? new Date();
      const late: { phase?: UserPhase } = {};
      const cow = CowDevice.create(att.layer, {
        devicePath,
        snapshotRoot: this.#snapshotRoot,
        mountTime,
        deviceIdentity: { ...att.file.identity },
        ...(this.#session.chunkSize !== undefined ? { chunkSize: this.#session.chunkSize } : {}),
        ...(this.#session.durability !== undefined ? { durability: this.#session.durability } : {}),
        ...(this.#session.sizeLimitBytes !== undefined ? { sizeLimitBytes: this.#session.sizeLimitBytes } : {}),
        onEvent: (event) => {
          if (late.phase) this.#onSessionEvent(att, late.phase, event);
        },
      });
      const phase: UserPhase = { top: cow, cow, sessionDir: null, ...endSignal() };
      late.phase = phase;
      this.#log.info({ event: 'attach', device: devicePath, holder: options.holder, session: true, mountTime: mountTime.toISOString() },
        'device attached under a session');
      return phase;
    }
    const tracker = new DirtyTracker(att.layer, async () => {
      await this.#registry.markDirtyOutsideSession(devicePath);
      this.#log.warn({ event: 'dirty-outside-session', device: devicePath }, 'inactive device written outside any session');
    });
    this.#log.info({ event: 'attach', device: devicePath, holder: options.holder, session: false }, 'device attached without a session (not active)');
    return { top: tracker, cow: undefined, sessionDir: null, ...endSignal() };
  }

  async #endPhase(att: Attachment): Promise<SessionEnd> {
    const phase = att.phase;
    if (!phase) return { dir: null };
    try {
      // A write by another process up to now fails the session before it is closed (that is
      // done first, so a change map that cannot be reset only costs its own log line).
      await this.#checkWrittenAroundLogged(att.devicePath);
      const end = await this.#closeSession(att, phase);
      phase.settle(end);
      return end;
    } catch (err) {
      phase.settle({ error: err });
      throw err;
    } finally {
      att.phase = undefined;
      att.userHolds = 0;
    }
  }

  async #closeSession(att: Attachment, phase: UserPhase): Promise<SessionEnd> {
    if (!phase.cow) return { dir: null };
    try {
      const summary: CowSessionSummary | undefined = await phase.cow.close();
      if (!summary) {
        this.#log.info({ event: 'session-end', device: att.devicePath, sessionDir: null }, 'session ended without any modification (no directory)');
        return { dir: null };
      }
      await this.#registry.sessionEnded(att.devicePath, summary.sessionDir);
      const details = {
        sessionDir: summary.sessionDir, state: summary.state, preservedChunks: summary.preservedChunks,
        preservedBytes: summary.preservedBytes, storeBytes: summary.storeBytes,
        ...(summary.failedReason ? { reason: summary.failedReason } : {}),
      };
      // The log line operators and scripts already read, then the event for `bdsnap events`.
      this.#log.info({ event: 'session-end', device: att.devicePath, ...details }, 'session ended');
      this.#events.emit('session-ended', { device: att.devicePath, details });
      return summary.state === 'failed' ? { dir: summary.sessionDir, failedReason: summary.failedReason ?? 'the session failed' } : { dir: summary.sessionDir };
    } catch (err) {
      const e = toBdsnapError(err);
      this.#log.error({ event: 'session-close-failed', device: att.devicePath, code: e.code, reason: e.message }, 'closing the session failed');
      throw e;
    }
  }

  /** `vouch`: record the device's stamp with its change map (false: the device may still be written). */
  async #closeFile(att: Attachment, vouch = true): Promise<void> {
    // The attachment stays in the table until the device is closed and unlocked; attach()
    // for this device queues behind us meanwhile.
    try {
      await this.#checkWrittenAroundLogged(att.devicePath);
      clearInterval(att.watchTimer);
      att.watch?.close();
      // The change map's stamp must include the daemon's own writes, so it is read once they
      // have all reached the device (flushed): an image file's from the descriptor still open
      // (its name may name another file by now), a block device's after our descriptor is
      // closed (the last close may still write).
      let flushed = false;
      let stamp: DeviceStamp | Error | undefined;
      if (this.#tracking && vouch) {
        try {
          await att.file.flush();
          flushed = true;
        } catch (err) {
          this.#log.warn({ event: 'detach-flush-failed', device: att.devicePath, reason: (err as Error).message }, 'the device could not be flushed at close; its change map will start again');
        }
        if (flushed && att.file.identity.kind === 'file') stamp = await stampOf(att.file);
      }
      await att.file.close();
      if (flushed && att.file.identity.kind === 'block') stamp = await readDeviceStamp(att.devicePath).catch((err: unknown) => err as Error);
      await this.#tracking?.closeMap(att.devicePath, stamp);
    } finally {
      this.#attachments.delete(att.devicePath);
      this.#log.info({ event: 'detach', device: att.devicePath }, 'device detached');
    }
  }

  #onSessionEvent(att: Attachment, phase: UserPhase, event: { type: string; [k: string]: unknown }): void {
    const sessionDir = typeof event.sessionDir === 'string' ? event.sessionDir : null;
    if (event.type === 'session-start' && sessionDir) {
      phase.sessionDir = sessionDir;
      this.#events.emit('session-started', { device: att.devicePath, details: { sessionDir, mountTime: event.mountTime } });
      this.#registry.sessionStarted(att.devicePath, sessionDir).catch((err: unknown) => {
        this.#log.error({ event: 'registry-write-failed', device: att.devicePath, reason: (err as Error).message }, 'cannot record the session in the registry');
      });
    } else if (event.type === 'session-failed') {
      this.#events.emit('session-failed', { device: att.devicePath, details: { sessionDir, reason: event.reason } });
    } else if (event.type === 'session-error') {
      this.#log.error({ event: 'session-error', device: att.devicePath, sessionDir, reason: event.reason }, 'session error');
    }
  }

  #serial<T>(key: string, fn: () => Promise<T>): Promise<T> {
    return this.#queues.run(key, fn);
  }
}

/**
 * Refuse a new hold on an open device whose name now names another file or device (replaced
 * with mv, say, while a snapshot or a client held it): the hold would read and write the
 * old, unnamed file. Once every hold on it has ended, the next one opens what the name names.
 */
async function refuseReplaced(att: Attachment): Promise<void> {
  const named = await readDeviceIdentity(att.devicePath).catch((err: unknown) => err as Error);
  if (!(named instanceof Error) && sameIdentity(named, att.identity)) return;
  const now = named instanceof Error ? `cannot be looked at (${named.message})` : `now names ${describeIdentity(named)}`;
  const holders = [
    att.snapshotHolds > 0 ? `${att.snapshotHolds} snapshot(s) (bdsnap snapshot list; bdsnap snapshot destroy ID)` : '',
    att.connections > 0 ? `${att.connections} NBD client(s)` : '',
    att.phase !== undefined && att.userHolds > att.connections ? 'a mount (bdsnap umount)' : '',
  ].filter((h) => h !== '').join(', ');
  throw new BdsnapError('EBUSY', `${att.devicePath} ${now}, not the ${describeIdentity(att.identity)} bdsnap holds open for ${holders || 'its holders'}: it was replaced while held. `
    + 'Nothing new is served from the old file; end those holds, and the next open serves what the name names (its change map starts again)');
}
