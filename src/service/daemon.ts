/**
 * The bdsnap daemon: the registry, the NBD server on `<run-dir>/nbd.sock` serving registered
 * devices only, and the control API on `<run-dir>/control.sock`.
 *
 * Start-up order matters: the registry is read and any session left open by a daemon that
 * died is recovered (marked interrupted, still restorable) before the NBD server accepts a
 * client, so no new session can be opened on top of an unrecovered one.
 * close() (SIGTERM) stops taking requests, unmounts what bdsnap mounted, lets the NBD server
 * finish its requests in flight, and ends every session durably.
 */

import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { BdsnapError, toBdsnapError } from '../errors.js';
import { NbdServer } from '../nbd/server.js';
import { listSessions, recoverSession } from '../snapshot/sessions.js';
import { writeFileAtomic } from '../host/atomic-file.js';
import { ensurePrivateDir } from '../host/private-dir.js';
import { PasswordStore } from './auth.js';
import { CONTROL_SOCKET, NBD_SOCKET } from './client.js';
import {
  PROTOCOL_VERSION, type ActivationResult, type ListResult, type MountResult, type Request, type SessionListEntry, type StatusResult,
  type UmountResult,
} from './control-protocol.js';
import { ControlServer } from './control-server.js';
import { DeviceTable, type SessionSettings } from './device-table.js';
import { attachAndMount, cleanUpStaleMounts, toRecord, unmountAndDetach, type AttachedMount } from './mount.js';
import { Registry, canonicalDevicePath, registerDevice } from './registry.js';

export const DEFAULT_STATE_DIR = '/var/lib/bdsnap';
/** In the run directory: the mounts this daemon made, so a successor can clean up after a crash. */
const MOUNTS_FILE = 'mounts.json';

export interface DaemonOptions {
  runDir: string;
  stateDir: string;
  snapshotRoot: string;
  log: Logger;
  session?: SessionSettings;
  /** How long umount waits for other NBD clients of the device to let go. Default 30 s. */
  detachTimeoutMs?: number;
}

export interface Daemon {
  readonly runDir: string;
  readonly controlSocket: string;
  readonly nbdSocket: string;
  close(): Promise<void>;
}

interface MountRecord {
  devicePath: string;
  attached: AttachedMount;
}

