/**
 * Putting snapshots back after a restart: each record on disk is reopened on its devices
 * before the NBD server accepts a client, and what a killed create left is removed, as is a
 * snapshot taken for a process (backup create, owner.ts) that has ended meanwhile.
 *
 * A device another process still holds open at that moment (a killed daemon whose lock has not
 * cleared yet) is waited for, for a bounded time; a snapshot whose device is still busy then is
 * held back, never marked failed: it stays as it is on disk, and the daemon does not serve that
 * device until the snapshot is back on it (retried before each user attach), so no write
 * reaches the device past a snapshot that does not see it.
 */

import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { BdsnapError } from '../../errors.js';
import { DiffStorage, type DiffStorageEvent } from '../../snapshot/diff-storage.js';
import { describeIdentity, sameIdentity } from '../../host/device-stamp.js';
import { removePath } from '../../host/fd-io.js';
import { ensurePrivateDir } from '../../host/private-dir.js';
import type { AttachedDevice, DeviceTable } from '../device-table.js';
import type { EventLog } from '../events.js';
import type { Registry } from '../registry.js';
import { addImage, type LiveSnapshot } from './live.js';
import { ownerState } from './owner.js';
import { readRecord, type SnapshotRecord } from './record.js';
import type { SnapshotChangeTracking } from './tracking.js';

/** How long start-up waits in all for devices another process still holds (a lock that may clear). */
const BUSY_DEVICE_WAIT_MS = 5000;
const BUSY_DEVICE_RETRY_MS = 100;

/** A device of a snapshot is held by another process, which may let go: not a reason to fail the snapshot. */
class DeviceBusy extends Error {}

export interface SnapshotRecoveryOptions {
  /** The directory holding one directory per snapshot. */
  root: string;
  table: DeviceTable;
  registry: Registry;
  events: EventLog;
  log: Logger;
  tracking?: SnapshotChangeTracking | undefined;
  /** A snapshot put back: the manager serves it from now on. */
  serve(snapshot: LiveSnapshot): void;
  onStorageEvent(snapshot: LiveSnapshot, event: DiffStorageEvent): void;
  markBroken(snapshot: LiveSnapshot, state: 'failed', reason: string): void;
  /** Why a device was found changed outside bdsnap, if it was. */
  changedOutside(devicePath: string): string | undefined;
}

interface HeldBack {
  record: SnapshotRecord;
  dir: string;
  reason: string;
}

export class SnapshotRecovery {
  readonly #options: SnapshotRecoveryOptions;
  /** Snapshots not put back at start because a device was busy, by id; see bringBack(). */
  readonly #heldBack = new Map<string, HeldBack>();
  #bringingBack: Promise<void> | undefined;

  constructor(options: SnapshotRecoveryOptions) {
    this.#options = options;
  }

  /** Daemon start: put back every snapshot on disk; remove what a killed create left. */
  async recover(): Promise<void> {
    const { root, log } = this.#options;
    await ensurePrivateDir(root, 0o700);
    const deadline = Date.now() + BUSY_DEVICE_WAIT_MS;
    for (const name of (await fs.promises.readdir(root)).sort()) {
      const dir = path.join(root, name);
      let record: SnapshotRecord;
      try {
        record = await readRecord(dir);
      } catch (err) {
        log.error({ event: 'snapshot-record-unreadable', dir, reason: (err as Error).message },
          'a snapshot record does not parse; left in place for inspection (remove the directory to drop it)');
        continue;
      }
      if (record.state === 'creating') {
        await this.#remove(record, dir);
        log.warn({ event: 'snapshot-leftovers-removed', snapshot: record.id }, 'a snapshot create was interrupted by a daemon stop; its leftovers were removed');
        continue;
      }
      if (record.owner !== undefined && await ownerState(record.owner) === 'gone') {
        await this.#remove(record, dir);
        const reason = `owner process ${record.owner.pid} ended while the daemon was down`;
        const devices = record.devices.map((d) => d.path);
        log.warn({ event: 'snapshot-owner-gone', snapshot: record.id, owner: record.owner.pid, reason }, 'the process a snapshot was taken for is gone; snapshot removed');
        this.#options.events.emit('snapshot-destroyed', { snapshot: record.id, details: { devices, reason } });
        continue;
      }
      try {
        await this.#reopen(record, dir, deadline);
      } catch (err) {
        if (err instanceof DeviceBusy) {
          this.#holdBack(record, dir, err.message);
          continue;
        }
        log.error({ event: 'snapshot-recovery-failed', snapshot: record.id, reason: (err as Error).message }, 'cannot bring back a snapshot');
      }
    }
  }

