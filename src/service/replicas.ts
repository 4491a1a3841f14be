/**
 * Replication, the sending side: each replica pairs devices of this daemon with exports of a
 * remote NBD server, persisted in `<state-dir>/replicas.json` (replaced atomically).
 *
 * A sync takes one snapshot of all the replica's devices (one instant across them), sends what
 * the target needs to become that instant, and destroys the snapshot. The first sync sends
 * every data extent (zeroed extents become WRITE_ZEROES); later ones send only the ranges the
 * image's change map says changed since the last complete sync; a new change-map generation
 * (the map was reset) makes the sync full again, and the sync says why. So does a bdsnap
 * standby that cannot vouch for a target (written or replaced around bdsnap since the last
 * sync): begin names it, it is sent whole, and commit says which devices were.
 *
 * The last complete point moves only after the target has everything of the sync:
 * - a bdsnap standby (its run directory known) gets `begin` before the first byte and `commit`
 *   after every target is flushed, while the NBD connections are still open; a sync that does
 *   not commit is undone there (replica-standby.ts);
 * - any other NBD server holds a copy marked incomplete until a sync finishes. Since the last
 *   complete point did not move, the next sync's changes since it include every range the cut
 *   sync had to send, so they are sent again.
 * A snapshot left by a daemon killed mid-sync is destroyed at the next start.
 *
 * Lag is the time since the last complete point (since the replica was added, before the first).
 * Past the replica's threshold it is lagging: `replica-lagging` once, when it passes, and the
 * first `replica-synced` that leaves the lag under the threshold says it caught up (`caughtUp`). The episode is persisted, so a restart does not
 * announce it again.
 */

import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { z } from 'zod';
import { BdsnapError, toBdsnapError } from '../errors.js';
import { writeFileAtomic } from '../host/atomic-file.js';
import { whyOthersCanRename } from '../host/private-dir.js';
import { NbdClient, type NbdClientOptions } from '../nbd/client.js';
import type { ExportHandle } from '../nbd/exports.js';
import { loadClientTls, type ClientTlsSettings } from '../nbd/tls.js';
import { readJsonFile } from '../stored-json.js';
import { BdsnapClient } from './client.js';
import type { ReplicaInfo, ReplicaSyncSummary, SnapshotImageInfo, SnapshotInfo } from './control-protocol.js';
import type { EventLog } from './events.js';
import { KeyedQueue } from '../serial-queue.js';
import { formatDuration } from '../units.js';
import { NBD_SOCKET, controlSocketPath } from './paths.js';
import { canonicalDevicePath } from './registry.js';
import { copyRanges, RateLimit, type ByteRange, type CopyCounters } from './replica-copy.js';
import type { SnapshotManager } from './snapshots/index.js';

export const REPLICAS_FILE = 'replicas.json';
/** After a failed sync the next try comes after this, doubled per failure, at most the replica's interval. */
const FIRST_RETRY_MS = 5000;
/** Without a threshold of its own, a scheduled replica lags once this many of its syncs are missed. */
const LAGGING_AFTER_INTERVALS = 3;
/**
 * A standby (its daemon or its NBD server) silent this long while a sync awaits it is taken for
 * stopped or hung, and the sync fails; BDSNAP_REPLICA_TIMEOUT_MS sets another bound.
 */
const DEFAULT_TIMEOUT_MS = 30_000;

function timeoutFromEnv(): number {
  const text = process.env.BDSNAP_REPLICA_TIMEOUT_MS;
  if (text === undefined || text === '') return DEFAULT_TIMEOUT_MS;
  const ms = Number(text);
  if (!Number.isInteger(ms) || ms <= 0) throw new BdsnapError('EINVAL', `BDSNAP_REPLICA_TIMEOUT_MS=${text} is not a positive whole number of milliseconds`);
  return ms;
}

