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
 * An incremental sync builds on the devices only as the last commit left them. At each commit
 * the standby records each device's change-map generation; the daemon starts a new one whenever
 * the device is proven written or replaced around bdsnap (while it was not served, or while it
 * was held idle) or nothing vouches for it (change-map.ts, trust.ts). Begin compares: a device
 * whose generation moved (or that has none recorded) must be sent whole, the sender is told so,
 * and until a sync commits the replica is not at a complete point (failover refuses it). A
 * commit that did not send such a device whole is refused, and so is one in which a device's
 * generation moved during the sync. Undoing a sync writes the devices here, which starts a new
 * generation; a device that was trusted before the undo adopts it.
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
import type { ReceivedReplicaInfo, ReplicaReceiveReply } from './control-protocol.js';
import type { DeviceTable } from './device-table.js';
import type { EventLog } from './events.js';
import { KeyedQueue } from '../serial-queue.js';
import { canonicalDevicePath, type Registry } from './registry.js';
import type { ChangeTracker } from './change-tracking.js';
import { FileDevice } from '../device/file-device.js';

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
  /** Per device: its change-map generation when it last held the complete point (absent: none vouches for it). */
  generations: z.record(z.string(), z.string()).default({}),
  pending: z.object({
    token: z.string(),
    point: z.string(),
    beganAt: z.string(),
    /** Per device: the session directories it had at begin. */
    sessionsBefore: z.record(z.string(), z.array(z.string())),
    /** Per device: its change-map generation at begin (absent: it could not be read). */
    generations: z.record(z.string(), z.string()).default({}),
    /** The devices this sync must send whole (begin told the sender). */
    sendWhole: z.array(z.string()).default([]),
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
  /** The daemon's change maps; absent with --no-change-tracking (then every sync is sent whole). */
  tracking?: ChangeTracker;
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

  /** The received replicas; one whose devices were changed around bdsnap since its last commit says so (and is no complete point from then on). */
  async list(): Promise<ReceivedReplicaInfo[]> {
    const infos: ReceivedReplicaInfo[] = [];
    for (const record of this.#records.values()) {
      infos.push(await this.#queue.run(record.id, async () => {
        if (record.pending === null) await this.#vouch(record);
        return this.#info(record);
      }));
    }
    return infos;
  }

  /** A sync of replica `id` starts: check the devices can take it, undo a sync left half applied. */
  begin(id: string, devicesArg: string[], point: string): Promise<ReplicaReceiveReply> {
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
      const generations: Record<string, string> = {};
      const sendWhole: Array<{ device: string; reason: string }> = [];
      for (const devicePath of devices) {
        const known = registry.get(devicePath) ?? await registry.register(devicePath);
        if (!known.active) {
          throw new BdsnapError('ESESSION', `${devicePath} is not active on the standby: run bdsnap activate ${devicePath} there first, so that a sync cut short can be undone`);
        }
        if (table.isAttached(devicePath)) {
          throw new BdsnapError('EBUSY', `${devicePath} is in use on the standby (mounted, served or in a snapshot); a replica target takes only its replica's syncs`);
        }
      }
      record ??= { id, devices, point: null, completeAt: null, failedOverAt: null, broken: null, generations: {}, pending: null };
      for (const [i, devicePath] of devices.entries()) {
        const now = await this.#generationOf(devicePath);
        if (typeof now === 'string') generations[devicePath] = now;
        const why = whyNotAsLeft(record, devicePath, now);
        if (why !== undefined) sendWhole.push({ device: devicesArg[i]!, reason: `${devicePath} ${why}` });
      }
      // Proven changed since the last complete point: that point is gone until a sync commits.
      const changed = record.point !== null ? sendWhole.find((w) => record.generations[canonicalOf(devices, devicesArg, w.device)] !== undefined) : undefined;
      if (changed && record.broken === null) {
        record.broken = changed.reason;
        this.#options.log.warn({ event: 'replica-standby-changed', replica: id, reason: changed.reason }, 'a replica\'s device was changed outside bdsnap since the last complete sync: it is sent whole');
      }
      if (!record.broken) await this.#forgetSessions(devices);
      for (const devicePath of devices) sessionsBefore[devicePath] = (await listSessions(snapshotRoot, devicePath)).map((s) => s.dir);
      const token = crypto.randomBytes(8).toString('hex');
      const whole = sendWhole.map((w) => canonicalOf(devices, devicesArg, w.device));
      record.pending = { token, point, beganAt: new Date().toISOString(), sessionsBefore, generations, sendWhole: whole };
      this.#records.set(id, record);
      await this.#save();
      return { token, point: record.point, sendWhole };
    });
  }

  /**
   * The sender flushed every write of sync `token`, and sent whole the devices named in
   * `sentWhole` (as at begin): its point becomes the complete one.
   */
  commit(id: string, token: string, sentWhole: string[] = []): Promise<ReplicaReceiveReply> {
    return this.#queue.run(id, async () => {
      const record = this.#pendingRecord(id, token);
      const pending = record.pending!;
      const whole = new Set<string>();
      for (const d of sentWhole) whole.add(await canonicalDevicePath(d).catch(() => d));
      const generations: Record<string, string> = {};
      for (const devicePath of record.devices) {
        if (pending.sendWhole.includes(devicePath) && !whole.has(devicePath)) {
          throw new BdsnapError('ESESSION', `${devicePath} had to be sent whole (the standby cannot vouch it is as the last complete sync left it) and this sync sent only changes: it is not kept; update the sender, or run bdsnap cbt reset on the source's device and sync again`);
        }
        const now = await this.#generationOf(devicePath);
        if (typeof now === 'string') generations[devicePath] = now;
        if (!whole.has(devicePath) && (typeof now !== 'string' || now !== pending.generations[devicePath])) {
          throw new BdsnapError('ESESSION', `${devicePath} was written outside bdsnap on the standby during the sync (${typeof now === 'string' ? `its change map started again: generation ${pending.generations[devicePath] ?? 'unknown'} is now ${now}` : now.message}): the sync is not kept, and the next one sends it whole`);
        }
      }
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
      record.generations = generations;
      await this.#save();
      this.#options.log.info({ event: 'replica-received', replica: id, point: record.point, devices: record.devices }, 'replica sync received whole');
      return { token, point: record.point };
    });
  }

  /** The sender gave up on sync `token`: undo it once its devices are let go. */
  abort(id: string, token: string): Promise<ReplicaReceiveReply> {
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
      await this.#vouch(record);
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

  /**
   * A replica at a complete point whose device's change map started again since the commit (it
   * was written or replaced around bdsnap) is no longer at one: say why, until a sync commits.
   * Devices without a recorded generation (no change tracking here) cannot be checked.
   */
  async #vouch(record: ReceivedRecord): Promise<void> {
    if (record.point === null || record.broken !== null || record.failedOverAt !== null) return;
    for (const devicePath of record.devices) {
      if (record.generations[devicePath] === undefined) continue;
      const why = whyNotAsLeft(record, devicePath, await this.#generationOf(devicePath));
      if (why === undefined) continue;
      record.broken = `${devicePath} ${why}`;
      await this.#save();
      this.#options.log.warn({ event: 'replica-standby-changed', replica: record.id, reason: record.broken }, 'a replica\'s device was changed outside bdsnap since the last complete sync');
      return;
    }
  }

  /** The device's change-map generation now (a map that cannot vouch for it starts a new one), or why it cannot be told. */
  async #generationOf(devicePath: string): Promise<string | Error> {
    const tracking = this.#options.tracking;
    if (!tracking) return new BdsnapError('ENOTSUP', 'change tracking is off in this standby daemon (--no-change-tracking)');
    try {
      let sizeBytes = this.#options.table.use(devicePath)?.file.size;
      if (sizeBytes === undefined) {
        const file = await FileDevice.open(devicePath, { readOnly: true, shared: true });
        sizeBytes = file.size;
        await file.close();
      }
      return (await tracking.info(devicePath, sizeBytes)).generation;
    } catch (err) {
      return toBdsnapError(err);
    }
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
      const generationBefore = await this.#generationOf(devicePath);
      const summary = await restore(first.dir);
      undone.push({ device: devicePath, sessionDir: first.dir, bytes: summary.bytes });
      // The undo wrote the device here, so its map starts again; a device that was as the last
      // commit left it is so again, and vouched for by the new generation.
      const after = await this.#generationOf(devicePath);
      if (typeof generationBefore === 'string' && generationBefore === record.generations[devicePath]) {
        if (typeof after === 'string') record.generations[devicePath] = after;
        else delete record.generations[devicePath];
      }
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

/**
 * Why `devicePath` of `record` may not be as its last commit left it (`now`: its change-map
 * generation, or why it cannot be read), or undefined when its generation vouches that it is.
 */
function whyNotAsLeft(record: ReceivedRecord, devicePath: string, now: string | Error): string | undefined {
  if (record.point === null) return 'has received no complete sync on this standby yet';
  const recorded = record.generations[devicePath];
  if (now instanceof Error) return `cannot be vouched for on the standby (${now.message})`;
  if (recorded === undefined) return 'has no change-map generation recorded at the last complete sync on the standby';
  if (now !== recorded) {
    return `was written or replaced outside bdsnap on the standby since the last complete sync (its change map started again: generation ${recorded} is now ${now}; the standby's cbt-reset event says why)`;
  }
  return undefined;
}

/** The canonical path of the device the sender named `named` at begin. */
function canonicalOf(devices: string[], devicesArg: string[], named: string): string {
  return devices[devicesArg.indexOf(named)] ?? named;
}
