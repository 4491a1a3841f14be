/**
 * The standby side of replication: the replicas this daemon receives, persisted in
 * `<state-dir>/replicas-received.json` (replaced atomically on every change).
 *
 * Invariant: the devices of a received replica hold one complete point in time of the source,
 * all of them the same point. A sync is applied inside sessions of the target devices (they
 * must be active here), between a `begin` and a `commit` of the sender, both control requests:
 * - begin records, durably and before any byte arrives, that a sync is in progress and which
 *   sessions each device had before it, so whatever session appears later belongs to the sync;
 * - commit, received while the sender still holds its NBD connections (so every write of the
 *   sync is flushed and inside the sessions), makes the sync's point the complete one;
 * - a sync not committed when the last of its devices is let go (sender killed, connection
 *   lost, an abort) is undone: each device is restored to the start of its first session since
 *   begin, which puts back the previous complete point. A standby daemon killed mid-sync finds
 *   the begin record at its next start and undoes the sync then.
 * A device is undone only once no one holds it (restore takes the device for itself), so
 * every device of the replica is let go before the first is touched.
 *
 * Once a sync is committed (or undone), no session of the target devices is needed any more:
 * a restore of one would only go back before the complete point. So each is forgotten as soon
 * as it has ended (at the release after the commit, at the next begin, after an undo), and a
 * standby holds at most the sessions of the one sync in progress. A target device's sessions
 * are its replica's: a device given to a replica takes only its syncs.
 */

import crypto from 'node:crypto';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import type { Logger } from 'pino';
import { z } from 'zod';
import { BdsnapError, toBdsnapError } from '../errors.js';
import { writeFileAtomic } from '../host/atomic-file.js';
import { restore } from '../snapshot/restore/index.js';
import { forgetSessions, planForget } from '../snapshot/forget.js';
import { readJsonFile } from '../stored-json.js';
import { compareSessions, listSessions } from '../snapshot/sessions.js';
import type { ReceivedReplicaInfo } from './control-protocol.js';
import type { DeviceTable } from './device-table.js';
import type { EventLog } from './events.js';
import { KeyedQueue } from '../serial-queue.js';
import { canonicalDevicePath, type Registry } from './registry.js';

export const RECEIVED_FILE = 'replicas-received.json';
/**
 * A sync begun right after another finds the devices still held for a moment: the sender has
 * closed its connections, but closing a session that took much takes a while here. Begin waits
 * this long for them to be let go before it refuses.
 */
const RELEASE_WAIT_MS = 5000;
const RELEASE_POLL_MS = 25;

const recordSchema = z.object({
  id: z.string(),
  devices: z.array(z.string()),
  point: z.string().nullable(),
  completeAt: z.string().nullable(),
  failedOverAt: z.string().nullable(),
  /** Why the devices are not at a complete point (a sync cut short could not be undone), until the next commit. */
  broken: z.string().nullable().default(null),
  pending: z.object({
    token: z.string(),
    point: z.string(),
    beganAt: z.string(),
    /** Per device: the session directories it had at begin. */
    sessionsBefore: z.record(z.string(), z.array(z.string())),
  }).nullable(),
});
type ReceivedRecord = z.infer<typeof recordSchema>;

const fileSchema = z.object({ version: z.literal(1), replicas: z.array(recordSchema) });

export interface ReplicaStandbyOptions {
  stateDir: string;
  snapshotRoot: string;
  table: DeviceTable;
  registry: Registry;
  events: EventLog;
  log: Logger;
}

export class ReplicaStandby {
  readonly #options: ReplicaStandbyOptions;
  readonly #file: string;
  readonly #records = new Map<string, ReceivedRecord>();
  readonly #queue = new KeyedQueue();

  private constructor(options: ReplicaStandbyOptions) {
    this.#options = options;
    this.#file = path.join(options.stateDir, RECEIVED_FILE);
  }

