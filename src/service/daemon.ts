/**
 * The bdsnap daemon: the registry, the NBD server on `<run-dir>/nbd.sock` serving registered
 * devices and snapshot images only, and the control API on `<run-dir>/control.sock`.
 * Each operation lives with the part that owns it (MountManager, SnapshotManager, the
 * DeviceTable); this class puts them together and routes control requests.
 *
 * Start-up order matters. First the daemon claims its state and run directories (see
 * daemon-lock.ts) and refuses to start if another daemon has either: everything after that
 * takes what it finds (mounts in the run directory, sessions marked active, snapshots) as left
 * by a daemon that died, and would tear down a live one's. Then the registry is read, any
 * session left open by a daemon that died is recovered (marked interrupted, still restorable;
 * a session whose writer still runs is left alone), and snapshots are put back on their
 * devices, all before the NBD server accepts a client, so no write can reach a device without
 * its sessions and snapshots in place.
 * close() (SIGTERM) stops taking requests, unmounts what bdsnap mounted, lets the NBD server
 * finish its requests in flight, ends every session durably, and closes the snapshots'
 * storage (the snapshots themselves stay for the next start). A mount that stays busy is
 * flushed while it is still served, then left behind: its session is left for the next start
 * to recover, and close() fails saying so.
 */

import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { FileDevice } from '../device/file-device.js';
import { BdsnapError } from '../errors.js';
import type { ChangeMapInfo } from '../snapshot/change-map/index.js';
import type { ExportHandle, ExportProvider } from '../nbd/exports.js';
import { NbdServer } from '../nbd/server.js';
import { MAX_SERVE_THREADS, threadCountAsked } from './serve.js';
import type { NbdTls } from '../nbd/tls.js';
import { JOURNAL_FILE } from '../snapshot/format.js';
import { readJournal } from '../snapshot/restore/journal.js';
import { listSessions, recoverSession } from '../snapshot/sessions.js';
import { libcUnavailableReason, loadLibc } from '../host/libc.js';
import { ensurePrivateDir, whyOthersCanRename } from '../host/private-dir.js';
import { otherWritersOf } from '../host/in-use.js';
import { describeWriters, processCount } from '../host/open-writers.js';
import { PasswordStore } from './auth.js';
import { controlSocketPath, nbdSocketPath } from './paths.js';
import {
  PROTOCOL_VERSION, type ActivationResult, type CbtInfo, type ListResult, type ReplicaReceiveReply, type Request, type SessionListEntry, type SnapshotInfo, type StatusResult,
} from './control-protocol.js';
import { ControlServer, type Caller } from './control-server.js';
import { DeviceTable, type SessionSettings } from './device-table.js';
import { ChangeTracker } from './change-tracking.js';
import { claimDaemonDirs, type DaemonClaim } from './daemon-lock.js';
import { EventLog } from './events.js';
import { cleanUpStaleMounts } from './mount.js';
import { MOUNTS_FILE, MountManager, describeLeftMounts } from './mount-manager.js';
import { Registry, canonicalDevicePath, registerDevice } from './registry.js';
import { AsOfExports } from './as-of-exports.js';
import { InstantRestores, type SourceOpener } from './instant-restore.js';
import { describeHolder, describeRestoreSessions } from './device-holders.js';
import { Repository, openBackupDevices, openRepoStore } from '../repository/index.js';
import { RepoLock } from '../repository/lock.js';
import { ownerOf, SnapshotManager, type SnapshotOwner } from './snapshots/index.js';
import { ReplicaManager } from './replicas.js';
import { ReplicaStandby } from './replica-standby.js';

export { DEFAULT_STATE_DIR } from './paths.js';

type RequestOf<Op extends Request['op']> = Extract<Request, { op: Op }>;

export interface DaemonOptions {
  runDir: string;
  stateDir: string;
  snapshotRoot: string;
  log: Logger;
  session?: SessionSettings;
  /** How long umount waits for other NBD clients of the device to let go. Default 30 s. */
  detachTimeoutMs?: number;
  /** Keep a change map per device (default true). */
  changeTracking?: boolean;
  /** Bytes per second the background copy of an instant restore may read (default: no limit). */
  restoreRateBytes?: number;
  /**
   * Also serve NBD on TCP, with `tls` if given (the caller decides whether plaintext is
   * acceptable). The unix socket stays plaintext: it is root's alone (0600), and `bdsnap mount`
   * and the backup agent use it.
   */
  listen?: { host: string; port: number };
  tls?: NbdTls;
}