const pointSchema = z.object({ generation: z.string(), number: z.number().int() });
const recordSchema = z.object({
  id: z.string(),
  devices: z.array(z.string()),
  target: z.string(),
  exports: z.array(z.string()),
  standbyRunDir: z.string().nullable(),
  everyMs: z.number().int().nullable(),
  limitBytesPerSecond: z.number().int().nullable(),
  paused: z.boolean(),
  /** The last point the target received whole: the snapshot's time and each device's change-map point. */
  last: z.object({ point: z.string(), points: z.record(z.string(), pointSchema.nullable()) }).nullable(),
  /** A sync to a plain target started and has not finished: the target is not one point in time. */
  incomplete: z.boolean(),
  /** The snapshot of a sync in progress (destroyed at the next start if the daemon died). */
  inProgress: z.string().nullable(),
  bytesSent: z.number(),
  lastSync: z.object({
    full: z.boolean(), why: z.string(), bytesSent: z.number(), zeroBytes: z.number(), durationMs: z.number(), snapshot: z.string(),
  }).nullable(),
  lastError: z.string().nullable(),
  /** Lag past which the replica is lagging; null: LAGGING_AFTER_INTERVALS of its interval. */
  laggingAfterMs: z.number().int().nullable().default(null),
  /** A `replica-lagging` was announced and no sync completed since. */
  lagging: z.boolean().default(false),
  addedAt: z.string().nullable().default(null),
});
type ReplicaRecord = z.infer<typeof recordSchema>;
const fileSchema = z.object({ version: z.literal(1), replicas: z.array(recordSchema) });

/** Where a target URI points: a unix socket or a TCP address. */
export type TargetEndpoint = { socketPath: string } | { host: string; port: number };

export interface ParsedTarget {
  endpoint: TargetEndpoint;
  /** The export named in the URI, or '' when it names none. */
  exportName: string;
  /** nbds: the client's TLS credentials (libnbd's URI parameters). */
  tls?: ClientTlsSettings;
}

const NBD_DEFAULT_PORT = 10809;

/**
 * Parse `nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST[:PORT]/EXPORT`, and their TLS forms
 * `nbds+unix://` and `nbds://[USER@]HOST[:PORT]/EXPORT` with libnbd's parameters
 * `tls-certificates=DIR` (its ca-cert.pem, and client-cert.pem/client-key.pem if there) or
 * `tls-psk-file=FILE` (`tls-username=USER` or USER@ picks the key), `tls-hostname=NAME` (the
 * name the certificate must carry, for a unix socket; default localhost).
 */
