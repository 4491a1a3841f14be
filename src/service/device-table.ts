/**
 * The daemon's live view of registered devices: what the NBD server may serve and the
 * session lifecycle around each attach.
 *
 * - Only registered devices are served; any other export name is unknown to the server.
 * - An attachment is one open FileDevice shared by every holder (NBD connections and a
 *   `bdsnap mount`), so multi-conn clients see one device. It exists while holders remain, so
 *   the device lock is free (and offline restore possible) whenever nothing is attached.
 * - The first holder decides the session: an active device gets a CowDevice (the session
 *   directory appears on the first modifying request); an inactive one is served through a
 *   DirtyTracker. When the last holder lets go, the session is closed durably, then the file.
 *   So deactivating mid-mount lets the current session run to the unmount and no further.
 * - Attach and release of one device run one at a time (a per-device queue), so a release
 *   closing a session never races an attach opening the next one.
 */

import type { Logger } from 'pino';
import type { BlockDevice } from '../device/block-device.js';
import { FileDevice } from '../device/file-device.js';
import { BdsnapError, toBdsnapError } from '../errors.js';
import type { ExportHandle, ExportProvider } from '../nbd/exports.js';
import { CowDevice, type SessionSummary as CowSessionSummary } from '../snapshot/cow-device.js';
import type { DeviceStatus } from './control-protocol.js';
import { DirtyTracker } from '../device/dirty-tracker.js';
import type { Registry } from './registry.js';

export interface SessionSettings {
  chunkSize?: number;
  durability?: 'process' | 'strict';
  sizeLimitBytes?: number;
}

export interface AttachOptions {
  /** Refuse (EBUSY) if anything holds the device already: used by `bdsnap mount`. */
  exclusive?: boolean;
  /** The session's mount time (names its directory); default now. */
  mountTime?: Date;
  /** Who holds it, for logs. */
  holder: 'connection' | 'mount';
}

export interface MountInfo {
  mountpoint: string;
  loopDevice: string | null;
}

export interface Attachment {
  readonly devicePath: string;
  readonly file: FileDevice;
  readonly top: BlockDevice;
  readonly cow: CowDevice | undefined;
  holds: number;
  connections: number;
  sessionDir: string | null;
  mount: MountInfo | undefined;
  /** Settles when the attachment has ended (session durable, file closed), with the session dir. */
  readonly ended: Promise<string | null>;
  readonly settle: (result: { dir: string | null } | { error: unknown }) => void;
}

function endSignal(): Pick<Attachment, 'ended' | 'settle'> {
  let settle!: Attachment['settle'];
  const ended = new Promise<string | null>((resolve, reject) => {
    settle = (result) => ('error' in result ? reject(result.error) : resolve(result.dir));
  });
  // Nobody may be waiting; an unobserved failure is already logged by #end.
  ended.catch(() => undefined);
  return { ended, settle };
}

export class DeviceTable implements ExportProvider {
  readonly #registry: Registry;
  readonly #snapshotRoot: string;
  readonly #log: Logger;
  readonly #session: SessionSettings;
  readonly #attachments = new Map<string, Attachment>();
  readonly #queues = new Map<string, Promise<unknown>>();

  constructor(registry: Registry, snapshotRoot: string, log: Logger, session: SessionSettings = {}) {
    this.#registry = registry;
    this.#snapshotRoot = snapshotRoot;
    this.#log = log;
    this.#session = session;
  }

  async list(): Promise<string[]> {
    return this.#registry.list().map((d) => d.path);
  }

  async open(name: string, purpose: 'info' | 'go'): Promise<ExportHandle | undefined> {
    if (!this.#registry.get(name)) {
      this.#log.warn({ event: 'export-refused', export: name }, 'NBD client asked for an export that is not registered');
      return undefined;
    }
    if (purpose === 'info') {
      const attached = this.#attachments.get(name);
      if (attached) return { name, device: attached.top, release: async () => {} };
      // Only the size and flags are needed: a shared read-only handle leaves the lock alone.
      const file = await FileDevice.open(name, { readOnly: true, shared: true });
      return { name, device: file, release: () => file.close() };
    }
    const att = await this.attach(name, { holder: 'connection' });
    att.connections++;
    let released = false;
    return {
      name,
      device: att.top,
      release: async () => {
        if (released) return;
        released = true;
        att.connections--;
        await this.detach(name);
      },
    };
  }