export class Daemon {
  readonly runDir: string;
  readonly controlSocket: string;
  readonly nbdSocket: string;
  readonly #stateDir: string;
  readonly #snapshotRoot: string;
  readonly #log: Logger;
  readonly #registry: Registry;
  readonly #passwords: PasswordStore;
  readonly #events: EventLog;
  readonly #tracking: ChangeTracker | undefined;
  readonly #table: DeviceTable;
  readonly #snapshots: SnapshotManager;
  readonly #asOf: AsOfExports;
  readonly #instant: InstantRestores;
  readonly #mounts: MountManager;
  readonly #nbd: NbdServer;
  readonly #claim: DaemonClaim;
  // Loaded in start(), before any client can reach the daemon.
  #replicas!: ReplicaManager;
  #standby!: ReplicaStandby;
  #control: ControlServer | undefined;
  #closing: Promise<void> | undefined;

  private constructor(options: DaemonOptions, claim: DaemonClaim, registry: Registry, events: EventLog) {
    this.#claim = claim;
    this.runDir = path.resolve(options.runDir);
    this.#stateDir = path.resolve(options.stateDir);
    this.#snapshotRoot = path.resolve(options.snapshotRoot);
    this.#log = options.log;
    this.nbdSocket = nbdSocketPath(this.runDir);
    this.controlSocket = controlSocketPath(this.runDir);
    this.#registry = registry;
    this.#events = events;
    this.#passwords = new PasswordStore(this.#stateDir);
    this.#tracking = options.changeTracking === false ? undefined : new ChangeTracker(this.#stateDir, options.session?.durability ?? 'process', events, this.#log);
    this.#table = new DeviceTable(registry, this.#snapshotRoot, this.#log, events, options.session, this.#tracking);
    const late: { mounts?: MountManager } = {};
    this.#snapshots = new SnapshotManager({
      stateDir: this.#stateDir, nbdSocket: this.nbdSocket, table: this.#table, registry, events, log: this.#log,
      mountpointOf: (devicePath) => late.mounts?.mountpointOf(devicePath),
      imageMountOf: (exportName) => late.mounts?.imageMountOf(exportName),
      unmount: async (mountpoint) => {
        if (!late.mounts) throw new BdsnapError('EIO', 'the mount manager is not running');
        return late.mounts.umount(mountpoint);
      },
      ...(this.#tracking ? { tracking: this.#tracking } : {}),
    });
    this.#asOf = new AsOfExports({
      table: this.#table, registry, snapshotRoot: this.#snapshotRoot, log: this.#log, mountpointOf: (name) => late.mounts?.imageMountOf(name)?.mountpoint,
    });
    this.#instant = new InstantRestores({ stateDir: this.#stateDir, events, log: this.#log, openSource: openBackupSource, ...(options.restoreRateBytes !== undefined ? { rateBytes: options.restoreRateBytes } : {}) });
    this.#table.checkAttach = (devicePath) => this.#instant.checkAttach(devicePath);
    this.#table.mountOf = (devicePath) => late.mounts?.mountOf(devicePath);
    this.#instant.mountOf = (target) => {
      const mount = late.mounts?.imageMountOf(target);
      return mount && { mountpoint: mount.mountpoint, loopDevice: mount.loopDevice };
    };
    this.#table.beforeUserAttach = async (devicePath) => {
      this.#asOf.checkUserAttach(devicePath);
      await this.#snapshots.bringBack(devicePath);
    };
    if (this.#tracking) this.#tracking.onReset = (devicePath, reset) => this.#snapshots.deviceReset(devicePath, reset.reason, reset.detail);
    // Another process wrote a held device: its change map starts again, which voids its
    // snapshots (onReset); without change tracking the snapshots are voided directly.
    this.#table.onWrittenAround = async (devicePath, detail) => {
      if (this.#tracking) await this.#tracking.changedOutside(devicePath, detail);
      else this.#snapshots.deviceReset(devicePath, 'changed-outside', detail);
    };
    this.#mounts = new MountManager({
      runDir: this.runDir, nbdSocket: this.nbdSocket, table: this.#table, registry, snapshots: this.#snapshots, log: this.#log,
      images: { restoreOf: (name) => this.#instant.servingOf(name), open: (name) => this.#openImage(name) },
      detachTimeoutMs: options.detachTimeoutMs ?? 30000,
    });
    late.mounts = this.#mounts;
    // With BDSNAP_NBD_THREADS=N (N > 1), connections are served on worker threads that do the
    // wire's byte work; every request is still applied here, where the sessions, change maps
    // and snapshots live. Off unless asked: on two cores the messages between the threads cost
    // more CPU in all than they take off this one, which keeps the device I/O, and nbdcopy's
    // four connections were no faster for it.
    const threads = process.env.BDSNAP_NBD_THREADS ? Math.min(threadCountAsked(), MAX_SERVE_THREADS) : 1;
    this.#nbd = new NbdServer({
      exports: this.#exports(), log: (event) => this.#logNbd(event),
      ...(threads > 1 ? { threads: { count: threads, owner: true } } : {}),
    });
  }

  static async start(options: DaemonOptions): Promise<Daemon> {
    disableCoreDumps(options.log);
    const runDir = path.resolve(options.runDir);
    const stateDir = path.resolve(options.stateDir);
    const snapshotRoot = path.resolve(options.snapshotRoot);
    await ensurePrivateDir(runDir, 0o700);
    await ensurePrivateDir(stateDir, 0o700);
    const claim = await claimDaemonDirs({ runDir, stateDir, snapshotRoot }, [nbdSocketPath(runDir), controlSocketPath(runDir)]);
    try {
      // Sessions hold the devices' original content: another user who could write here could
      // replace what a restore writes back.
      await ensurePrivateDir(snapshotRoot, 0o700);
      await cleanUpStaleMounts(path.join(runDir, MOUNTS_FILE), options.log);
      const registry = await Registry.load(stateDir);
      await recoverOpenSessions(registry, snapshotRoot, options.log);
      const events = await EventLog.open(stateDir, options.log);
      const daemon = new Daemon(options, claim, registry, events);
      await daemon.#snapshots.recover();
      // A standby undoes a sync a killed daemon left half applied before any client can attach.
      daemon.#standby = await ReplicaStandby.load({
        stateDir, snapshotRoot, table: daemon.#table, registry, events, log: options.log, ...(daemon.#tracking ? { tracking: daemon.#tracking } : {}),
      });
      await daemon.#standby.recover();
      daemon.#replicas = await ReplicaManager.load({ stateDir, snapshots: daemon.#snapshots, events, log: options.log });
      await daemon.#replicas.recover();
      await daemon.#instant.resumeAll();
      await daemon.#nbd.listenUnix(daemon.nbdSocket);
      if (options.listen) {
        const { port } = await daemon.#nbd.listenTcp(options.listen.host, options.listen.port, options.tls);
        options.log.info({ event: 'nbd-listening', host: options.listen.host, port, tls: options.tls?.mode ?? 'off' }, `NBD on TCP ${options.listen.host}:${port}`);
      }
      daemon.#control = await ControlServer.listen(daemon.controlSocket, (request, caller) => daemon.#handle(request, caller), options.log);
      options.log.info({ event: 'daemon-started', runDir, stateDir, snapshotRoot, devices: registry.list().length }, 'bdsnap daemon started');
      return daemon;
    } catch (err) {
      claim.release();
      throw err;
    }
  }

  /** The NBD server's events: a limit reached is a warning, the rest are detail for debugging. */
  #logNbd({ level, ...event }: Record<string, unknown>): void {
    if (level === 'warn') this.#log.warn({ ...event, nbd: true }, String(event.message));
    else this.#log.debug({ ...event, nbd: true });
  }

  /**
   * Stop. Rejects (EBUSY, after everything else was stopped) when a mount was still busy and
   * is left behind: its session is not marked complete while a filesystem sits on the device.
   */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      this.#log.info({ event: 'daemon-stopping' }, 'bdsnap daemon stopping');
      await this.#replicas.close();
      await this.#control?.close();
      const left = await this.#mounts.closeAll();
      await this.#nbd.close();
      await this.#instant.closeAll();
      await this.#snapshots.closeAll();
      await this.#table.closeAll(new Set(left.flatMap((m) => m.devicePath ?? [])));
      await this.#tracking?.closeAll();
      this.#events.close();
      await fs.promises.rm(this.controlSocket, { force: true });
      await fs.promises.rm(this.nbdSocket, { force: true });
      this.#claim.release();
      if (left.length > 0) {
        this.#log.error({ event: 'daemon-stopped', leftMounts: left.map((m) => m.mountpoint) }, 'bdsnap daemon stopped, leaving busy mounts behind');
        throw new BdsnapError('EBUSY', describeLeftMounts(left));
      }
      this.#log.info({ event: 'daemon-stopped' }, 'bdsnap daemon stopped');
    })();
    return this.#closing;
  }

  async #handle(request: Request, caller: Caller): Promise<unknown> {
    switch (request.op) {
      case 'ping':
        return { pid: process.pid, version: PROTOCOL_VERSION, passwordSet: await this.#passwords.isSet() };
      case 'passwd':
        return this.#passwd(request.newPassword, request.currentPassword);
      case 'activate':
        return this.#activation(request.device, request.password, true);
      case 'deactivate':
        return this.#activation(request.device, request.password, false);
      case 'status':
        return this.#status();
      case 'list':
        return this.#list(request.device);
      case 'mount':
        return this.#mounts.mount(request.device, request.mountpoint, request.type, request.options);
      case 'umount':
        return this.#mounts.umount(request.mountpoint);
      case 'register':
        return registerDevice(this.#registry, request.device);
      case 'snapshot-create':
        return this.#createSnapshot(request, caller);
      case 'snapshot-list':
        return { snapshots: this.#snapshots.list() };
      case 'snapshot-info': {
        // Up to date with the kernel's report of writers around its devices (src/host/write-watch.ts):
        // a backup asks this before it records what it read.
        for (const { device } of this.#snapshots.info(request.snapshot).images) await this.#table.checkWrittenAround(device);
        return this.#snapshots.info(request.snapshot);
      }
      case 'snapshot-extend':
        return this.#extendSnapshot(request);
      case 'snapshot-destroy':
        return this.#snapshots.destroy(request.snapshot, { force: request.force ?? false });
      case 'snapshot-changes':
        return { ranges: this.#snapshots.changes(request.snapshot, request.device, request.generation, request.since) };
      case 'events':
        return this.#events.since(request.after ?? 0, request.waitMs ?? 0);
      case 'cbt-info':
      case 'cbt-map':
      case 'cbt-mark-dirty':
      case 'cbt-reset':
        return this.#cbtRequest(request);
      case 'instant-restore':
        return this.#startInstantRestore(request);
      case 'replica-add':
        return this.#addReplica(request);
      case 'replica-list':
        return { replicas: this.#replicas.list(), received: await this.#standby.list() };
      case 'replica-action':
        return this.#replicaAction(request.action, request.replica, request.force === true);
      case 'replica-receive':
        return this.#receive(request);
    }
  }

  /**
   * An owned snapshot (backup create) belongs to the asking process and lives as long as this
   * connection: once it closes (the process ended, killed or not) the snapshot is destroyed;
   * at once if it closed while the snapshot was being taken. A daemon stopping closes it too,
   * but then the owner is left to the next start to judge.
   */
  async #createSnapshot(request: RequestOf<'snapshot-create'>, caller: Caller): Promise<SnapshotInfo> {
    let owner: SnapshotOwner | undefined;
    if (request.owned === true) {
      // Unreachable without credentials (the control server refuses first); checked for the type.
      if (caller.peer.kind !== 'known') throw new BdsnapError('EPERM', `an owned snapshot needs the caller's pid: ${caller.peer.reason}`);
      owner = await ownerOf(caller.peer.cred.pid);
    }
    const info = await this.#snapshots.create(request.devices, {
      ...(request.storageDir !== undefined ? { storageDir: request.storageDir } : {}),
      ...(request.limitBytes !== undefined ? { limitBytes: request.limitBytes } : {}),
      ...(request.freeze !== undefined ? { freeze: request.freeze } : {}),
      ...(owner !== undefined ? { owner } : {}),
    });
    if (owner !== undefined) {
      caller.onClose(() => {
        if (this.#closing === undefined) void this.#snapshots.ownerGone(info.id, 'closed its control connection');
      });
    }
    return info;
  }

  #extendSnapshot(request: RequestOf<'snapshot-extend'>): Promise<SnapshotInfo> {
    return this.#snapshots.extend(request.snapshot, {
      ...(request.limitBytes !== undefined ? { limitBytes: request.limitBytes } : {}),
      ...(request.storageDir !== undefined ? { storageDir: request.storageDir } : {}),
    });
  }

  #cbtRequest(request: RequestOf<'cbt-info' | 'cbt-map' | 'cbt-mark-dirty' | 'cbt-reset'>): Promise<unknown> {
    switch (request.op) {
      case 'cbt-info':
        return this.#cbt(request.device, async (devicePath, sizeBytes, tracking) => tracking.info(devicePath, sizeBytes));
      case 'cbt-map': {
        const since = request.since;
        return this.#cbt(request.device, async (devicePath, sizeBytes, tracking) => {
          const { info, ranges } = await tracking.changedSince(devicePath, sizeBytes, since);
          return { ...info, since, ranges };
        });
      }
      case 'cbt-mark-dirty': {
        const ranges = request.ranges;
        return this.#cbt(request.device, (devicePath, sizeBytes, tracking) => tracking.markDirty(devicePath, sizeBytes, ranges));
      }
      case 'cbt-reset':
        return this.#cbt(request.device, (devicePath, sizeBytes, tracking) => tracking.reset(devicePath, sizeBytes));
    }
  }

  /** An instant restore, refused while the target is open through the daemon. */
  #startInstantRestore(request: RequestOf<'instant-restore'>): ReturnType<InstantRestores['start']> {
    return this.#instant.start(
      {
        repo: request.repo, backup: request.backup, device: request.device, target: request.output ?? request.device, output: request.output !== undefined,
        ...(request.password !== undefined ? { password: request.password } : {}),
        ...(request.abandon === true ? { abandon: true } : {}),
      },
      async (target) => {
        const canonical = await canonicalDevicePath(target);
        if (this.#table.isAttached(canonical) || this.#asOf.viewsOf(canonical).length > 0) {
          const held = this.#status().devices.find((d) => d.device === canonical);
          const why = held && describeHolder(held);
          throw new BdsnapError('EBUSY', `${canonical} is ${why !== undefined ? `in use: ${why}` : 'open through the daemon (mounted, served or in a snapshot); unmount it, disconnect its clients and destroy its snapshots first'}`);
        }
      },
    );
  }

  #addReplica(request: RequestOf<'replica-add'>): ReturnType<ReplicaManager['add']> {
    return this.#replicas.add({
      devices: request.devices, to: request.to,
      ...(request.everyMs !== undefined ? { everyMs: request.everyMs } : {}),
      ...(request.laggingAfterMs !== undefined ? { laggingAfterMs: request.laggingAfterMs } : {}),
      ...(request.limitBytesPerSecond !== undefined ? { limitBytesPerSecond: request.limitBytesPerSecond } : {}),
      ...(request.standbyRunDir !== undefined ? { standbyRunDir: request.standbyRunDir } : {}),
      ...(request.insecureTcp !== undefined ? { insecureTcp: request.insecureTcp } : {}),
    });
  }

  /** The NBD server's view: registered devices, `<device>@<id>` snapshot images and `<device>@asof:<time>` views. */
  #exports(): ExportProvider {
    return {
      list: async () => [...new Set([...this.#table.names(), ...this.#snapshots.exportNames(), ...this.#asOf.names(), ...this.#instant.list().map((r) => r.target)])],
      open: async (name: string, purpose: 'info' | 'go'): Promise<ExportHandle | undefined> => {
        const image = await this.#openImage(name);
        if (image) return image;
        const handle = await this.#table.open(name, purpose);
        if (!handle || purpose !== 'go') return handle;
        // A replica's sync that loses its connection before its commit is undone once let go.
        return {
          ...handle,
          release: async () => {
            await handle.release();
            this.#standby.deviceReleased(name);
          },
        };
      },
    };
  }

  /** The export of a name that is not a plain registered device: a snapshot image, an as-of view, a target under instant restore. */
  async #openImage(name: string): Promise<ExportHandle | undefined> {
    return await this.#instant.open(name) ?? this.#snapshots.openImage(name) ?? await this.#asOf.open(name);
  }

  /** A replica action: on the replicas this daemon sends, or (remove, failover) on those it receives. */
  async #replicaAction(action: 'sync' | 'pause' | 'resume' | 'remove' | 'failover', id: string, force: boolean): Promise<unknown> {
    if (action === 'failover') {
      if (!this.#standby.has(id)) {
        const where = this.#replicas.has(id) ? 'this daemon sends it; run failover on the standby' : 'no such replica here';
        throw new BdsnapError('ENOENT', `replica ${id} is not received by this daemon (${where})`);
      }
      return this.#standby.failover(id);
    }
    if (!this.#replicas.has(id)) {
      if (action === 'remove' && this.#standby.has(id)) return this.#standby.remove(id, { force });
      throw new BdsnapError('ENOENT', `no replica ${id} on this daemon`);
    }
    switch (action) {
      case 'sync': return this.#replicas.sync(id);
      case 'pause': return this.#replicas.pause(id);
      case 'resume': return this.#replicas.resume(id);
      case 'remove': return this.#replicas.remove(id, { force });
    }
  }

  #receive(request: RequestOf<'replica-receive'>): Promise<ReplicaReceiveReply> {
    if (request.action === 'begin') {
      if (!request.devices || request.point === undefined) throw new BdsnapError('EINVAL', 'replica-receive begin needs devices and point');
      return this.#standby.begin(request.replica, request.devices, request.point);
    }
    if (request.token === undefined) throw new BdsnapError('EINVAL', `replica-receive ${request.action} needs the sync's token`);
    return request.action === 'commit' ? this.#standby.commit(request.replica, request.token, request.full ?? []) : this.#standby.abort(request.replica, request.token);
  }

  /** A change-map operation on a registered device, answered with the device's name and size. */
  async #cbt(device: string, fn: (devicePath: string, sizeBytes: number, tracking: ChangeTracker) => Promise<ChangeMapInfo>): Promise<CbtInfo & Record<string, unknown>> {
    const tracking = this.#tracking;
    if (!tracking) throw new BdsnapError('ENOTSUP', 'change tracking is off in this daemon (started with --no-change-tracking)');
    const devicePath = await canonicalDevicePath(device);
    if (!this.#registry.get(devicePath)) {
      throw new BdsnapError('ENOENT', `${devicePath} is not registered with bdsnap (mount it, snapshot it or serve it once first)`);
    }
    const att = this.#table.use(devicePath);
    let sizeBytes = att?.file.size;
    if (sizeBytes === undefined) {
      const file = await FileDevice.open(devicePath, { readOnly: true, shared: true });
      sizeBytes = file.size;
      await file.close();
    }
    const info = await fn(devicePath, sizeBytes, tracking);
    return { device: devicePath, ...info };
  }

  async #passwd(newPassword: string, currentPassword: string | undefined): Promise<{ changed: boolean }> {
    const hadOne = await this.#passwords.isSet();
    try {
      await this.#passwords.set(newPassword, currentPassword);
    } catch (err) {
      if (err instanceof BdsnapError && err.code === 'EAUTH') this.#log.warn({ event: 'auth-failed', op: 'passwd' }, 'service password check failed');
      throw err;
    }
    this.#log.info({ event: hadOne ? 'password-changed' : 'password-set' }, hadOne ? 'service password changed' : 'service password set');
    return { changed: hadOne };
  }

  async #authenticate(op: string, password: string): Promise<void> {
    try {
      await this.#passwords.verify(password);
    } catch (err) {
      // The event only: never the password, never what was typed.
      this.#log.warn({ event: 'auth-failed', op }, 'service password check failed');
      throw err;
    }
  }

  async #activation(device: string, password: string, active: boolean): Promise<ActivationResult> {
    await this.#authenticate(active ? 'activate' : 'deactivate', password);
    const registry = this.#registry;
    // A registered image that has since been deleted can still be deactivated by its name.
    const devicePath = await canonicalDevicePath(device).catch((err: unknown) => {
      if (!active && registry.get(path.resolve(device))) return path.resolve(device);
      throw err;
    });
    if (!registry.get(devicePath)) {
      if (!active) return { device: devicePath, active: false, changed: false, sessionContinues: null };
      await registry.register(devicePath);
    }
    const changed = await registry.setActive(devicePath, active);
    const current = this.#status().devices.find((d) => d.device === devicePath);
    const sessionContinues = !active && current?.inSession ? current.currentSession ?? '(no write yet)' : null;
    if (changed) {
      this.#log.info({ event: active ? 'activate' : 'deactivate', device: devicePath, ...(sessionContinues ? { sessionContinues } : {}) },
        active ? 'device activated' : 'device deactivated');
    }
    const warnings = active ? await this.#servingWarnings(devicePath) : [];
    const restore = active ? await this.#instant.infoOf(devicePath) : undefined;
    return {
      device: devicePath, active, changed, sessionContinues, ...(warnings.length > 0 ? { warnings } : {}),
      ...(restore ? { sessions: describeRestoreSessions(restore) } : {}),
    };
  }

  /**
   * An image in a directory others can write can be swapped for another file between opens:
   * FileDevice refuses a link there and a file that is not the registered one, but the operator
   * should move the image somewhere only root can change.
   */
  async #servingWarnings(devicePath: string): Promise<string[]> {
    const warnings: string[] = [];
    const why = await whyOthersCanRename(devicePath);
    if (why !== undefined) {
      const warning = `${devicePath} can be replaced by another user (${why}): move it to a directory only root can write`;
      this.#log.warn({ event: 'device-path-unsafe', device: devicePath, reason: why }, warning);
      warnings.push(warning);
    }
    // Activation opens nothing, but every hold refuses while another process writes it (in-use.ts): said now.
    const writers = await otherWritersOf(devicePath).catch((err: unknown) => (err as Error).message);
    if (typeof writers === 'string') warnings.push(writers);
    else if (writers.length > 0) {
      const one = processCount(writers) === 1;
      warnings.push(`${devicePath} is open for writing by ${describeWriters(writers)}: bdsnap will not mount, snapshot or serve it until ${one ? 'that process lets' : 'those processes let'} go`);
    }
    return warnings;
  }

  #status(): StatusResult {
    const devices = this.#table.status((d) => this.#snapshots.snapshotsOf(d))
      .map((d) => ({ ...d, ...this.#instant.attachmentOf(d.device), imageMounts: this.#mounts.imageMountsOf(d.device), asOfViews: this.#asOf.viewsOf(d.device) }));
    return { runDir: this.runDir, snapshotRoot: this.#snapshotRoot, pid: process.pid, devices, restores: this.#instant.list(), replicas: this.#replicas.list() };
  }

  async #list(device?: string): Promise<ListResult> {
    let devicePath: string | undefined;
    if (device !== undefined) {
      devicePath = await canonicalDevicePath(device).catch(() => path.resolve(device));
    }
    const sessions = await listSessions(this.#snapshotRoot, devicePath);
    // An open session's manifest is written at its end; until then the live figure is the table's.
    const live = new Map(this.#status().devices.filter((d) => d.currentSession !== null).map((d) => [d.currentSession, d.bytesPreserved]));
    // A finished restore lists in its journal every session it undid (see snapshot/restore/journal.ts).
    const undoneAt = new Map<string, string>();
    for (const s of sessions) {
      if (s.state === 'unreadable') continue;
      const journal = await readJournal(path.join(s.dir, JOURNAL_FILE), s.devicePath).catch((err: unknown) => {
        this.#log.warn({ event: 'restore-journal-unreadable', sessionDir: s.dir, reason: (err as Error).message }, 'cannot read a restore journal; list shows its sessions as not undone');
        return undefined;
      });
      if (journal?.state === 'done') for (const dir of journal.sessions) undoneAt.set(dir, journal.finishedAt ?? journal.startedAt);
    }
    const out: SessionListEntry[] = [];
    for (const s of sessions) {
      out.push({
        dir: s.dir, device: s.devicePath, mountTime: s.mountTime || null, endTime: s.endTime, state: s.state,
        preservedBytes: live.get(s.dir) ?? s.preservedBytes, sizeBytes: await directoryBytes(s.dir),
        undoneAt: undoneAt.get(s.dir) ?? null,
      });
    }
    return { sessions: out };
  }
}

/** Start a daemon (see Daemon). */
export function startDaemon(options: DaemonOptions): Promise<Daemon> {
  return Daemon.start(options);
}

/**
 * A session still 'active' on disk was open when a daemon died: recover it (cut a torn tail,
 * rebuild the index, mark it interrupted) so it stays restorable and is never reopened.
 */
async function recoverOpenSessions(registry: Registry, snapshotRoot: string, log: Logger): Promise<void> {
  for (const device of registry.list()) {
    const dirs = new Set<string>();
    for (const s of await listSessions(snapshotRoot, device.path)) if (s.state === 'active') dirs.add(s.dir);
    if (device.currentSession && fs.existsSync(device.currentSession)) dirs.add(device.currentSession);
    for (const dir of dirs) {
      try {
        const info = await recoverSession(dir);
        log.warn({ event: 'session-recovered', device: device.path, sessionDir: dir, state: info.state, ...(info.recovery ? { recovery: info.recovery } : {}) },
          'session left open by a previous daemon recovered');
      } catch (err) {
        if (err instanceof BdsnapError && err.code === 'EBUSY') {
          // Another process (a daemon with this snapshot root) still writes it: not ours to end.
          log.warn({ event: 'session-in-use', device: device.path, sessionDir: dir, reason: err.message }, 'a session marked active is still open by another process; left as it is');
          continue;
        }
        log.error({ event: 'session-recovery-failed', device: device.path, sessionDir: dir, reason: (err as Error).message }, 'cannot recover a session');
      }
      await registry.sessionEnded(device.path, dir);
    }
    if (device.currentSession && !fs.existsSync(device.currentSession)) await registry.sessionVanished(device.path, device.currentSession);
  }
}

async function directoryBytes(dir: string): Promise<number> {
  let total = 0;
  try {
    for (const name of await fs.promises.readdir(dir)) {
      const st = await fs.promises.stat(path.join(dir, name)).catch(() => undefined);
      if (st?.isFile()) total += st.size;
    }
  } catch {
    // A session directory that vanished meanwhile counts as empty.
  }
  return total;
}

/**
 * A root daemon's core dump would hold passwords as they arrived, decrypted repository keys and
 * device content, readable by whoever reads the dump. Without libc the daemon goes on (its
 * control socket fails closed anyway) and says so; systemd's LimitCORE=0 covers the unit.
 */
function disableCoreDumps(log: Logger): void {
  const libc = loadLibc();
  try {
    if (libc === undefined) throw new Error(libcUnavailableReason() ?? 'libc is not available');
    libc.disableCoreDumps();
  } catch (err) {
    log.warn({ event: 'core-dumps-enabled', reason: (err as Error).message }, 'cannot disable core dumps of the daemon');
  }
}

/** The source of an instant restore: one device of a backup in a repository. */
const openBackupSource: SourceOpener = async (repoSpec, backup, device, password) => {
  const store = await openRepoStore(repoSpec);
  // The only check of the password (the command leaves it to the daemon): nothing is written
  // before it, not even the lock. Without one, an encrypted repository is refused saying how to give it.
  const repo = await Repository.open(store, { password: () => password ?? '' });
  // The manifest is read while the lock is taken: prune changes no manifest. The index is read
  // only once the lock is held (openBackupDevices), so that no prune can have moved a piece since.
  const manifest = repo.manifest(backup);
  manifest.catch(() => undefined);
  // Held like a running backup's for as long as the restore reads: prune must not delete its packs.
  const lock = await RepoLock.acquire(store, 'create', { purpose: 'instant-restore', backup });
  try {
    const opened = await openBackupDevices(repo, backup, { manifest });
    const found = opened.devices.find((d) => d.name === device);
    if (!found) {
      await opened.close();
      throw new BdsnapError('ENOENT', `backup ${backup} has no device ${device} (it has ${opened.devices.map((d) => d.name).join(', ')})`);
    }
    return {
      source: found.device, slots: found.slots, pieceBytes: found.pieceBytes, fetchPieces: opened.fetchPieces, placePiece: opened.placePiece,
      refresh: opened.refresh, encrypted: repo.encrypted,
      close: async () => {
        await opened.close();
        await lock.release().catch(() => undefined);
      },
    };
  } catch (err) {
    await lock.release().catch(() => undefined);
    throw err;
  }
};