export function parseTargetUri(uri: string): ParsedTarget {
  let url: URL;
  try {
    url = new URL(uri);
  } catch {
    throw new BdsnapError('EINVAL', `${uri} is not a URI: give nbd+unix:///EXPORT?socket=PATH or nbd://HOST:PORT/EXPORT`);
  }
  const exportName = decodeURIComponent(url.pathname.replace(/^\//, ''));
  const secure = url.protocol === 'nbds:' || url.protocol === 'nbds+unix:';
  let parsed: ParsedTarget;
  switch (url.protocol) {
    case 'nbd+unix:':
    case 'nbds+unix:': {
      const socketPath = url.searchParams.get('socket');
      if (!socketPath || !path.isAbsolute(socketPath)) throw new BdsnapError('EINVAL', `${uri} names no absolute socket path (?socket=/path/to/nbd.sock)`);
      parsed = { endpoint: { socketPath }, exportName };
      break;
    }
    case 'nbd:':
    case 'nbds:': {
      if (!url.hostname) throw new BdsnapError('EINVAL', `${uri} names no host`);
      const host = url.hostname.replace(/^\[(.*)\]$/, '$1');
      parsed = { endpoint: { host, port: url.port ? Number(url.port) : NBD_DEFAULT_PORT }, exportName };
      break;
    }
    default:
      throw new BdsnapError('EINVAL', `${uri}: unsupported scheme ${url.protocol} (nbd+unix://, nbd://, nbds+unix:// or nbds://)`);
  }
  if (!secure) return parsed;
  const param = (name: string): string | undefined => url.searchParams.get(name) ?? undefined;
  const certificatesDir = param('tls-certificates');
  const pskFile = param('tls-psk-file');
  const username = param('tls-username') ?? (url.username ? decodeURIComponent(url.username) : undefined);
  const host = param('tls-hostname') ?? ('host' in parsed.endpoint ? parsed.endpoint.host : 'localhost');
  return {
    ...parsed,
    tls: {
      host,
      ...(certificatesDir !== undefined ? { certificatesDir } : {}),
      ...(pskFile !== undefined ? { pskFile } : {}),
      ...(username !== undefined ? { username } : {}),
    },
  };
}

export interface AddReplicaOptions {
  devices: string[];
  to: string;
  everyMs?: number;
  laggingAfterMs?: number;
  limitBytesPerSecond?: number;
  standbyRunDir?: string;
  insecureTcp?: boolean;
}

export interface ReplicaManagerOptions {
  stateDir: string;
  snapshots: SnapshotManager;
  events: EventLog;
  log: Logger;
}

interface Live {
  timer: NodeJS.Timeout | undefined;
  nextAt: number | null;
  syncing: boolean;
  failures: number;
  abort: AbortController | undefined;
  lagTimer: NodeJS.Timeout | undefined;
}

interface SyncPlan {
  image: SnapshotImageInfo;
  ranges: ByteRange[];
  full: boolean;
  why: string;
}

export class ReplicaManager {
  readonly #options: ReplicaManagerOptions;
  readonly #file: string;
  readonly #records = new Map<string, ReplicaRecord>();
  readonly #live = new Map<string, Live>();
  readonly #queue = new KeyedQueue();
  readonly #timeoutMs = timeoutFromEnv();
  #closing = false;

  private constructor(options: ReplicaManagerOptions) {
    this.#options = options;
    this.#file = path.join(options.stateDir, REPLICAS_FILE);
  }

  static async load(options: ReplicaManagerOptions): Promise<ReplicaManager> {
    const manager = new ReplicaManager(options);
    const stored = await readJsonFile(manager.#file, fileSchema, (problem) => `${manager.#file} is damaged: ${problem}`);
    for (const r of stored?.replicas ?? []) manager.#records.set(r.id, r);
    return manager;
  }

  /** After the snapshots are back: destroy what a killed daemon's syncs left, start the schedules. */
  async recover(): Promise<void> {
    const existing = new Set(this.#options.snapshots.list().map((s) => s.id));
    for (const record of this.#records.values()) {
      if (record.inProgress !== null) {
        if (existing.has(record.inProgress)) {
          await this.#options.snapshots.destroy(record.inProgress, { force: true }).catch((err: unknown) => {
            this.#options.log.warn({ event: 'replica-snapshot-left', replica: record.id, snapshot: record.inProgress, reason: (err as Error).message }, 'cannot destroy the snapshot of a sync cut short');
          });
        }
        this.#options.log.warn({ event: 'replica-sync-cut-short', replica: record.id, snapshot: record.inProgress }, 'a sync was cut short by the daemon\'s end; the next one sends its ranges again');
        record.inProgress = null;
      }
      this.#schedule(record);
    }
    await this.#save();
  }

  has(id: string): boolean {
    return this.#records.has(id);
  }

  async add(options: AddReplicaOptions): Promise<ReplicaInfo> {
    const devices: string[] = [];
    for (const d of options.devices) {
      const devicePath = await canonicalDevicePath(d);
      if (devices.includes(devicePath)) throw new BdsnapError('EINVAL', `${devicePath} is named twice`);
      devices.push(devicePath);
    }
    const parsed = parseTargetUri(options.to);
    // Credentials that will not load are refused now, not at the first sync.
    if (parsed.tls) await loadClientTls(parsed.tls);
    if ('host' in parsed.endpoint && !parsed.tls && !options.insecureTcp) {
      throw new BdsnapError('EPERM', `${options.to} would send the devices' content over TCP in the clear: use nbds:// (TLS), add --insecure-tcp on a trusted network, or reach the standby through an ssh-forwarded unix socket (nbd+unix://)`);
    }
    const exports = exportsFor(devices, parsed.exportName, options.to);
    for (const other of this.#records.values()) {
      const shared = devices.find((d) => other.devices.includes(d));
      if (shared) throw new BdsnapError('EBUSY', `${shared} is already in replica ${other.id}`);
    }
    const standbyRunDir = options.standbyRunDir !== undefined ? path.resolve(options.standbyRunDir) : standbyOf(parsed.endpoint);
    await checkSockets(parsed.endpoint, standbyRunDir);
    if (standbyRunDir !== null) {
      // A standby given by name must answer now: a typo would silently turn it into a plain copy.
      const client = await BdsnapClient.connect(standbyRunDir, { timeoutMs: this.#timeoutMs });
      try {
        await client.ping();
      } finally {
        client.close();
      }
    }
    const record: ReplicaRecord = {
      id: crypto.randomBytes(5).toString('hex'), devices, target: options.to, exports, standbyRunDir,
      everyMs: options.everyMs ?? null, limitBytesPerSecond: options.limitBytesPerSecond ?? null, paused: false,
      last: null, incomplete: false, inProgress: null, bytesSent: 0, lastSync: null, lastError: null,
      laggingAfterMs: options.laggingAfterMs ?? null, lagging: false, addedAt: new Date().toISOString(),
    };
    this.#records.set(record.id, record);
    await this.#save();
    this.#options.log.info({ event: 'replica-added', replica: record.id, devices, target: record.target, standby: standbyRunDir }, 'replica added');
    this.#schedule(record);
    return this.#info(record);
  }

  list(): ReplicaInfo[] {
    return [...this.#records.values()].map((r) => this.#info(r));
  }

  /** Sync now (after a sync already running); resolves when it is done, rejects with why it failed. */
  sync(id: string): Promise<ReplicaInfo> {
    const record = this.#get(id);
    if (record.paused) return Promise.reject(new BdsnapError('ESESSION', `replica ${id} is paused: bdsnap replica resume ${id} first`));
    return this.#queue.run(id, () => this.#sync(record)).then(() => this.#info(record));
  }

  async pause(id: string): Promise<ReplicaInfo> {
    const record = this.#get(id);
    record.paused = true;
    this.#live.get(id)?.abort?.abort(new BdsnapError('ESHUTDOWN', `the replica was paused (bdsnap replica pause ${id})`));
    await this.#save();
    this.#schedule(record);
    // A sync running now ends (cut short) before pause answers.
    await this.#queue.run(id, async () => undefined);
    return this.#info(record);
  }

  async resume(id: string): Promise<ReplicaInfo> {
    const record = this.#get(id);
    record.paused = false;
    this.#liveOf(id).failures = 0;
    await this.#save();
    this.#schedule(record);
    return this.#info(record);
  }

  /**
   * Forget the replica here and on a bdsnap standby, which undoes a sync half applied, lets go
   * of the sessions it held for the replica and keeps its devices at the last complete point.
   * A standby that cannot be told refuses the removal, unless `force` (then run remove there too).
   */
  async remove(id: string, options: { force?: boolean } = {}): Promise<{ id: string; removed: true; standbyReleased: boolean }> {
    const record = this.#get(id);
    if (this.#live.get(id)?.syncing) throw new BdsnapError('EBUSY', `replica ${id} is syncing: bdsnap replica pause ${id} first`);
    let standbyReleased = false;
    if (record.standbyRunDir !== null) {
      try {
        await this.#releaseOnStandby(record);
        standbyReleased = true;
      } catch (err) {
        const e = toBdsnapError(err);
        if (!options.force) {
          throw new BdsnapError(e.code, `the standby cannot let go of replica ${id} (${e.message}): start it and try again, or remove with --force and then run bdsnap replica remove ${id} on the standby`, { cause: err });
        }
        this.#options.log.warn({ event: 'replica-standby-not-told', replica: id, reason: e.message }, 'replica removed here only; remove it on the standby too');
      }
    }
    const live = this.#live.get(id);
    if (live?.timer) clearTimeout(live.timer);
    if (live?.lagTimer) clearTimeout(live.lagTimer);
    this.#live.delete(id);
    this.#records.delete(record.id);
    await this.#save();
    this.#options.log.info({ event: 'replica-removed', replica: id, standbyReleased }, 'replica removed');
    return { id, removed: true, standbyReleased };
  }

  async #releaseOnStandby(record: ReplicaRecord): Promise<void> {
    await checkSockets({ socketPath: controlSocketPath(record.standbyRunDir!) }, null);
    const standby = await BdsnapClient.connect(record.standbyRunDir!, { timeoutMs: this.#timeoutMs });
    try {
      await standby.request('replica-action', { action: 'remove', replica: record.id });
    } catch (err) {
      // Never synced there, or already removed there: nothing to let go of.
      if (!(err instanceof BdsnapError && err.code === 'ENOENT')) throw err;
    } finally {
      standby.close();
    }
  }

  /** Daemon stop: no new syncs; a sync running is cut short (the target keeps its last complete point). */
  async close(): Promise<void> {
    this.#closing = true;
    const running: Array<Promise<unknown>> = [];
    for (const [id, live] of this.#live) {
      if (live.timer) clearTimeout(live.timer);
      if (live.lagTimer) clearTimeout(live.lagTimer);
      live.abort?.abort(new BdsnapError('ESHUTDOWN', 'the daemon is stopping'));
      running.push(this.#queue.run(id, async () => undefined));
    }
    await Promise.all(running);
  }

  #liveOf(id: string): Live {
    let live = this.#live.get(id);
    if (!live) {
      live = { timer: undefined, nextAt: null, syncing: false, failures: 0, abort: undefined, lagTimer: undefined };
      this.#live.set(id, live);
    }
    return live;
  }

  #schedule(record: ReplicaRecord): void {
    this.#watchLag(record);
    const live = this.#liveOf(record.id);
    if (live.timer) clearTimeout(live.timer);
    live.timer = undefined;
    live.nextAt = null;
    if (this.#closing || record.paused || record.everyMs === null || !this.#records.has(record.id)) return;
    const waitMs = live.failures > 0 ? Math.min(record.everyMs, FIRST_RETRY_MS * 2 ** (live.failures - 1)) : record.everyMs;
    live.nextAt = Date.now() + waitMs;
    live.timer = setTimeout(() => {
      live.timer = undefined;
      // A failure is already reported (event, lastError); the schedule goes on.
      this.sync(record.id).catch(() => undefined);
    }, waitMs);
  }

  /** Arm a timer for the instant the replica's lag passes its threshold, unless it is already lagging. */
  #watchLag(record: ReplicaRecord): void {
    const live = this.#liveOf(record.id);
    if (live.lagTimer) clearTimeout(live.lagTimer);
    live.lagTimer = undefined;
    const thresholdMs = laggingAfterMs(record);
    const since = record.last?.point ?? record.addedAt;
    if (this.#closing || record.paused || record.lagging || thresholdMs === null || since === null || !this.#records.has(record.id)) return;
    const dueMs = Date.parse(since) + thresholdMs - Date.now();
    live.lagTimer = setTimeout(() => {
      live.lagTimer = undefined;
      this.#lagging(record, thresholdMs, since).catch((err: unknown) => {
        this.#options.log.error({ event: 'replica-lagging', replica: record.id, reason: (err as Error).message }, 'cannot record that the replica lags');
      });
    }, Math.max(0, dueMs));
  }

  async #lagging(record: ReplicaRecord, thresholdMs: number, since: string): Promise<void> {
    // A sync completed meanwhile (its point moved) or the replica went away: watch again from now.
    if (!this.#records.has(record.id) || record.lagging || (record.last?.point ?? record.addedAt) !== since) {
      this.#watchLag(record);
      return;
    }
    record.lagging = true;
    await this.#save();
    const lagMs = Date.now() - Date.parse(since);
    this.#options.log.warn({ event: 'replica-lagging', replica: record.id, lagMs, thresholdMs }, 'replica lags behind');
    this.#options.events.emit('replica-lagging', {
      details: { replica: record.id, devices: record.devices, lastComplete: record.last?.point ?? null, lagMs, thresholdMs, lastError: record.lastError },
    });
  }

  async #sync(record: ReplicaRecord): Promise<void> {
    if (this.#closing) throw new BdsnapError('ESHUTDOWN', 'the daemon is stopping');
    if (!this.#records.has(record.id)) throw new BdsnapError('ENOENT', `no replica ${record.id}`);
    // A sync queued before a pause does not run after it.
    if (record.paused) throw new BdsnapError('ESESSION', `replica ${record.id} is paused`);
    const live = this.#liveOf(record.id);
    live.syncing = true;
    const abort = new AbortController();
    live.abort = abort;
    try {
      const summary = await this.#syncOnce(record, abort.signal);
      live.failures = 0;
      // A sync that took long (or hung) can complete a point that is itself past the threshold: the episode goes on.
      const thresholdMs = laggingAfterMs(record);
      const caughtUp = record.lagging && (thresholdMs === null || record.last === null || Date.now() - Date.parse(record.last.point) < thresholdMs);
      if (caughtUp) {
        record.lagging = false;
        await this.#save();
      }
      this.#options.events.emit('replica-synced', { snapshot: summary.snapshot, details: { replica: record.id, point: record.last?.point, devices: record.devices, caughtUp, ...summary } });
    } catch (err) {
      const e = whyCutShort(record, toBdsnapError(err), abort.signal);
      live.failures++;
      record.lastError = e.message;
      await this.#save().catch(() => undefined);
      this.#options.events.emit('replica-failed', { details: { replica: record.id, code: e.code, reason: e.message, devices: record.devices } });
      throw e;
    } finally {
      live.syncing = false;
      live.abort = undefined;
      this.#schedule(record);
    }
  }

  async #syncOnce(record: ReplicaRecord, signal: AbortSignal): Promise<ReplicaSyncSummary> {
    const { snapshots, log } = this.#options;
    const startedMs = performance.now();
    const { endpoint, tls } = parseTargetUri(record.target);
    const tlsOptions = tls ? await loadClientTls(tls) : undefined;
    await checkSockets(endpoint, record.standbyRunDir);
    const snapshot = await snapshots.create(record.devices, {});
    record.inProgress = snapshot.id;
    if (record.standbyRunDir === null) record.incomplete = true;
    await this.#save();
    const counters: CopyCounters = { bytesSent: 0, zeroBytes: 0 };
    const handles: ExportHandle[] = [];
    const targets: NbdClient[] = [];
    let standby: BdsnapClient | undefined;
    let token: string | undefined;
    let committed = false;
    try {
      const plans = snapshot.images.map((image) => this.#plan(record, snapshot.id, image));
      if (record.standbyRunDir !== null) {
        standby = await BdsnapClient.connect(record.standbyRunDir, { timeoutMs: this.#timeoutMs });
        const begun = await standby.request('replica-receive', { action: 'begin', replica: record.id, devices: record.exports, point: snapshot.createdAt });
        token = begun.token;
        // A target the standby cannot vouch for (changed around bdsnap since the last sync) is sent whole.
        for (const { device, reason } of begun.sendWhole ?? []) {
          const i = record.exports.indexOf(device);
          const plan = plans[i];
          if (plan && !plan.full) plans[i] = { ...plan, ranges: [{ offsetBytes: 0, lengthBytes: plan.image.sizeBytes }], full: true, why: `the standby's copy must be sent whole: ${reason}` };
        }
      }
      // Every target stays open until the commit: a bdsnap standby undoes a sync whose devices are let go first.
      await this.#open(record, plans, { ...endpoint, timeoutMs: this.#timeoutMs, ...(tlsOptions ? { tls: tlsOptions } : {}) }, handles, targets);
      const rate = record.limitBytesPerSecond !== null ? new RateLimit(record.limitBytesPerSecond) : undefined;
      for (const [i, plan] of plans.entries()) {
        await copyRanges(handles[i]!.device, targets[i]!, plan.ranges, counters, { ...(rate ? { rate } : {}), signal });
      }
      for (const target of targets) await target.flush();
      signal.throwIfAborted();
      if (standby && token !== undefined) {
        const full = record.exports.filter((_, i) => plans[i]?.full);
        await standby.request('replica-receive', { action: 'commit', replica: record.id, token, ...(full.length > 0 ? { full } : {}) });
      }
      committed = true;
      return await this.#completed(record, snapshot, plans, counters, startedMs);
    } catch (err) {
      if (!committed) record.bytesSent += counters.bytesSent;
      if (standby && token !== undefined && !committed) {
        await standby.request('replica-receive', { action: 'abort', replica: record.id, token }).catch(() => undefined);
      }
      throw err;
    } finally {
      await Promise.allSettled(targets.map((t) => t.close()));
      await Promise.allSettled(handles.map((h) => h.release()));
      standby?.close();
      await snapshots.destroy(snapshot.id, { force: true }).catch((err: unknown) => {
        log.warn({ event: 'replica-snapshot-left', replica: record.id, snapshot: snapshot.id, reason: (err as Error).message }, 'cannot destroy a sync\'s snapshot');
      });
      record.inProgress = null;
      await this.#save().catch(() => undefined);
    }
  }

  /**
   * Open each plan's image and its target export (pushed onto `handles` and `targets` as they
   * open, so the caller closes what opened even when a later one fails), checking each target
   * takes the image: writable and of the same size.
   */
  async #open(record: ReplicaRecord, plans: SyncPlan[], endpoint: Omit<NbdClientOptions, 'exportName'>, handles: ExportHandle[], targets: NbdClient[]): Promise<void> {
    for (const [i, plan] of plans.entries()) {
      const handle = this.#options.snapshots.openImage(plan.image.exportName);
      if (!handle) throw new BdsnapError('ENOENT', `the image ${plan.image.exportName} went away`);
      handles.push(handle);
      const target = await NbdClient.connect({ ...endpoint, exportName: record.exports[i]! } satisfies NbdClientOptions);
      targets.push(target);
      if (target.readOnly) throw new BdsnapError('EPERM', `the target export ${record.exports[i]} is read-only`);
      if (target.size !== plan.image.sizeBytes) {
        throw new BdsnapError('EINVAL', `the target export ${record.exports[i]} is ${target.size} bytes, ${plan.image.device} is ${plan.image.sizeBytes}: a replica target must be the same size`);
      }
    }
  }

  /** A committed sync: its point becomes the replica's last complete one. */
  async #completed(record: ReplicaRecord, snapshot: SnapshotInfo, plans: SyncPlan[], counters: CopyCounters, startedMs: number): Promise<ReplicaSyncSummary> {
    const summary: ReplicaSyncSummary = {
      full: plans.some((p) => p.full), why: [...new Set(plans.map((p) => p.why))].join('; '),
      bytesSent: counters.bytesSent, zeroBytes: counters.zeroBytes,
      durationMs: Math.round(performance.now() - startedMs), snapshot: snapshot.id,
    };
    record.last = { point: snapshot.createdAt, points: Object.fromEntries(plans.map((p) => [p.image.device, p.image.cbt])) };
    record.incomplete = false;
    record.bytesSent += counters.bytesSent;
    record.lastSync = summary;
    record.lastError = null;
    await this.#save();
    this.#options.log.info({ event: 'replica-synced', replica: record.id, ...summary }, 'replica synced');
    return summary;
  }

  /** What one device's image must send: everything, or what changed since the last complete point, and why. */
  #plan(record: ReplicaRecord, snapshotId: string, image: SnapshotImageInfo): SyncPlan {
    const all = { image, ranges: [{ offsetBytes: 0, lengthBytes: image.sizeBytes }], full: true };
    const previous = record.last?.points[image.device];
    if (!record.last || previous === undefined) return { ...all, why: 'first sync' };
    if (!image.cbt) return { ...all, why: 'change tracking is off in this daemon' };
    if (previous === null) return { ...all, why: 'the last sync had no change map' };
    if (previous.generation !== image.cbt.generation) {
      return { ...all, why: `change map reset (generation ${previous.generation} is now ${image.cbt.generation})` };
    }
    const ranges = this.#options.snapshots.changes(snapshotId, image.device, previous.generation, previous.number);
    if (ranges === null) return { ...all, why: `the change map cannot tell what changed since #${previous.number}` };
    return { image, ranges, full: false, why: `changed blocks since ${record.last.point}` };
  }

  #get(id: string): ReplicaRecord {
    const record = this.#records.get(id);
    if (!record) throw new BdsnapError('ENOENT', `no replica ${id} on this daemon`);
    return record;
  }

  #info(r: ReplicaRecord): ReplicaInfo {
    const live = this.#live.get(r.id);
    const state: ReplicaInfo['state'] = live?.syncing ? 'syncing' : r.paused ? 'paused' : r.incomplete ? 'incomplete' : r.lastError !== null ? 'failed' : 'idle';
    return {
      id: r.id, devices: r.devices, target: r.target, exports: r.exports, targetKind: r.standbyRunDir !== null ? 'bdsnap' : 'plain',
      everyMs: r.everyMs, limitBytesPerSecond: r.limitBytesPerSecond, state,
      lastComplete: r.last?.point ?? null, lagMs: r.last ? Date.now() - Date.parse(r.last.point) : null,
      laggingAfterMs: laggingAfterMs(r), lagging: r.lagging,
      bytesSent: r.bytesSent, lastSync: r.lastSync, lastError: r.lastError,
      nextSyncAt: live?.nextAt != null ? new Date(live.nextAt).toISOString() : null,
    };
  }

  async #save(): Promise<void> {
    await writeFileAtomic(this.#file, `${JSON.stringify({ version: 1, replicas: [...this.#records.values()] }, null, 2)}\n`);
  }
}

