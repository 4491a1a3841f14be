/**
 * Change-block tracking in the daemon: one ChangeMap per device, in
 * `<state-dir>/cbt/<escaped device path>.map`, and the frozen view each snapshot keeps.
 *
 * - A device's map is open while the device is open (its TrackingDevice sits right above
 *   the file, so every write is marked before it can reach the device) and closed cleanly
 *   with the device's stamp (src/host/device-stamp.ts) read after the device was flushed, so
 *   the daemon's own writes are in it: an image file's from the descriptor that was open (its
 *   name may name another file by then), a block device's after it was closed. Opening it again compares that stamp with
 *   the device's now: whatever wrote the device while the daemon did not serve it (a restore,
 *   a loop device's user, a `touch -d` after a write) moves it. A map that cannot be trusted
 *   starts a new generation, and that reset is an event saying why.
 * - `cbt` commands on a device that is not open open its map just for the answer, and close
 *   it with the stamp it was opened with: nothing of the daemon's wrote the device meanwhile,
 *   so a write by anyone else in that window still shows at the next open.
 * - A snapshot's frozen view is saved beside the snapshot (`cbt-<key>.map`) right after the
 *   take and stays attached to that file. Image writes mark the device's map (the next backup
 *   reads them again) and the frozen view, whose mark writes its entries to the file before
 *   the write is acknowledged, so a killed daemon loses none of them.
 */

import path from 'node:path';
import type { Logger } from 'pino';
import { BdsnapError } from '../errors.js';
import type { MetaContextSource } from '../nbd/exports.js';
import {
  describeIdentity, identityOfStamp, readDeviceIdentity, readDeviceStamp, sameIdentity, type DeviceStamp,
} from '../host/device-stamp.js';
import { ChangeMap, FrozenChangeMap, type ByteRange, type ChangeMapInfo, type ChangeMapReset } from '../snapshot/change-map/index.js';
import { escapeDevicePath, type Durability } from '../snapshot/format.js';
import type { EventLog } from './events.js';
import { KeyedQueue } from '../serial-queue.js';
import type { SnapshotChangeTracking } from './snapshots/tracking.js';

const CBT_DIR = 'cbt';

interface Frozen {
  view: FrozenChangeMap;
  file: string;
}

export class ChangeTracker implements SnapshotChangeTracking {
  readonly #dir: string;
  readonly #durability: Durability;
  readonly #events: EventLog;
  readonly #log: Logger;
  readonly #open = new Map<string, ChangeMap>();
  readonly #queues = new KeyedQueue();
  /** Key: `<snapshot dir>\0<device key>`. */
  readonly #frozen = new Map<string, Frozen>();
  /** Called when a device's map was reset: snapshots of a device changed outside bdsnap are void. */
  onReset: ((devicePath: string, reset: ChangeMapReset) => void) | undefined;

  constructor(stateDir: string, durability: Durability, events: EventLog, log: Logger) {
    this.#dir = path.join(stateDir, CBT_DIR);
    this.#durability = durability;
    this.#events = events;
    this.#log = log;
  }

  /**
   * Open the device's map for an attach (the caller stacks a TrackingDevice on it), with the
   * stamp of the device it opened (read after a flush, so writes others left in its page cache
   * are in it), or why that stamp cannot be read.
   */
  openMap(devicePath: string, deviceSizeBytes: number, stamp: DeviceStamp | Error, readStamp?: () => Promise<DeviceStamp | undefined>): Promise<ChangeMap> {
    return this.#serial(devicePath, () => this.#openMap(devicePath, deviceSizeBytes, stamp, readStamp));
  }

  /**
   * Before a new hold on an open device: if the daemon's own writes have settled, check that
   * nothing else wrote the image file since (a change starts a new generation, with its event).
   */
  verifyOpen(devicePath: string): Promise<void> {
    return this.#serial(devicePath, async () => this.#open.get(devicePath)?.verify());
  }

  /**
   * The device closed: close its map cleanly with `stamp`, the stamp of what was open once its
   * last write was flushed; undefined when that could not be done (the stamp may miss writes
   * still on their way, so none is recorded and the next open resets). A stamp of another
   * device than the one opened, or a name that now names another device, is a replacement
   * under the daemon's hands: the map starts again now, with an event.
   */
  closeMap(devicePath: string, stamp: DeviceStamp | Error | undefined): Promise<void> {
    return this.#serial(devicePath, () => this.#closeMap(devicePath, stamp instanceof Error || stamp === undefined ? 'unknown' : stamp));
  }

