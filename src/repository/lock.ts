/**
 * Locks made of objects, for stores that have no lock and no rename (see object-store.ts).
 *
 * Rule: any number of `create` locks may coexist; a `prune` lock excludes every other lock.
 * To take a lock, a writer puts its lock object first and only then lists `locks/`: if it sees
 * a live lock it conflicts with, it deletes its own and gives up (EBUSY). Two writers that put
 * at the same instant both see each other and both give up, so at most one side ever goes on;
 * this needs only a store whose list shows an object once its put has returned (local disks
 * do, and S3 has been strongly consistent since 2020).
 *
 * Why prune needs the exclusive lock: a running `create` reuses pieces that exist already
 * (deduplication) before any manifest names them again, so prune cannot tell by looking at
 * manifests alone which pieces a running create still counts on.
 *
 * A lock is live while its holder refreshes it (a put every REFRESH_MS); one not refreshed for
 * STALE_MS is ignored. On the same host (hostname and boot id) a lock whose process is gone
 * (pid and process start time no longer match) is dead at once, so a create killed with SIGKILL
 * does not hold up a prune for long; one whose process /proc cannot tell about counts by its age
 * alone. Prune deletes dead and stale locks before it deletes anything else.
 *
 * The holder's side of staleness: a holder that stalled longer than STALE_MS (a stopped process,
 * a paused VM, a store that refused its refreshes) cannot tell whether a prune on another host
 * took its lock over meanwhile and deleted the pieces it counted on. So it checks before it
 * commits (assertHeld): by its own clock, and by the lock object still being its own; a refresh
 * never puts back a lock that was removed.
 */

import os from 'node:os';
import { z } from 'zod';
import { BdsnapError, toBdsnapError } from '../errors.js';
import { readBootId } from '../host/device-stamp.js';
import { PROC_PATH, processStartTime, processStartTimeSync } from '../host/processes.js';
import { tryParseJson } from '../stored-json.js';
import { LOCKS_PREFIX, newBackupId } from './format.js';
import type { ObjectInfo, ObjectStore } from './object-store.js';

export type LockKind = 'create' | 'prune';
/**
 * What a `create` lock is held for, when it is not a backup being created: said by a prune it
 * refuses, so that the operator knows what to wait for.
 */
export type LockPurpose = 'instant-restore' | 'serve' | 'copy-from' | 'copy-to';

export const REFRESH_MS = 60_000;
export const STALE_MS = 10 * 60_000;
/** A lock object is about 150 bytes; a larger one is judged by its age alone. */
const MAX_LOCK_BYTES = 4096;

const lockSchema = z.object({
  kind: z.enum(['create', 'prune']),
  host: z.string(),
  pid: z.number().int(),
  /** /proc/<pid>/stat start time, to tell a reused pid apart. */
  processStart: z.string().nullable(),
  createdAt: z.string(),
  /**
   * The kernel's boot id: a pid means something only on the machine and boot that wrote it, and
   * two machines may share a hostname (clones, containers). Absent in older locks.
   */
  bootId: z.string().optional(),
  /** A LockPurpose; absent for a backup being created. Any string, so that a newer one still parses. */
  purpose: z.string().max(64).optional(),
  /** The backup an instant restore copies from: forget refuses it while the lock is live. Absent in older locks. */
  backup: z.string().max(64).optional(),
});
type LockBody = z.infer<typeof lockSchema>;

export interface LockInfo extends LockBody {
  name: string;
  /** 'live', or why it no longer counts. */
  state: 'live' | 'dead' | 'stale';
  /** Why a lock of this host counts as live without its process being checked. */
  unchecked?: string;
}

export interface LockOptions {
  /** Where procfs is (default /proc): the process of a lock of this host is looked up there. */
  proc?: string;
}