/**
 * A sync cut short (a pause, the daemon stopping, a standby that stopped answering): what cut
 * it, what the target holds now, and what to do, in the one line. Other failures are left as
 * they are. `signal` is the sync's: aborted, its reason says by what (an AbortError thrown
 * where the sync was waiting says only "The operation was aborted").
 */
function whyCutShort(record: ReplicaRecord, err: BdsnapError, signal: AbortSignal): BdsnapError {
  if (signal.aborted) {
    const by = toBdsnapError(signal.reason);
    const again = record.last !== null ? `what changed since ${record.last.point}` : 'the devices whole';
    const schedule = record.everyMs !== null ? ` (or wait for its schedule, every ${formatDuration(record.everyMs)})` : '';
    const next = record.paused
      ? `to go on, bdsnap replica resume ${record.id}, then bdsnap replica sync ${record.id}${schedule}: it sends ${again} again`
      : `once the daemon is started again, bdsnap replica sync ${record.id}${schedule} sends ${again} again`;
    return new BdsnapError(by.code, `replica ${record.id}: the sync was cut short because ${by.message}; ${heldAfterCut(record)}; ${next}`, { cause: err });
  }
  if (err.code !== 'ETIMEDOUT') return err;
  const where = record.standbyRunDir !== null ? 'the standby keeps its last complete point' : 'the target stays marked incomplete';
  return new BdsnapError('ETIMEDOUT', `replica ${record.id}: the sync was cut short because ${err.message}; ${where}: check the standby (a stopped daemon, the network) at ${record.target}; the next sync retries`, { cause: err });
}

