/**
 * The persisted registry of devices, `<state-dir>/registry.json`, replaced atomically on
 * every change. It is the daemon's memory across restarts: which devices root registered
 * (only those are served), which are active, the session directories each has had, the
 * session open right now (so a restart after a crash can recover it), and whether anything
 * wrote to the device outside a session (restore must know the device moved on).
 *
 * A device is one device whatever names it: each record keeps the identity of what its name
 * named when last registered or opened (host/device-stamp.ts), and a second name of a
 * registered device (a hard link, a bind-mounted path, another node of the same disk) is
 * refused, at registration and at every open, rather than resolved to the first name: whoever
 * typed it gets told which name the device goes by, and no second change map, session chain
 * or export appears behind a name that only happens to reach the same bytes today.
 */

import fs from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import { BdsnapError } from '../errors.js';
import { writeFileAtomic } from '../host/atomic-file.js';
import { followedSafely } from '../host/private-dir.js';
import { readJsonFile } from '../stored-json.js';
import { readDeviceIdentity, sameIdentity, stampIdentitySchema, type StampIdentity } from '../host/device-stamp.js';
import type { RegisterResult } from './control-protocol.js';
import { KeyedQueue, SerialQueue } from '../serial-queue.js';
import { listLoopDevices, loopBackingIdentity } from '../host/loop-devices.js';

export const REGISTRY_FILE = 'registry.json';
const REGISTRY_VERSION = 1;

const deviceSchema = z.object({
  path: z.string().min(1),
  active: z.boolean(),
  /** ISO time of the last activation or deactivation. */
  changedAt: z.string(),
  sessions: z.array(z.string()),
  currentSession: z.string().nullable(),
  dirtyOutsideSession: z.boolean(),
  /** ISO time of the first write outside a session since the flag was last cleared. */
  dirtySince: z.string().nullable(),
  /** What the name named when last registered or opened; absent in registries written before it was kept. */
  identity: stampIdentitySchema.optional(),
});
export type DeviceRecord = z.infer<typeof deviceSchema>;

const fileSchema = z.object({
  version: z.literal(REGISTRY_VERSION),
  devices: z.array(deviceSchema),
});

/**
 * The canonical name of a device: its real path, which must be a regular file or a block
 * device. Throws ENOENT or EINVAL with a message naming the path.
 */
export async function canonicalDevicePath(devicePath: string): Promise<string> {
  if (typeof devicePath !== 'string' || devicePath.length === 0) throw new BdsnapError('EINVAL', 'a device path is required');
  let real: string;
  try {
    real = await fs.promises.realpath(path.resolve(devicePath));
  } catch (err) {
    throw new BdsnapError('ENOENT', `no such device: ${devicePath}`, { cause: err });
  }
  const st = await fs.promises.stat(real);
  if (!st.isFile() && !st.isBlockDevice()) {
    throw new BdsnapError('EINVAL', `${devicePath} is neither a regular image file nor a block device`);
  }
  // A link another user can replace could have named any device or file.
  return followedSafely(devicePath, real);
}

/**
 * The control operation `register`: the device (canonicalised) becomes known to the daemon,
 * which then serves it over NBD; a new one starts inactive. `mount` and the sffs commands
 * through the daemon do this first. Errors: ENOENT, EINVAL.
 */
export async function registerDevice(registry: Registry, device: string): Promise<RegisterResult> {
  const devicePath = await canonicalDevicePath(device);
  const added = registry.get(devicePath) === undefined;
  const record = await registry.register(devicePath);
  return { device: devicePath, added, active: record.active };
}

/** Read a registry file without a daemon (for offline tools). Missing file: no devices. */
export async function readRegistry(stateDir: string): Promise<DeviceRecord[]> {
  const file = path.join(stateDir, REGISTRY_FILE);
  const stored = await readJsonFile(file, fileSchema, (problem) => `${file} is damaged: ${problem}`);
  return stored?.devices ?? [];
}

export class Registry {
  readonly #file: string;
  readonly #devices = new Map<string, DeviceRecord>();
  /** Saves run one after another so an older snapshot never overwrites a newer one. */
  readonly #saving = new SerialQueue();
  /** Registrations and identity claims one at a time: two names of one file racing must not both get in. */
  readonly #claims = new KeyedQueue();

  private constructor(stateDir: string, devices: DeviceRecord[]) {
    this.#file = path.join(stateDir, REGISTRY_FILE);
    for (const d of devices) this.#devices.set(d.path, d);
  }

  static async load(stateDir: string): Promise<Registry> {
    return new Registry(stateDir, await readRegistry(stateDir));
  }

  get(devicePath: string): Readonly<DeviceRecord> | undefined {
    return this.#devices.get(devicePath);
  }