  attachment(devicePath: string): Attachment | undefined {
    return this.#attachments.get(devicePath);
  }

  isAttached(devicePath: string): boolean {
    return this.#attachments.has(devicePath);
  }

  /** Take a hold on the device, opening it (and starting a session if active) for the first holder. */
  attach(devicePath: string, options: AttachOptions): Promise<Attachment> {
    return this.#serial(devicePath, async () => {
      const existing = this.#attachments.get(devicePath);
      if (existing) {
        if (options.exclusive) {
          const where = existing.mount ? `mounted at ${existing.mount.mountpoint}` : `attached (${existing.connections} NBD connection(s))`;
          throw new BdsnapError('EBUSY', `${devicePath} is already ${where}`);
        }
        existing.holds++;
        return existing;
      }
      const record = this.#registry.get(devicePath);
      if (!record) throw new BdsnapError('ENOENT', `${devicePath} is not registered with bdsnap`);
      const file = await FileDevice.open(devicePath);
      let att: Attachment;
      if (record.active) {
        const mountTime = options.mountTime ?? new Date();
        const cow = CowDevice.create(file, {
          devicePath,
          snapshotRoot: this.#snapshotRoot,
          mountTime,
          deviceIdentity: { ...file.identity },
          ...(this.#session.chunkSize !== undefined ? { chunkSize: this.#session.chunkSize } : {}),
          ...(this.#session.durability !== undefined ? { durability: this.#session.durability } : {}),
          ...(this.#session.sizeLimitBytes !== undefined ? { sizeLimitBytes: this.#session.sizeLimitBytes } : {}),
          onEvent: (event) => this.#onSessionEvent(att, event),
        });
        att = { devicePath, file, top: cow, cow, holds: 1, connections: 0, sessionDir: null, mount: undefined, ...endSignal() };
        this.#log.info({ event: 'attach', device: devicePath, holder: options.holder, session: true, mountTime: mountTime.toISOString() },
          'device attached under a session');
      } else {
        const tracker = new DirtyTracker(file, async () => {
          await this.#registry.markDirtyOutsideSession(devicePath);
          this.#log.warn({ event: 'dirty-outside-session', device: devicePath }, 'inactive device written outside any session');
        });
        att = { devicePath, file, top: tracker, cow: undefined, holds: 1, connections: 0, sessionDir: null, mount: undefined, ...endSignal() };
        this.#log.info({ event: 'attach', device: devicePath, holder: options.holder, session: false }, 'device attached without a session (not active)');
      }
      this.#attachments.set(devicePath, att);
      return att;
    });
  }