export async function startDaemon(options: DaemonOptions): Promise<Daemon> {
  const runDir = path.resolve(options.runDir);
  const stateDir = path.resolve(options.stateDir);
  const snapshotRoot = path.resolve(options.snapshotRoot);
  const log = options.log;
  await ensurePrivateDir(runDir, 0o700);
  await ensurePrivateDir(stateDir, 0o700);
  await fs.promises.mkdir(snapshotRoot, { recursive: true, mode: 0o700 });

  const mountsFile = path.join(runDir, MOUNTS_FILE);
  await cleanUpStaleMounts(mountsFile, log);
  const registry = await Registry.load(stateDir);
  await recoverOpenSessions(registry, snapshotRoot, log);
  const passwords = new PasswordStore(stateDir);
  const table = new DeviceTable(registry, snapshotRoot, log, options.session);
  const mounts = new Map<string, MountRecord>();
  const mountsStarting = new Set<string>();
  const workDir = path.join(runDir, 'mounts');
  const nbdSocket = path.join(runDir, NBD_SOCKET);
  const controlSocket = path.join(runDir, CONTROL_SOCKET);
  const detachTimeoutMs = options.detachTimeoutMs ?? 30000;
  const saveMounts = (): Promise<void> =>
    writeFileAtomic(mountsFile, `${JSON.stringify([...mounts.values()].map((m) => toRecord(m.devicePath, m.attached)))}\n`, 0o600);

  const nbd = new NbdServer({ exports: table, log: (event) => log.debug({ ...event, nbd: true }) });
  await nbd.listenUnix(nbdSocket);

  const authenticate = async (op: string, password: string): Promise<void> => {
    try {
      await passwords.verify(password);
    } catch (err) {
      // The event only: never the password, never what was typed.
      log.warn({ event: 'auth-failed', op }, 'service password check failed');
      throw err;
    }
  };

  const activation = async (device: string, password: string, active: boolean): Promise<ActivationResult> => {
    await authenticate(active ? 'activate' : 'deactivate', password);
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
    const current = table.status().find((d) => d.device === devicePath);
    const sessionContinues = !active && current?.inSession ? current.currentSession ?? '(no write yet)' : null;
    if (changed) {
      log.info({ event: active ? 'activate' : 'deactivate', device: devicePath, ...(sessionContinues ? { sessionContinues } : {}) },
        active ? 'device activated' : 'device deactivated');
    }
    return { device: devicePath, active, changed, sessionContinues };
  };

  const status = (): StatusResult => ({ runDir, snapshotRoot, pid: process.pid, devices: table.status() });

  const list = async (device?: string): Promise<ListResult> => {
    let devicePath: string | undefined;
    if (device !== undefined) {
      devicePath = await canonicalDevicePath(device).catch(() => path.resolve(device));
    }
    const sessions = await listSessions(snapshotRoot, devicePath);
    const out: SessionListEntry[] = [];
    for (const s of sessions) {
      out.push({
        dir: s.dir, device: s.devicePath, mountTime: s.mountTime || null, endTime: s.endTime, state: s.state,
        preservedBytes: s.preservedBytes, sizeBytes: await directoryBytes(s.dir),
      });
    }
    return { sessions: out };
  };

  const mount = async (device: string, mountpointArg: string, type?: string, mountOptions?: string): Promise<MountResult> => {
    const devicePath = await canonicalDevicePath(device);
    const mountpoint = path.resolve(mountpointArg);
    if (mounts.has(mountpoint) || mountsStarting.has(mountpoint)) throw new BdsnapError('EBUSY', `bdsnap already mounts something on ${mountpoint}`);
    mountsStarting.add(mountpoint);
    try {
      await registry.register(devicePath);
      const att = await table.attach(devicePath, { exclusive: true, mountTime: new Date(), holder: 'mount' });
      table.setMount(devicePath, { mountpoint, loopDevice: null });
      let attached: AttachedMount;
      try {
        await ensurePrivateDir(workDir, 0o700);
        attached = await attachAndMount({
          nbdSocket, exportName: devicePath, mountpoint, workDir,
          ...(type !== undefined ? { type } : {}), ...(mountOptions !== undefined ? { options: mountOptions } : {}),
        });
      } catch (err) {
        const e = toBdsnapError(err);
        log.error({ event: 'mount-failed', device: devicePath, mountpoint, code: e.code, reason: e.message }, 'mount failed');
        table.setMount(devicePath, undefined);
        await table.detach(devicePath);
        await att.ended.catch(() => undefined);
        throw e;
      }
      table.setMount(devicePath, { mountpoint, loopDevice: attached.blockDevice });
      mounts.set(mountpoint, { devicePath, attached });
      await saveMounts().catch((err: unknown) => {
        log.error({ event: 'mounts-file-write-failed', reason: (err as Error).message }, 'cannot record the mount in the run directory');
      });
      log.info({ event: 'mount', device: devicePath, mountpoint, blockDevice: attached.blockDevice, via: attached.via, session: att.cow !== undefined },
        'device mounted');
      return { device: devicePath, mountpoint, loopDevice: attached.blockDevice, inSession: att.cow !== undefined };
    } finally {
      mountsStarting.delete(mountpoint);
    }
  };

  const umount = async (mountpointArg: string): Promise<UmountResult> => {
    const mountpoint = path.resolve(mountpointArg);
    const record = mounts.get(mountpoint);
    if (!record) throw new BdsnapError('ENOENT', `bdsnap has nothing mounted on ${mountpoint}`);
    const sessionDir = await endMount(mountpoint, record);
    return { device: record.devicePath, mountpoint, sessionDir };
  };

  /** Unmount, detach, drop the mount's hold, and wait until the session is closed and durable. */
  const endMount = async (mountpoint: string, record: MountRecord): Promise<string | null> => {
    const att = table.attachment(record.devicePath);
    try {
      await unmountAndDetach(record.attached);
    } catch (err) {
      const e = toBdsnapError(err);
      log.error({ event: 'umount-failed', device: record.devicePath, mountpoint, code: e.code, reason: e.message }, 'unmount failed');
      throw e;
    }
    mounts.delete(mountpoint);
    await saveMounts().catch((err: unknown) => {
      log.error({ event: 'mounts-file-write-failed', reason: (err as Error).message }, 'cannot record the unmount in the run directory');
    });
    table.setMount(record.devicePath, undefined);
    await table.detach(record.devicePath);
    if (!att) return null;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_resolve, reject) => {
      timer = setTimeout(() => reject(new BdsnapError('EBUSY',
        `${mountpoint} is unmounted, but other NBD clients still hold ${record.devicePath}; its session ends when they disconnect`)), detachTimeoutMs);
    });
    try {
      const sessionDir = await Promise.race([att.ended, timeout]);
      log.info({ event: 'umount', device: record.devicePath, mountpoint, sessionDir }, 'device unmounted');
      return sessionDir;
    } finally {
      clearTimeout(timer);
    }
  };

  const handle = async (request: Request): Promise<unknown> => {
    switch (request.op) {
      case 'ping':
        return { pid: process.pid, version: PROTOCOL_VERSION, passwordSet: await passwords.isSet() };
      case 'passwd': {
        const hadOne = await passwords.isSet();
        try {
          await passwords.set(request.newPassword, request.currentPassword);
        } catch (err) {
          if (err instanceof BdsnapError && err.code === 'EAUTH') log.warn({ event: 'auth-failed', op: 'passwd' }, 'service password check failed');
          throw err;
        }
        log.info({ event: hadOne ? 'password-changed' : 'password-set' }, hadOne ? 'service password changed' : 'service password set');
        return { changed: hadOne };
      }
      case 'activate':
        return activation(request.device, request.password, true);
      case 'deactivate':
        return activation(request.device, request.password, false);
      case 'status':
        return status();
      case 'list':
        return list(request.device);
      case 'mount':
        return mount(request.device, request.mountpoint, request.type, request.options);
      case 'umount':
        return umount(request.mountpoint);
      case 'register':
        return registerDevice(registry, request.device);
    }
  };

  const control = await ControlServer.listen(controlSocket, handle, log);
  log.info({ event: 'daemon-started', runDir, stateDir, snapshotRoot, devices: registry.list().length }, 'bdsnap daemon started');

  let closing: Promise<void> | undefined;
  const close = (): Promise<void> => {
    closing ??= (async () => {
      log.info({ event: 'daemon-stopping' }, 'bdsnap daemon stopping');
      await control.close();
      for (const [mountpoint, record] of [...mounts]) {
        await endMount(mountpoint, record).catch((err: unknown) => {
          log.error({ event: 'shutdown-umount-failed', mountpoint, reason: (err as Error).message }, 'could not unmount at shutdown');
        });
      }
      await nbd.close();
      await table.closeAll();
      await fs.promises.rm(controlSocket, { force: true });
      await fs.promises.rm(nbdSocket, { force: true });
      log.info({ event: 'daemon-stopped' }, 'bdsnap daemon stopped');
    })();
    return closing;
  };

  return { runDir, controlSocket, nbdSocket, close };
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