  list(): ReadonlyArray<Readonly<DeviceRecord>> {
    return [...this.#devices.values()].sort((a, b) => a.path.localeCompare(b.path));
  }

  /**
   * Add a device (inactive) if it is not there yet. `devicePath` must be canonical. Errors:
   * EINVAL when another registered name names the same device now, ENOENT.
   */
  async register(devicePath: string): Promise<Readonly<DeviceRecord>> {
    return this.#claims.run('', async () => {
      const identity = await readDeviceIdentity(devicePath);
      await this.#refuseSecondName(devicePath, identity);
      let record = this.#devices.get(devicePath);
      if (!record) {
        record = {
          path: devicePath, active: false, changedAt: new Date().toISOString(), sessions: [], currentSession: null,
          dirtyOutsideSession: false, dirtySince: null, identity,
        };
        this.#devices.set(devicePath, record);
        await this.#save();
      } else {
        await this.#recordIdentity(record, identity);
      }
      return record;
    });
  }

  /**
   * The registered `devicePath` was opened and is `identity`: refuse (EINVAL) if another
   * registered name names that device now; record it. Returns the identity recorded before when
   * the name now names something else (the file was replaced), for the caller to report.
   */
  async claimIdentity(devicePath: string, identity: StampIdentity): Promise<StampIdentity | undefined> {
    return this.#claims.run('', async () => {
      const record = this.#require(devicePath);
      await this.#refuseSecondName(devicePath, identity);
      const before = record.identity;
      await this.#recordIdentity(record, identity);
      return before !== undefined && !sameIdentity(before, identity) ? before : undefined;
    });
  }

  async #refuseSecondName(devicePath: string, identity: StampIdentity): Promise<void> {
    // A loop device and the file behind it are one device too: served under both names, the
    // same bytes would get two change maps and two session chains.
    const backing = await loopBackingOf(identity);
    for (const other of this.#devices.values()) {
      if (other.path === devicePath) continue;
      // Every first open comes here: a record whose identity is known to be another device (and
      // not a loop device over this file, or the file under this loop device) costs no I/O.
      const rec = other.identity;
      if (rec !== undefined && !sameIdentity(rec, identity) && !(backing !== undefined && sameIdentity(rec, backing))
        && !(identity.kind === 'file' && rec.kind === 'block')) continue;
      const otherNow = await readDeviceIdentity(other.path).catch(() => undefined);
      if (otherNow !== undefined) {
        const otherBacking = await loopBackingOf(otherNow);
        if ((backing && sameIdentity(backing, otherNow)) || (otherBacking && sameIdentity(otherBacking, identity))) {
          const [loop, file] = backing ? [devicePath, other.path] : [other.path, devicePath];
          throw new BdsnapError('EINVAL', `${loop} is a loop device over ${file}, and the other one is registered already: the two are one device; use ${other.path}`);
        }
      }
      // The other name holds the device if it names it now and did when it was recorded: a
      // stale record (a deleted file whose inode was reused) locks nobody out, and of two
      // names registered apart and then linked, the one that was replaced is the second name.
      const now = otherNow;
      if (now === undefined || !sameIdentity(now, identity)) continue;
      if (other.identity !== undefined && !sameIdentity(other.identity, identity)) continue;
      const what = identity.kind === 'file' ? 'file' : `block device (${identity.majorMinor})`;
      throw new BdsnapError('EINVAL', `${devicePath} is the same ${what} as the registered ${other.path}; use that name`);
    }
  }

  async #recordIdentity(record: DeviceRecord, identity: StampIdentity): Promise<void> {
    if (record.identity !== undefined && sameIdentity(record.identity, identity)) return;
    record.identity = identity;
    await this.#save();
  }

  /** Returns false when the device was already in that state (nothing written). */
  async setActive(devicePath: string, active: boolean): Promise<boolean> {
    const record = this.#require(devicePath);
    if (record.active === active) return false;
    record.active = active;
    record.changedAt = new Date().toISOString();
    await this.#save();
    return true;
  }

  /** Record the directory of the session now open on the device. */
  async sessionStarted(devicePath: string, sessionDir: string): Promise<void> {
    const record = this.#require(devicePath);
    record.currentSession = sessionDir;
    if (!record.sessions.includes(sessionDir)) record.sessions.push(sessionDir);
    await this.#save();
  }

  async sessionEnded(devicePath: string, sessionDir: string): Promise<void> {
    const record = this.#require(devicePath);
    if (!record.sessions.includes(sessionDir)) record.sessions.push(sessionDir);
    if (record.currentSession === sessionDir) record.currentSession = null;
    await this.#save();
  }

  /** A recorded session directory that no longer exists (removed by hand): forget it. */
  async sessionVanished(devicePath: string, sessionDir: string): Promise<void> {
    const record = this.#require(devicePath);
    record.sessions = record.sessions.filter((d) => d !== sessionDir);
    if (record.currentSession === sessionDir) record.currentSession = null;
    await this.#save();
  }

  async markDirtyOutsideSession(devicePath: string): Promise<void> {
    const record = this.#require(devicePath);
    if (record.dirtyOutsideSession) return;
    record.dirtyOutsideSession = true;
    record.dirtySince = new Date().toISOString();
    await this.#save();
  }

  #require(devicePath: string): DeviceRecord {
    const record = this.#devices.get(devicePath);
    if (!record) throw new BdsnapError('ENOENT', `${devicePath} is not registered with bdsnap`);
    return record;
  }

  #save(): Promise<void> {
    const text = `${JSON.stringify({ version: REGISTRY_VERSION, devices: this.list() }, null, 2)}\n`;
    return this.#saving.run(() => writeFileAtomic(this.#file, text, 0o600));
  }
}

/**
 * The file behind a loop device of `identity`, or undefined (not a loop device, or not bound).
 * Errors: EIO when the loop device's file cannot be told (fail closed: the caller refuses).
 */
async function loopBackingOf(identity: StampIdentity): Promise<StampIdentity | undefined> {
  if (identity.kind !== 'block') return undefined;
  const loop = (await listLoopDevices()).find((l) => l.majorMinor === identity.majorMinor);
  if (!loop) return undefined;
  const backing = await loopBackingIdentity(loop);
  return backing ? { kind: 'file', dev: String(backing.dev), ino: String(backing.ino) } : undefined;
}