  static async load(options: ReplicaStandbyOptions): Promise<ReplicaStandby> {
    const standby = new ReplicaStandby(options);
    const stored = await readJsonFile(standby.#file, fileSchema, (problem) => `${standby.#file} is damaged: ${problem}`);
    for (const r of stored?.replicas ?? []) standby.#records.set(r.id, r);
    return standby;
  }

  /** At start, before the NBD server accepts a client: undo every sync a killed daemon left half applied. */
  async recover(): Promise<void> {
    for (const record of this.#records.values()) {
      if (!record.pending) {
        if (record.failedOverAt === null && record.broken === null) {
          await this.#forgetSessions(record.devices).catch((err: unknown) => {
            this.#options.log.warn({ event: 'replica-sessions-left', replica: record.id, reason: (err as Error).message }, 'cannot forget the sessions of committed syncs');
          });
        }
        continue;
      }
      await this.#queue.run(record.id, () => this.#rollBack(record)).catch((err: unknown) => {
        this.#options.log.error({ event: 'replica-rollback-failed', replica: record.id, reason: (err as Error).message }, 'cannot undo a half-applied sync');
      });
    }
  }

  has(id: string): boolean {
    return this.#records.has(id);
  }

  list(): ReceivedReplicaInfo[] {
    return [...this.#records.values()].map((r) => this.#info(r));
  }

  /** A sync of replica `id` starts: check the devices can take it, undo a sync left half applied. */
  begin(id: string, devicesArg: string[], point: string): Promise<{ token: string; point: string | null }> {
    return this.#queue.run(id, async () => {
      const { registry, table, snapshotRoot } = this.#options;
      const devices: string[] = [];
      for (const d of devicesArg) devices.push(await canonicalDevicePath(d));
      await this.#letGo(devices);
      let record = this.#records.get(id);
      if (record?.failedOverAt) {
        throw new BdsnapError('ESESSION', `replica ${id} was failed over on this standby at ${record.failedOverAt}: its devices are in use on their own and take no more syncs (add a new replica to replicate again)`);
      }
      for (const other of this.#records.values()) {
        const shared = other.id !== id ? devices.find((d) => other.devices.includes(d)) : undefined;
        if (shared) throw new BdsnapError('EBUSY', `${shared} receives replica ${other.id} on this standby; one device takes one replica`);
      }
      if (record && record.devices.join('\0') !== devices.join('\0')) {
        throw new BdsnapError('EINVAL', `replica ${id} sends ${record.devices.join(', ')} to this standby, not ${devices.join(', ')}`);
      }
      if (record?.pending) {
        try {
          await this.#rollBack(record);
        } catch (err) {
          // Undone or not, the next sync sends every range the cut one wrote (they are changes
          // since the last complete point), so its commit makes the devices whole again.
          if (err instanceof BdsnapError && err.code === 'EBUSY') throw err;
          record.broken = `a sync cut short could not be undone: ${toBdsnapError(err).message}`;
          record.pending = null;
          this.#options.log.error({ event: 'replica-rollback-failed', replica: id, reason: record.broken }, 'the standby is not at a complete point until the next sync commits');
        }
      }
      const sessionsBefore: Record<string, string[]> = {};
      for (const devicePath of devices) {
        const known = registry.get(devicePath) ?? await registry.register(devicePath);
        if (!known.active) {
          throw new BdsnapError('ESESSION', `${devicePath} is not active on the standby: run bdsnap activate ${devicePath} there first, so that a sync cut short can be undone`);
        }
        if (table.isAttached(devicePath)) {
          throw new BdsnapError('EBUSY', `${devicePath} is in use on the standby (mounted, served or in a snapshot); a replica target takes only its replica's syncs`);
        }
      }
      if (!record?.broken) await this.#forgetSessions(devices);
      for (const devicePath of devices) sessionsBefore[devicePath] = (await listSessions(snapshotRoot, devicePath)).map((s) => s.dir);
      record ??= { id, devices, point: null, completeAt: null, failedOverAt: null, broken: null, pending: null };
      const token = crypto.randomBytes(8).toString('hex');
      record.pending = { token, point, beganAt: new Date().toISOString(), sessionsBefore };
      this.#records.set(id, record);
      await this.#save();
      return { token, point: record.point };
    });
  }

  /** The sender flushed every write of sync `token`: its point becomes the complete one. */
  commit(id: string, token: string): Promise<{ token: string; point: string | null }> {
    return this.#queue.run(id, async () => {
      const record = this.#pendingRecord(id, token);
      const pending = record.pending!;
      for (const devicePath of record.devices) {
        const att = this.#options.table.use(devicePath);
        // Without the sender's connection the sync's writes are not all known to be there.
        if (!att || att.userHolds === 0) throw new BdsnapError('ESESSION', `${devicePath} was let go before the commit: the sync is undone`);
        const cow = att.cow;
        if (!cow) throw new BdsnapError('ESESSION', `${devicePath} is written outside a session on the standby: the sync cannot be kept`);
        if (cow.state === 'failed') throw new BdsnapError('ESESSION', `the standby's session of ${devicePath} failed (its storage is full?): the sync is not kept`);
      }
      record.point = pending.point;
      record.completeAt = new Date().toISOString();
      record.pending = null;
      record.broken = null;
      await this.#save();
      this.#options.log.info({ event: 'replica-received', replica: id, point: record.point, devices: record.devices }, 'replica sync received whole');
      return { token, point: record.point };
    });
  }

  /** The sender gave up on sync `token`: undo it once its devices are let go. */
  abort(id: string, token: string): Promise<{ token: string; point: string | null }> {
    return this.#queue.run(id, async () => {
      const record = this.#pendingRecord(id, token);
      if (record.devices.every((d) => !this.#options.table.isAttached(d))) await this.#rollBack(record);
      return { token, point: record.point };
    });
  }

  /** The daemon let go of a device's NBD connection: undo a sync that was not committed once all its devices are free. */
  deviceReleased(devicePath: string): void {
    for (const record of this.#records.values()) {
      if (record.failedOverAt !== null || !record.devices.includes(devicePath)) continue;
      // A sync begun after this release (begin waits for it) is not this release's to undo.
      const cutShort = record.pending?.token;
      void this.#queue.run(record.id, async () => {
        if (record.failedOverAt !== null || record.devices.some((d) => this.#options.table.isAttached(d))) return;
        // Committed: the sync's sessions are spent. Not committed: undo it (which forgets them after).
        if (record.pending) {
          if (record.pending.token === cutShort) await this.#rollBack(record);
        } else if (record.broken === null) {
          await this.#forgetSessions(record.devices);
        }
      }).catch((err: unknown) => {
        const e = toBdsnapError(err);
        this.#options.log.error({ event: 'replica-rollback-failed', replica: record.id, code: e.code, reason: e.message }, 'cannot undo a sync cut short');
        this.#options.events.emit('replica-failed', { details: { replica: record.id, reason: `cannot undo a sync cut short: ${e.message}` } });
      });
    }
  }

  /** The devices of replica `id` become ordinary devices of this daemon, at the last complete point. */
  failover(id: string): Promise<ReceivedReplicaInfo> {
    return this.#queue.run(id, async () => {
      const record = this.#get(id);
      if (record.failedOverAt) return this.#info(record);
      if (record.pending) {
        const busy = record.devices.find((d) => this.#options.table.isAttached(d));
        if (busy) throw new BdsnapError('EBUSY', `a sync of replica ${id} is being received (${busy} is open): stop the sender (bdsnap replica pause ${id} on the source), then fail over`);
        await this.#rollBack(record);
      }
      if (record.point === null) throw new BdsnapError('ESESSION', `replica ${id} has not received a complete point yet: there is nothing to fail over to`);
      if (record.broken !== null) throw new BdsnapError('ESESSION', `replica ${id} is not at a complete point (${record.broken}); let one more sync finish, or restore its devices by hand`);
      record.failedOverAt = new Date().toISOString();
      await this.#save();
      this.#options.log.warn({ event: 'replica-failover', replica: id, point: record.point, devices: record.devices }, 'replica failed over: its devices are ordinary devices now');
      return this.#info(record);
    });
  }

  /**
   * The sender removed replica `id` (or an operator here did): a sync half applied is undone,
   * the sessions held for it are forgotten, and the devices stay at the last complete point as
   * ordinary devices of this daemon. Refused while a sync is being received.
   */
  remove(id: string, options: { force?: boolean } = {}): Promise<{ id: string; removed: true }> {
    return this.#queue.run(id, async () => {
      const record = this.#get(id);
      if (record.failedOverAt === null) {
        if (record.broken !== null && !options.force) throw new BdsnapError('ESESSION', `replica ${id} is not at a complete point on the standby (${record.broken}); let one more sync finish first, or restore its devices by hand and remove it with --force`);
        const busy = record.devices.find((d) => this.#options.table.isAttached(d));
        if (busy) throw new BdsnapError('EBUSY', `a sync of replica ${id} is being received (${busy} is open): pause the replica on the source first`);
        if (record.pending) await this.#rollBack(record);
        // Forced past a sync that could not be undone: its sessions stay, to restore by hand.
        if (record.broken === null) await this.#forgetSessions(record.devices);
      }
      this.#records.delete(id);
      await this.#save();
      this.#options.log.info({ event: 'replica-released', replica: id, point: record.point, devices: record.devices }, 'replica removed: its devices stay at the last complete point');
      return { id, removed: true as const };
    });
  }

  /** Wait, up to RELEASE_WAIT_MS, until no one holds any of `devices`; whoever still holds one then is refused by the caller. */
  async #letGo(devices: string[]): Promise<void> {
    const deadline = performance.now() + RELEASE_WAIT_MS;
    while (devices.some((d) => this.#options.table.isAttached(d)) && performance.now() < deadline) await delay(RELEASE_POLL_MS);
  }

  /** Forget every ended session of `devices` (none is needed once a sync is committed or undone). */
  async #forgetSessions(devices: string[]): Promise<void> {
    const { snapshotRoot } = this.#options;
    for (const devicePath of devices) {
      const plan = await planForget(snapshotRoot, devicePath, { keepLast: 0 });
      if (plan.remove.length > 0) await forgetSessions(snapshotRoot, plan);
    }
  }

  /**
   * Restore each device to the start of its first session since begin: restore applies the
   * newer sessions too, newest first, so whatever the sync wrote is undone.
   */
  async #rollBack(record: ReceivedRecord): Promise<void> {
    const pending = record.pending;
    if (!pending) return;
    const undone: Array<{ device: string; sessionDir: string; bytes: number }> = [];
    for (const devicePath of record.devices) {
      if (this.#options.table.isAttached(devicePath)) {
        throw new BdsnapError('EBUSY', `${devicePath} is in use on the standby: a sync cut short cannot be undone until it is let go`);
      }
      const before = new Set(pending.sessionsBefore[devicePath] ?? []);
      const fresh = (await listSessions(this.#options.snapshotRoot, devicePath)).filter((s) => !before.has(s.dir)).sort(compareSessions);
      const first = fresh[0];
      if (!first) continue;
      const summary = await restore(first.dir);
      undone.push({ device: devicePath, sessionDir: first.dir, bytes: summary.bytes });
    }
    record.pending = null;
    await this.#save();
    if (record.broken === null) await this.#forgetSessions(record.devices);
    this.#options.log.warn({ event: 'replica-rolled-back', replica: record.id, point: record.point, undone }, 'a sync cut short was undone');
    this.#options.events.emit('replica-rolled-back', { details: { replica: record.id, point: record.point, abandoned: pending.point, devices: undone } });
  }

  #pendingRecord(id: string, token: string): ReceivedRecord {
    const record = this.#get(id);
    if (record.pending?.token !== token) throw new BdsnapError('ESESSION', `sync ${token} of replica ${id} is not in progress on this standby (it was undone)`);
    return record;
  }

  #get(id: string): ReceivedRecord {
    const record = this.#records.get(id);
    if (!record) throw new BdsnapError('ENOENT', `no replica ${id} on this daemon`);
    return record;
  }

  #info(r: ReceivedRecord): ReceivedReplicaInfo {
    return { id: r.id, devices: r.devices, point: r.point, completeAt: r.completeAt, receiving: r.pending !== null, failedOverAt: r.failedOverAt, broken: r.broken };
  }

  async #save(): Promise<void> {
    await writeFileAtomic(this.#file, `${JSON.stringify({ version: 1, replicas: [...this.#records.values()] }, null, 2)}\n`);
  }
}