/** What the target holds after a sync that did not commit (see the header: a bdsnap standby undoes it, a plain one cannot). */
function heldAfterCut(record: ReplicaRecord): string {
  if (record.standbyRunDir !== null) {
    return record.last !== null
      ? `the standby keeps its last complete point, ${record.last.point}: what it received of this sync is undone`
      : 'the standby has no complete point yet: what it received of this first sync is undone';
  }
  return `the target, a plain NBD server that cannot undo, holds part of this sync over ${record.last !== null ? `the last complete point, ${record.last.point}` : 'what it held before'}, and stays marked incomplete until a sync finishes`;
}

/** The replica's lagging threshold: its own, or LAGGING_AFTER_INTERVALS of its interval; null: never lagging. */
function laggingAfterMs(record: ReplicaRecord): number | null {
  return record.laggingAfterMs ?? (record.everyMs !== null ? LAGGING_AFTER_INTERVALS * record.everyMs : null);
}

/**
 * A unix socket named `nbd.sock` beside a `control.sock` is a bdsnap daemon's run directory:
 * its syncs can go inside sessions there. Anything else is taken as a plain NBD server.
 */
function standbyOf(endpoint: TargetEndpoint): string | null {
  if (!('socketPath' in endpoint) || path.basename(endpoint.socketPath) !== NBD_SOCKET) return null;
  const runDir = path.dirname(endpoint.socketPath);
  return fs.existsSync(controlSocketPath(runDir)) ? runDir : null;
}