  /** Drop a hold; the last one ends the session durably and closes the device. Returns the session dir, if any. */
  detach(devicePath: string): Promise<string | null> {
    return this.#serial(devicePath, async () => {
      const att = this.#attachments.get(devicePath);
      if (!att) return null;
      att.holds--;
      if (att.holds > 0) return null;
      return this.#end(att);
    });
  }

  setMount(devicePath: string, mount: MountInfo | undefined): void {
    const att = this.#attachments.get(devicePath);
    if (att) att.mount = mount;
  }

  /** The device mounted at `mountpoint`, if any. */
  findMount(mountpoint: string): string | undefined {
    for (const att of this.#attachments.values()) if (att.mount?.mountpoint === mountpoint) return att.devicePath;
    return undefined;
  }

  mounts(): Array<{ devicePath: string; mount: MountInfo }> {
    return [...this.#attachments.values()].flatMap((a) => (a.mount ? [{ devicePath: a.devicePath, mount: a.mount }] : []));
  }

  status(): DeviceStatus[] {
    return this.#registry.list().map((record) => {
      const att = this.#attachments.get(record.path);
      const stats = att?.cow?.stats();
      return {
        device: record.path,
        active: record.active,
        attached: att !== undefined,
        connections: att?.connections ?? 0,
        mountpoint: att?.mount?.mountpoint ?? null,
        loopDevice: att?.mount?.loopDevice ?? null,
        currentSession: att?.cow?.sessionDir ?? att?.sessionDir ?? null,
        inSession: att?.cow !== undefined,
        bytesPreserved: stats?.preservedBytes ?? 0,
        sessionState: att?.cow?.state ?? null,
        sessionCount: record.sessions.length,
        dirtyOutsideSession: record.dirtyOutsideSession,
      };
    });
  }

  /** Shutdown: end every attachment whatever its holders (the NBD server is already closed). */
  async closeAll(): Promise<void> {
    await Promise.all([...this.#attachments.keys()].map((devicePath) => this.#serial(devicePath, async () => {
      const att = this.#attachments.get(devicePath);
      if (att) await this.#end(att);
    })));
  }

  async #end(att: Attachment): Promise<string | null> {
    try {
      const dir = await this.#endNow(att);
      att.settle({ dir });
      return dir;
    } catch (err) {
      att.settle({ error: err });
      throw err;
    }
  }

  async #endNow(att: Attachment): Promise<string | null> {
    // The attachment stays in the table (status: attached) until the session is durable and
    // the device closed and unlocked; attach() for this device queues behind us meanwhile.
    let sessionDir: string | null = null;
    try {
      if (att.cow) {
        const summary: CowSessionSummary | undefined = await att.cow.close();
        if (summary) {
          sessionDir = summary.sessionDir;
          await this.#registry.sessionEnded(att.devicePath, summary.sessionDir);
          this.#log.info({
            event: 'session-end', device: att.devicePath, sessionDir: summary.sessionDir, state: summary.state,
            preservedChunks: summary.preservedChunks, preservedBytes: summary.preservedBytes, storeBytes: summary.storeBytes,
            ...(summary.failedReason ? { reason: summary.failedReason } : {}),
          }, 'session ended');
        } else {
          this.#log.info({ event: 'session-end', device: att.devicePath, sessionDir: null }, 'session ended without any modification (no directory)');
        }
      }
    } catch (err) {
      const e = toBdsnapError(err);
      this.#log.error({ event: 'session-close-failed', device: att.devicePath, code: e.code, reason: e.message }, 'closing the session failed');
      throw e;
    } finally {
      try {
        await att.file.close();
      } finally {
        this.#attachments.delete(att.devicePath);
      }
      this.#log.info({ event: 'detach', device: att.devicePath }, 'device detached');
    }
    return sessionDir;
  }

  #onSessionEvent(att: Attachment, event: { type: string; [k: string]: unknown }): void {
    const sessionDir = typeof event.sessionDir === 'string' ? event.sessionDir : null;
    if (event.type === 'session-start' && sessionDir) {
      att.sessionDir = sessionDir;
      this.#log.info({ event: 'session-start', device: att.devicePath, sessionDir, mountTime: event.mountTime }, 'session started');
      this.#registry.sessionStarted(att.devicePath, sessionDir).catch((err: unknown) => {
        this.#log.error({ event: 'registry-write-failed', device: att.devicePath, reason: (err as Error).message }, 'cannot record the session in the registry');
      });
    } else if (event.type === 'session-failed') {
      this.#log.error({ event: 'session-failed', device: att.devicePath, sessionDir, reason: event.reason }, 'session failed; I/O goes on to the device untouched');
    } else if (event.type === 'session-error') {
      this.#log.error({ event: 'session-error', device: att.devicePath, sessionDir, reason: event.reason }, 'session error');
    }
  }

  #serial<T>(key: string, fn: () => Promise<T>): Promise<T> {
    const previous = this.#queues.get(key) ?? Promise.resolve();
    const run = previous.then(fn, fn);
    const tail = run.catch(() => undefined);
    this.#queues.set(key, tail);
    void tail.then(() => {
      if (this.#queues.get(key) === tail) this.#queues.delete(key);
    });
    return run;
  }
}