/** What the holder of a lock that refuses another is doing, and what to do about it. */
function whyRefused(lock: LockInfo, location: string): string {
  const held = `(${lock.name}, pid ${lock.pid} on ${lock.host})`;
  if (lock.kind === 'prune') return `a prune is running in ${location} ${held}; try again when it is done`;
  switch (lock.purpose as LockPurpose | undefined) {
    case 'instant-restore':
      return `an instant restore reads ${location} ${held}: the pieces it has not copied yet must stay; prune once it is complete ('bdsnap status' on ${lock.host} shows its progress)`;
    case 'serve':
      return `a backup of ${location} is being served ${held}: its readers need the packs it names; prune once 'bdsnap backup serve' has stopped`;
    case 'copy-from':
      return `a backup copy reads from ${location} ${held}; try again when the copy is done`;
    case 'copy-to':
      return `a backup copy writes into ${location} ${held}; try again when the copy is done`;
    default:
      return `a backup is being created in ${location} ${held}; try again when it is done`;
  }
}

/**
 * A lock of this host is dead once its process is gone (or its pid now names another process).
 * When /proc cannot tell, the lock is judged by its age alone, as one of another host is: a
 * prune must never break the lock of a create that may still be running.
 */
async function stateOf(body: LockBody, info: ObjectInfo, nowMs: number, proc: string): Promise<Pick<LockInfo, 'state' | 'unchecked'>> {
  const byAge = nowMs - info.modifiedMs > STALE_MS ? 'stale' : 'live';
  if (body.host !== os.hostname() || !body.bootId || body.bootId !== readBootId()) return { state: byAge };
  let start: string | null;
  try {
    start = await processStartTime(body.pid, proc);
  } catch (err) {
    return { state: byAge, unchecked: `whether pid ${body.pid} still runs cannot be told (${(err as Error).message}), so the lock counts until it is ${STALE_MS / 60_000} minutes old` };
  }
  if (start === null || (body.processStart !== null && start !== body.processStart)) return { state: 'dead' };
  return { state: byAge };
}

/**
 * Every lock in the store (with `kind`, of that kind only: the others are not read) with its
 * state; an unreadable lock object counts by its age alone.
 */
export async function listLocks(store: ObjectStore, options: LockOptions & { kind?: LockKind } = {}): Promise<LockInfo[]> {
  const now = Date.now();
  const out: LockInfo[] = [];
  for (const info of await store.list(LOCKS_PREFIX)) {
    const kind = info.name.endsWith('.prune') ? 'prune' : 'create';
    if (options.kind !== undefined && kind !== options.kind) continue;
    const stored = await store.get(info.name, { maxBytes: MAX_LOCK_BYTES }).catch(() => undefined);
    // Torn or foreign: judged by its age (host '?' is never this host).
    const body: LockBody = (stored && tryParseJson(stored, lockSchema)) ?? { kind, host: '?', pid: -1, processStart: null, createdAt: new Date(info.modifiedMs).toISOString() };
    const judged = body.pid === -1 ? { state: now - info.modifiedMs > STALE_MS ? 'stale' as const : 'live' as const } : await stateOf(body, info, now, options.proc ?? PROC_PATH);
    out.push({ ...body, name: info.name, ...judged });
  }
  return out;
}

/**
 * How long a holder may go without a refresh it knows landed before it must assume that a
 * prune on some host took its lock over (STALE_MS, judged by the store's clock): half of it, as
 * a margin for the two clocks and a refresh that landed late.
 */
export const HELD_MARGIN_MS = STALE_MS / 2;

export class RepoLock {
  readonly name: string;
  readonly #store: ObjectStore;
  readonly #body: Buffer;
  #timer: NodeJS.Timeout | undefined;
  #refreshing: Promise<void> | undefined;
  #released = false;
  /** When the last put of the lock that succeeded was started. */
  #confirmedMs = Date.now();
  /** Why the lock is known lost, once it is. */
  #lost: string | undefined;

  private constructor(store: ObjectStore, name: string, body: Buffer) {
    this.#store = store;
    this.name = name;
    this.#body = body;
  }