  /**
   * Before a user attaches `devicePath`: put back the held-back snapshots that cover it, or
   * refuse (EBUSY), so the device is never written past a snapshot that does not see it.
   */
  async bringBack(devicePath: string): Promise<void> {
    if (this.#heldBack.size === 0 && !this.#bringingBack) return;
    while (this.#bringingBack) await this.#bringingBack;
    const waiting = [...this.#heldBack.values()].filter((h) => h.record.devices.some((d) => d.path === devicePath));
    if (waiting.length === 0) return;
    const work = (async () => {
      for (const held of waiting) {
        try {
          await this.#reopen(held.record, held.dir, Date.now());
        } catch (err) {
          if (err instanceof DeviceBusy) {
            held.reason = err.message;
            throw new BdsnapError('EBUSY', `${devicePath} is not served until snapshot ${held.record.id} is back on it, and ${err.message}; retry once that process has let go`);
          }
          this.#options.log.error({ event: 'snapshot-recovery-failed', snapshot: held.record.id, reason: (err as Error).message }, 'cannot bring back a snapshot');
        }
        this.#heldBack.delete(held.record.id);
      }
    })();
    this.#bringingBack = work.then(() => undefined, () => undefined).finally(() => (this.#bringingBack = undefined));
    await work;
  }

  #holdBack(record: SnapshotRecord, dir: string, reason: string): void {
    this.#heldBack.set(record.id, { record, dir, reason });
    const devices = record.devices.map((d) => d.path);
    this.#options.log.warn({ event: 'snapshot-held-back', snapshot: record.id, devices, reason },
      'a snapshot is not served yet: a device of it is busy; it is left as it is, and the device is not served until the snapshot is back');
    this.#options.events.emit('snapshot-held-back', { snapshot: record.id, details: { reason, devices } });
  }

  /**
   * Put a snapshot back on its devices. Throws DeviceBusy (nothing changed, nothing held) when
   * a device is still busy at `deadline`: that may clear, so it is no reason to fail the snapshot.
   */
  async #reopen(record: SnapshotRecord, dir: string, deadline: number): Promise<void> {
    const { attached, unopenable } = await this.#attachAll(record, deadline);
    const snapshot: LiveSnapshot = { record, dir, storage: undefined as unknown as DiffStorage, images: [], destroying: false, closing: false };
    try {
      snapshot.storage = await DiffStorage.open({
        id: record.id, dirs: record.storage.dirs, chunkSize: record.chunkSize, durability: record.durability,
        ...(record.storage.limitBytes !== null ? { limitBytes: record.storage.limitBytes } : {}),
        onEvent: (event) => this.#options.onStorageEvent(snapshot, event),
      });
    } catch (err) {
      await this.#letGo(attached.keys());
      throw err;
    }
    // A snapshot recorded broken whose storage does not say so (its state file could not be
    // written, or an older daemon marked it) must not be put back taking originals.
    if (record.state === 'overflowed' || record.state === 'failed') snapshot.storage.fail(record.state, record.reason ?? 'the snapshot was broken before a restart');
    for (const d of record.devices) {
      const att = attached.get(d.path);
      if (att) await this.#putBack(snapshot, att, d);
      // The image of a device that cannot be opened is gone; the others still serve.
      else this.#options.markBroken(snapshot, 'failed', `${d.path} cannot be opened after a restart: ${unopenable.get(d.path) ?? 'unknown reason'}`);
    }
    this.#options.serve(snapshot);
    this.#options.log.info({ event: 'snapshot-reopened', snapshot: record.id, state: record.state, devices: record.devices.map((d) => d.path) },
      'snapshot served again after a restart');
  }

  /** Hold each device of the snapshot; a busy one at `deadline` lets go of all and throws DeviceBusy. */
  async #attachAll(record: SnapshotRecord, deadline: number): Promise<{ attached: Map<string, AttachedDevice>; unopenable: Map<string, string> }> {
    const attached = new Map<string, AttachedDevice>();
    const unopenable = new Map<string, string>();
    for (const d of record.devices) {
      try {
        attached.set(d.path, await this.#attachWhenFree(d.path, deadline));
      } catch (err) {
        if (err instanceof DeviceBusy) {
          await this.#letGo(attached.keys());
          throw err;
        }
        unopenable.set(d.path, (err as Error).message);
      }
    }
    return { attached, unopenable };
  }

  /** The snapshot's point and image on one device, checked against what the device is now. */
  async #putBack(snapshot: LiveSnapshot, att: AttachedDevice, d: SnapshotRecord['devices'][number]): Promise<void> {
    const { tracking, registry } = this.#options;
    await att.layer.hold();
    try {
      addImage(snapshot, att.layer, d.path, d.key, tracking);
    } finally {
      att.layer.release();
    }
    await tracking?.load(d.path, snapshot.dir, d.key);
    // The attach recorded what the name names now; a file moved over the name (or another
    // disk given the number) is not the device this snapshot saw.
    const now = registry.get(d.path)?.identity;
    if (d.identity !== undefined && (now === undefined || !sameIdentity(d.identity, now))) {
      this.#options.markBroken(snapshot, 'failed',
        `${d.path} is not the device this snapshot was taken of: it was ${describeIdentity(d.identity)} and is now ${now ? describeIdentity(now) : 'unknown'}`);
    }
    const changed = this.#options.changedOutside(d.path);
    if (changed !== undefined) this.#options.markBroken(snapshot, 'failed', `${d.path} changed while bdsnap did not serve it (${changed})`);
  }

  async #letGo(devices: Iterable<string>): Promise<void> {
    for (const devicePath of devices) await this.#options.table.detach(devicePath, 'snapshot').catch(() => undefined);
  }

  /** Attach a device for a snapshot, waiting until `deadline` while another process holds it. */
  async #attachWhenFree(devicePath: string, deadline: number): Promise<AttachedDevice> {
    for (;;) {
      try {
        return await this.#options.table.attach(devicePath, { holder: 'snapshot' });
      } catch (err) {
        if (!(err instanceof BdsnapError && err.code === 'EBUSY')) throw err;
        if (Date.now() >= deadline) throw new DeviceBusy(`${devicePath} is busy: ${err.message}`);
      }
      await new Promise((resolve) => setTimeout(resolve, BUSY_DEVICE_RETRY_MS));
    }
  }

  /** Remove a snapshot that is not served: its storage, its frozen views, its directory. */
  async #remove(record: SnapshotRecord, dir: string): Promise<void> {
    try {
      const storage = await DiffStorage.open({ id: record.id, dirs: record.storage.dirs, chunkSize: record.chunkSize });
      await storage.destroy();
    } catch {
      // Storage never created (a create cut short), or unreadable: the directory removal below is what matters.
    }
    this.#options.tracking?.forget(dir);
    await removePath(dir, { recursive: true });
  }
}