  async #openMap(devicePath: string, deviceSizeBytes: number, given?: DeviceStamp | Error, readStamp?: () => Promise<DeviceStamp | undefined>): Promise<ChangeMap> {
    const stamp = given instanceof Error ? this.#unreadable(devicePath, given) : given ?? await this.#readStamp(devicePath);
    const { map, reset } = await ChangeMap.open({
      file: this.#mapFile(devicePath), deviceSizeBytes, durability: this.#durability,
      deviceStamp: stamp instanceof Error ? null : stamp,
      onReset: (r) => this.#reported(devicePath, r),
      ...(readStamp !== undefined && !(stamp instanceof Error) && stamp.kind === 'file' ? { readStamp } : {}),
    });
    if (reset) this.#reported(devicePath, reset);
    if (stamp instanceof Error) {
      // Nothing to compare with: the map cannot be vouched for.
      this.#reported(devicePath, await map.reset('cannot-verify', `the device's stamp cannot be read: ${stamp.message}`));
    }
    this.#open.set(devicePath, map);
    return map;
  }

  /** Something wrote the open device around bdsnap (`detail` says who): its map starts again, with its event. */
  changedOutside(devicePath: string, detail: string): Promise<void> {
    return this.#serial(devicePath, async () => {
      const map = this.#open.get(devicePath);
      if (map) this.#reported(devicePath, await map.reset('changed-outside', detail));
    });
  }

  /** `stamp`: the one to record, 'opened' keeps the one read at open (the daemon did not write the device), 'unknown' records none. */
  async #closeMap(devicePath: string, stamp: DeviceStamp | 'opened' | 'unknown'): Promise<void> {
    const map = this.#open.get(devicePath);
    if (!map) return;
    this.#open.delete(devicePath);
    let recorded: DeviceStamp | null = null;
    if (stamp === 'opened') recorded = map.deviceStamp;
    if (typeof stamp === 'object') {
      const replaced = await this.#replacement(devicePath, map.deviceStamp, stamp);
      if (replaced === undefined) {
        recorded = stamp;
      } else {
        this.#reported(devicePath, await map.reset('changed-outside', replaced));
      }
    }
    await map.close(recorded);
  }

  /** Why the device closed is not the one opened, or not what its name names now; undefined when it is both. */
  async #replacement(devicePath: string, opened: DeviceStamp | null, closed: DeviceStamp): Promise<string | undefined> {
    const was = opened === null ? undefined : identityOfStamp(opened);
    const is = identityOfStamp(closed);
    if (was !== undefined && !sameIdentity(was, is)) {
      return `${devicePath} was ${describeIdentity(was)} when opened and ${describeIdentity(is)} when closed`;
    }
    const named = await readDeviceIdentity(devicePath).catch((err: unknown) => err as Error);
    if (named instanceof Error) return `${devicePath} cannot be looked at after it was closed: ${named.message}`;
    if (!sameIdentity(named, is)) {
      return `${devicePath} was replaced while the daemon held it open: it was ${describeIdentity(is)} and now names ${describeIdentity(named)}`;
    }
    return undefined;
  }

  /** The device's stamp, or why it cannot be read (logged). */
  async #readStamp(devicePath: string): Promise<DeviceStamp | Error> {
    try {
      return await readDeviceStamp(devicePath);
    } catch (err) {
      return this.#unreadable(devicePath, err as Error);
    }
  }

  #unreadable(devicePath: string, err: Error): Error {
    this.#log.warn({ event: 'cbt-stamp-unreadable', device: devicePath, reason: err.message }, 'the device\'s stamp cannot be read; its change map will start again');
    return err;
  }

  async info(devicePath: string, deviceSizeBytes: number): Promise<ChangeMapInfo> {
    return this.#withMap(devicePath, deviceSizeBytes, (map) => map.info());
  }

  async changedSince(devicePath: string, deviceSizeBytes: number, sinceNumber: number): Promise<{ info: ChangeMapInfo; ranges: ByteRange[] }> {
    return this.#withMap(devicePath, deviceSizeBytes, (map) => {
      const info = map.info();
      // A number not reached yet is a mistake (another device's, or another generation's), not "nothing changed".
      if (sinceNumber > info.number) {
        throw new BdsnapError('EINVAL', `since ${sinceNumber} is in the future: ${devicePath} is at number ${info.number} of generation ${info.generation} (bdsnap cbt info shows it)`);
      }
      return { info, ranges: map.changedSince(sinceNumber) };
    });
  }

  async markDirty(devicePath: string, deviceSizeBytes: number, ranges: ByteRange[]): Promise<ChangeMapInfo> {
    return this.#withMap(devicePath, deviceSizeBytes, async (map) => {
      for (const r of ranges) {
        if (r.offsetBytes + r.lengthBytes > deviceSizeBytes) {
          throw new BdsnapError('EINVAL', `range ${r.offsetBytes}:${r.lengthBytes} is past the end of ${devicePath} (${deviceSizeBytes} bytes)`);
        }
      }
      await map.markDirty(ranges);
      return map.info();
    });
  }

  async reset(devicePath: string, deviceSizeBytes: number): Promise<ChangeMapInfo> {
    return this.#withMap(devicePath, deviceSizeBytes, async (map) => {
      const r = await map.reset('requested', 'bdsnap cbt reset');
      this.#reported(devicePath, r);
      return map.info();
    });
  }

  // --- SnapshotChangeTracking -------------------------------------------------------------

  get durable(): boolean {
    return this.#durability === 'strict';
  }

  take(devicePath: string, dir: string, key: number): { generation: string; number: number } | null {
    const map = this.#open.get(devicePath);
    if (!map) return null;
    const view = map.advance();
    this.#adopt(dir, key, view);
    return { generation: view.generation, number: view.number };
  }

  async persist(dir: string, key: number): Promise<void> {
    const frozen = this.#frozen.get(frozenKey(dir, key));
    if (frozen) await frozen.view.save(frozen.file);
  }

  async load(_devicePath: string, dir: string, key: number): Promise<void> {
    const file = frozenFile(dir, key);
    let view: FrozenChangeMap;
    try {
      view = await FrozenChangeMap.load(file);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
      this.#log.error({ event: 'cbt-frozen-unreadable', file, reason: (err as Error).message }, 'a snapshot\'s change map cannot be read; its image offers no dirty bitmap');
      return;
    }
    this.#adopt(dir, key, view);
  }

  imageWrite(devicePath: string, dir: string, key: number, offsetBytes: number, lengthBytes: number): void | Promise<void> {
    this.#frozen.get(frozenKey(dir, key))?.view.mark(offsetBytes, lengthBytes);
    return this.#open.get(devicePath)?.mark(offsetBytes, lengthBytes);
  }

  frozenChangedSince(dir: string, key: number, generation: string, since: number): ByteRange[] | null {
    const frozen = this.#frozen.get(frozenKey(dir, key));
    if (!frozen || frozen.view.generation !== generation || since >= frozen.view.number) return null;
    return frozen.view.changedSince(since);
  }

  contexts(_devicePath: string, dir: string, key: number): MetaContextSource[] {
    return this.#frozen.get(frozenKey(dir, key))?.view.contextSources() ?? [];
  }

  forget(dir: string): void {
    for (const [k, frozen] of [...this.#frozen]) {
      if (!k.startsWith(`${dir}\0`)) continue;
      void frozen.view.close().catch(() => undefined);
      this.#frozen.delete(k);
    }
  }

  /**
   * Daemon stop: detach the frozen views (their files are up to date), close the maps of
   * devices still open. Their devices were not closed through closeMap, so no stamp vouches
   * for them.
   */
  async closeAll(): Promise<void> {
    for (const frozen of this.#frozen.values()) await frozen.view.close().catch(() => undefined);
    this.#frozen.clear();
    for (const devicePath of [...this.#open.keys()]) await this.closeMap(devicePath, undefined);
  }

  #adopt(dir: string, key: number, view: FrozenChangeMap): Frozen {
    const frozen: Frozen = { view, file: frozenFile(dir, key) };
    this.#frozen.set(frozenKey(dir, key), frozen);
    return frozen;
  }

  /** Run `fn` on the device's open map, or on its map opened for the moment (one at a time per device). */
  #withMap<T>(devicePath: string, deviceSizeBytes: number, fn: (map: ChangeMap) => T | Promise<T>): Promise<T> {
    return this.#serial(devicePath, async () => {
      const open = this.#open.get(devicePath);
      if (open) {
        await open.verify();
        return fn(open);
      }
      const map = await this.#openMap(devicePath, deviceSizeBytes);
      try {
        return await fn(map);
      } finally {
        await this.#closeMap(devicePath, 'opened');
      }
    });
  }

  #serial<T>(key: string, fn: () => Promise<T>): Promise<T> {
    return this.#queues.run(key, fn);
  }

  #reported(devicePath: string, reset: ChangeMapReset): void {
    if (reset.reason === 'new') {
      // A first map is no reset: nothing was known before it.
      this.#log.info({ event: 'cbt-new', device: devicePath, detail: reset.detail }, 'change map started');
      return;
    }
    this.#events.emit('cbt-reset', {
      device: devicePath,
      details: { reason: reset.reason, detail: reset.detail, previousGeneration: reset.previousGeneration, fullBackupNeeded: true },
    });
    this.onReset?.(devicePath, reset);
  }

  #mapFile(devicePath: string): string {
    return path.join(this.#dir, `${escapeDevicePath(devicePath)}.map`);
  }
}

function frozenKey(dir: string, key: number): string {
  return `${dir}\0${key}`;
}

function frozenFile(dir: string, key: number): string {
  return path.join(dir, `cbt-${key}.map`);
}