  /** Take a lock of `kind`, or fail with EBUSY naming the lock in the way. */
  static async acquire(store: ObjectStore, kind: LockKind, options: LockOptions & { purpose?: LockPurpose; backup?: string } = {}): Promise<RepoLock> {
    const name = `${LOCKS_PREFIX}${newBackupId()}.${kind}`;
    const body: LockBody = {
      kind, host: os.hostname(), pid: process.pid, processStart: processStartTimeSync(process.pid, options.proc), createdAt: new Date().toISOString(),
      bootId: readBootId(), ...(options.purpose !== undefined ? { purpose: options.purpose } : {}),
      ...(options.backup !== undefined ? { backup: options.backup } : {}),
    };
    const lock = new RepoLock(store, name, Buffer.from(`${JSON.stringify(body)}\n`));
    lock.#confirmedMs = Date.now();
    await store.put(name, lock.#body);
    try {
      // Only a prune keeps a create out: a create reads no other create's lock (on S3 each is a round trip).
      const others = (await listLocks(store, { ...options, ...(kind === 'create' ? { kind: 'prune' as const } : {}) })).filter((l) => l.name !== name && l.state === 'live');
      const blocking = others.find((l) => kind === 'prune' || l.kind === 'prune');
      if (blocking) {
        const doubt = blocking.unchecked ? `; ${blocking.unchecked}` : '';
        throw new BdsnapError('EBUSY', `${whyRefused(blocking, store.location)}${doubt}`);
      }
    } catch (err) {
      await store.delete(name).catch(() => undefined);
      throw err;
    }
    lock.#timer = setInterval(() => {
      lock.#refreshing ??= lock.#refresh().catch(() => undefined).finally(() => (lock.#refreshing = undefined));
    }, REFRESH_MS);
    lock.#timer.unref();
    return lock;
  }

  /** Put the lock again, unless it is gone: a lock a prune removed is not brought back, it is lost. */
  async #refresh(): Promise<void> {
    if (this.#lost !== undefined) return;
    const startedMs = Date.now();
    if (!(await this.#store.stat(this.name))) {
      this.#lost = 'it was removed from the repository';
      return;
    }
    await this.#store.put(this.name, this.#body);
    this.#confirmedMs = startedMs;
  }

  /** assertHeld without I/O: by this process's clock and what the refreshes saw. */
  assertFresh(what: string, consequence: string): void {
    const lost = (why: string): BdsnapError => this.#lostError(what, why, consequence);
    if (this.#lost !== undefined) throw lost(this.#lost);
    const gapMs = Date.now() - this.#confirmedMs;
    if (gapMs > HELD_MARGIN_MS) throw lost(`it was not refreshed for ${Math.round(gapMs / 1000)} s, and a lock counts as stale after ${STALE_MS / 1000} s`);
  }

  /**
   * EBUSY unless this lock has been held all along: refreshed within HELD_MARGIN_MS by this
   * process's clock, and still in the store as this process wrote it. A holder that stalled
   * (a stopped process, a paused VM, a store that refused refreshes) may have been judged stale
   * and its lock taken over, by a prune that then deleted pieces a create counts on, or by a
   * create that counts on pieces a prune is deleting; so it must not go on. `consequence` ends
   * the message ("nothing was recorded; run the backup again"). On success the lock is
   * refreshed, so what follows has the whole STALE_MS ahead of it.
   */
  async assertHeld(what: string, consequence: string): Promise<void> {
    await this.#refreshing;
    this.assertFresh(what, consequence);
    let stored: Buffer | undefined;
    try {
      stored = await this.#store.get(this.name, { maxBytes: MAX_LOCK_BYTES });
    } catch (err) {
      if (toBdsnapError(err).code !== 'ENOENT') throw err;
    }
    if (!stored?.equals(this.#body)) {
      this.#lost = stored ? 'it was replaced' : 'it was removed from the repository';
      throw this.#lostError(what, this.#lost, consequence);
    }
    const startedMs = Date.now();
    await this.#store.put(this.name, this.#body);
    this.#confirmedMs = startedMs;
  }

  #lostError(what: string, why: string, consequence: string): BdsnapError {
    return new BdsnapError('EBUSY', `${what}'s lock ${this.name} was taken over (${why}); ${consequence}`);
  }

  async release(): Promise<void> {
    if (this.#released) return;
    this.#released = true;
    clearInterval(this.#timer);
    // A refresh that lands after the delete would bring the lock back.
    await this.#refreshing;
    await this.#store.delete(this.name);
  }
}