/**
 * The export each device goes to. No export in the URI: each device's own path (a standby
 * with the same paths). An export ending in '/': that directory and the device's file name.
 * Otherwise the URI names the one device's export.
 */
function exportsFor(devices: string[], exportName: string, uri: string): string[] {
  if (exportName === '') return devices;
  if (exportName.endsWith('/')) {
    const exports = devices.map((d) => `${exportName}${path.basename(d)}`);
    const twice = exports.find((e, i) => exports.indexOf(e) !== i);
    if (twice !== undefined) throw new BdsnapError('EINVAL', `two devices would both go to ${twice}: give them different file names or one replica each`);
    return exports;
  }
  if (devices.length > 1) {
    throw new BdsnapError('EINVAL', `${uri} names one export for ${devices.length} devices: name a directory (an export ending in /) or none (each device goes to the export of its own path)`);
  }
  return [exportName];
}

/**
 * The unix sockets a sync talks to must be root's to name: whoever could put another socket
 * there would receive the devices' content, or answer for the standby.
 */
async function checkSockets(endpoint: TargetEndpoint, standbyRunDir: string | null): Promise<void> {
  const sockets = [...('socketPath' in endpoint ? [endpoint.socketPath] : []), ...(standbyRunDir !== null ? [controlSocketPath(standbyRunDir)] : [])];
  for (const socket of sockets) {
    const why = await whyOthersCanRename(socket);
    if (why !== undefined) {
      throw new BdsnapError('EPERM', `${socket} can be replaced by another user (${why}), who would then receive the devices' content: use a socket in a directory only root can write`);
    }
  }
}
