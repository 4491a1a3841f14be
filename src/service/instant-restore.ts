/**
 * Instant restore: the daemon serves a target (a device, or a new file) with a backup's content
 * at once, and copies the rest behind.
 *
 * The target is cut into the backup's piece slots. A slot is *done* when the target holds its
 * content: the backup's piece, or what a client wrote over all of it. Reads of a slot not done
 * fill it from the backup first (written through to the target); a write that covers part of
 * such a slot fills it first, one that covers all of it needs nothing from the backup. Every
 * change to a slot not done runs under that slot's lock, so the background copy never writes a
 * backup piece over a client's write.
 *
 * Crash safety: the map of done slots (`done.map`, one bit each) is written only after the
 * target is synced, and holds only slots that were done before that sync started; bits only
 * ever go from 0 to 1, so a torn write of the map is still a true map. A client's FLUSH (and a
 * FUA write) is answered after the target and the map are durable. After a kill or a crash the
 * restore resumes from the map: a slot not in it is filled again from the backup, and every
 * slot in it holds durable data. A client write that was never flushed may be lost, as on any
 * disk.
 *
 * While a restore runs, the target is served only through it (the daemon's other holders of the
 * device are refused), under the target's canonical path (as the registry names devices) as
 * export name. A device is one device whatever names it: another name of a target (a symbolic
 * link, `..`, a hard link) finds its restore by identity, as the registry finds a device, and a
 * second restore onto it is refused. Once every slot is done the
 * restore is complete; the target becomes an ordinary device when the last client of the
 * restore lets go.
 *
 * A restore recorded as running is never dropped and never resumed behind anyone's back: one
 * that cannot resume (the repository missing or not mounted yet, a password no key accepts any
 * more, its backup gone) is *stopped*. It stays listed with the reason, its map and state stay
 * as they were, and its target is refused to every client and holder (the slots not done
 * cannot be read: they are neither the backup nor what a client wrote). It resumes when asked
 * (the same `backup restore --instant` again, which may bring a new password) or at the next
 * start, exactly where its map says; or it is given up on request, which removes its state and
 * leaves the target as it is, incomplete, saying so.
 */

import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { z } from 'zod';
import { checkRange, type BlockDevice, type BlockSizes, type Extent, type WriteOptions, type ZeroOptions } from '../device/block-device.js';
import { FileDevice } from '../device/file-device.js';
import { BdsnapError, toBdsnapError, type ErrorCode } from '../errors.js';
import { writeFileAtomic } from '../host/atomic-file.js';
import { readDeviceIdentity, sameIdentity, describeIdentity, type StampIdentity } from '../host/device-stamp.js';
import { closeFd, fdatasyncFd, openFd, preadFully, pwriteFully } from '../host/fd-io.js';
import { checkNotInUse } from '../host/in-use.js';
import { openOutputFile, symlinkRefused } from '../host/output-file.js';
import { ensurePrivateDir, followedSafely } from '../host/private-dir.js';
import { parseJson } from '../stored-json.js';
import type { ExportHandle } from '../nbd/exports.js';
import type { PieceFetcher, PiecePlacer } from '../repository/backup-device.js';
import { runLimited } from '../run-limited.js';
import { formatBytes } from '../units.js';
import type { EventLog } from './events.js';
import type { DeviceStatus, InstantRestoreInfo } from './control-protocol.js';
import type { MountInfo } from './device-table.js';
import { describeRestoreHold } from './device-holders.js';
import { canonicalDevicePath } from './registry.js';

const RESTORES_DIR = 'restores';
const STATE_FILE = 'state.json';
/** The repository password, for a resume after a restart; removed with the restore's directory. */
const PASSWORD_FILE = 'password';
const MAP_FILE = 'done.map';
/**
 * The background copy works in batches of slots not done: their pieces fetched together (by
 * runs of their packs, when the source is a repository), then written as extents of adjacent
 * slots; from a local repository, placed by the piece workers instead (placeSlots). Batches
 * are fetched while another is written.
 */
const BATCH_BYTES = 16 * 1024 * 1024;
const BATCHES_IN_FLIGHT = 3;
/** While a client is busy the copy takes batches this small, so that it waits little behind them. */
const BUSY_BATCH_BYTES = 1024 * 1024;
/**
 * A restore is asked for to be used at once: until its first client's first request, or this
 * long after the copy begins, the copy has one batch in flight, not BATCHES_IN_FLIGHT, so that
 * the first read is not queued behind theirs (on S3, their GETs and then their pieces' decoding).
 */
const FIRST_CLIENT_WAIT_MS = 1000;
/** Pieces a batch has placed at once (see placeSlots): enough to keep the piece workers busy, few enough that a client's read is not queued behind many. */
const PLACES_IN_FLIGHT = 4;
/** Pieces read at once from a source that is only a device (no fetch by packs). */
const SLOT_READS_IN_FLIGHT = 8;
/** The map is made durable at least this often while the copy runs. */
const PERSIST_EVERY_MS = 1000;
const RETRY_MIN_MS = 500;
const RETRY_MAX_MS = 30_000;

const stateSchema = z.object({
  version: z.literal(1),
  target: z.string().min(1),
  /** The target was created by the restore (--output). */
  created: z.boolean(),
  /** The target's identity when the restore began: a resume refuses anything else under the name. */
  identity: z.object({ dev: z.number(), ino: z.number() }),
  repo: z.string().min(1),
  backup: z.string().min(1),
  device: z.string().min(1),
  sizeBytes: z.number().int().nonnegative(),
  pieceBytes: z.number().int().positive(),
  startedAt: z.string(),
}).strict();
export type RestoreState = z.infer<typeof stateSchema>;

/**
 * The source of a restore: one device of a backup. `fetchPieces`, where given, fetches many
 * of its pieces at once (the background copy's way); without it they are read through `source`.
 * `placePiece` (a local repository) takes precedence over both for the background copy.
 */
export interface RestoreSource {
  source: BlockDevice;
  slots: ReadonlyArray<string | null>;
  pieceBytes: number;
  fetchPieces?: PieceFetcher;
  /** Where given, the background copy has pieces written straight into the target (see placeSlots). */
  placePiece?: PiecePlacer;
  /**
   * Where given, reads the repository's index again, so that a piece repaired since (dropped
   * by verify and stored again by a backup) is found where it now is; throws, and changes
   * nothing, once the backup no longer names the pieces it named at the start.
   */
  refresh?(): Promise<void>;
  /** False: the source needs no password, and none is kept for a resume. */
  encrypted?: boolean;
  close(): Promise<void>;
}

/** Opens the source of a restore. */
export type SourceOpener = (repo: string, backup: string, device: string, password: string | undefined) => Promise<RestoreSource>;

/** Reloads of a source (RestoreSource.refresh) at most this often. */
const REFRESH_MIN_MS = RETRY_MIN_MS;

/**
 * The reloads of one restore's source, asked for whenever a piece cannot be had. Whoever asks
 * gets a reload that begins after the ask (a repair finished just before it is seen), shared by
 * everyone who asks until it begins; reloads run one at a time and begin at most once every
 * REFRESH_MIN_MS, so that a client whose reads all fail does not have the index read again for
 * each of them.
 */
export class SourceRefresh {
  readonly #refresh: (() => Promise<void>) | undefined;
  readonly #onError: (err: BdsnapError) => void;
  #running: Promise<boolean> | undefined;
  /** The next reload, not begun yet: shared by whoever asks until it begins. */
  #next: Promise<boolean> | undefined;
  #lastMs = -Infinity;
  /** Why the last reload failed, until one succeeds: status shows it beside the piece that failed. */
  problem: string | undefined;

  constructor(refresh: (() => Promise<void>) | undefined, onError: (err: BdsnapError) => void) {
    this.#refresh = refresh;
    this.#onError = onError;
  }

  /** True once the source was reloaded, so that what failed before is worth one more try. */
  run(): Promise<boolean> {
    const refresh = this.#refresh;
    if (!refresh) return Promise.resolve(false);
    this.#next ??= (async () => {
      await this.#running;
      const waitMs = this.#lastMs + REFRESH_MIN_MS - Date.now();
      if (waitMs > 0) await new Promise((resolve) => setTimeout(resolve, waitMs));
      this.#next = undefined;
      this.#lastMs = Date.now();
      const running = refresh().then(() => {
        this.problem = undefined;
        return true;
      }, (err: unknown) => {
        const e = toBdsnapError(err);
        this.problem = e.message;
        this.#onError(e);
        return false;
      });
      this.#running = running;
      try {
        return await running;
      } finally {
        if (this.#running === running) this.#running = undefined;
      }
    })();
    return this.#next;
  }
}

/** The done bits, in memory and on disk. */
class DoneMap {
  readonly bits: Uint8Array;
  readonly #fd: number;
  #count = 0;
  #persisting: Promise<void> | undefined;

  private constructor(fd: number, bits: Uint8Array) {
    this.#fd = fd;
    this.bits = bits;
    for (let i = 0; i < bits.length * 8; i++) if (this.has(i)) this.#count++;
  }

  static async open(file: string, slots: number): Promise<DoneMap> {
    const fd = await openFd(file, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_NOFOLLOW, 0o600);
    try {
      const bits = new Uint8Array(Math.ceil(slots / 8));
      const got = await preadFully(fd, Buffer.from(bits.buffer), 0);
      if (got !== 0 && got !== bits.length) throw new BdsnapError('ECORRUPT', `${file} is ${got} bytes where ${bits.length} are expected`);
      return new DoneMap(fd, bits);
    } catch (err) {
      await closeFd(fd);
      throw err;
    }
  }

  has(i: number): boolean {
    return (this.bits[i >> 3]! & (1 << (i & 7))) !== 0;
  }

  set(i: number): void {
    if (this.has(i)) return;
    this.bits[i >> 3]! |= 1 << (i & 7);
    this.#count++;
  }

  get count(): number {
    return this.#count;
  }

  /**
   * Make the bits durable that were set before this call, after `syncData` made their data
   * durable. A call while one runs waits for it, then runs its own.
   */
  persist(syncData: () => Promise<void>): Promise<void> {
    if (this.#persisting) return this.#persisting.then(() => this.persist(syncData));
    const run = async (): Promise<void> => {
      const taken = Buffer.from(this.bits);
      await syncData();
      await pwriteFully(this.#fd, taken, 0);
      await fdatasyncFd(this.#fd);
    };
    this.#persisting = run().finally(() => {
      this.#persisting = undefined;
    });
    return this.#persisting;
  }

  close(): Promise<void> {
    return closeFd(this.#fd);
  }
}

/** The device clients see while a restore runs. */
export class InstantRestoreDevice implements BlockDevice {
  readonly readOnly = false;
  readonly canFastZero = false;
  readonly canMultiConn = true;
  readonly #target: FileDevice;
  readonly #source: BlockDevice;
  readonly #slots: ReadonlyArray<string | null>;
  readonly #P: number;
  readonly #map: DoneMap;
  /** Slots being changed while not done, by index. */
  readonly #locks = new Map<number, Promise<void>>();
  /** Called when a read needs a piece the backup cannot give. */
  readonly #onSourceError: (err: BdsnapError) => void;
  /** Reloads the source after a piece could not be had: true once it did. */
  readonly #refreshSource: () => Promise<boolean>;
  lastClientRequestMs = 0;
  #markFirstRequest!: () => void;
  /** Resolves at the first request of a client. */
  readonly firstRequest = new Promise<void>((resolve) => (this.#markFirstRequest = resolve));

  constructor(target: FileDevice, source: BlockDevice, slots: ReadonlyArray<string | null>, pieceBytes: number, map: DoneMap,
    hooks: { onSourceError: (err: BdsnapError) => void; refreshSource: () => Promise<boolean> }) {
    this.#target = target;
    this.#source = source;
    this.#slots = slots;
    this.#P = pieceBytes;
    this.#map = map;
    this.#onSourceError = hooks.onSourceError;
    this.#refreshSource = hooks.refreshSource;
  }

  get size(): number { return this.#source.size; }
  get blockSizes(): BlockSizes { return this.#target.blockSizes; }
  get canTrim(): boolean { return this.#target.canTrim; }
  get doneSlots(): number { return this.#map.count; }
  get slotCount(): number { return this.#slots.length; }
  isDone(i: number): boolean { return this.#map.has(i); }

  /** A piece the background copy could not have from the backup: reported like a read's. */
  sourceFailed(err: BdsnapError): void {
    this.#onSourceError(err);
  }

  /** Take slot `i`'s lock; undefined when the slot is done (nothing to lock). Locks are taken in ascending order. */
  async #lock(i: number): Promise<(() => void) | undefined> {
    for (;;) {
      if (this.#map.has(i)) return undefined;
      const held = this.#locks.get(i);
      if (!held) break;
      await held;
    }
    let release!: () => void;
    this.#locks.set(i, new Promise<void>((resolve) => (release = resolve)));
    return () => {
      this.#locks.delete(i);
      release();
    };
  }

  /** Make slot `i` hold the backup's content. Errors: what the backup's read gives (EIO, ECORRUPT), or the target's. */
  async fill(i: number): Promise<void> {
    const unlock = await this.#lock(i);
    if (!unlock) return;
    try {
      const at = i * this.#P;
      const length = Math.min(this.#P, this.size - at);
      if (this.#slots[i] === null) {
        await this.#target.zero(at, length);
      } else {
        const buf = Buffer.allocUnsafe(length);
        try {
          await this.#readSource(buf, at);
        } catch (err) {
          const e = toBdsnapError(err);
          this.#onSourceError(e);
          throw new BdsnapError('EIO', `the backup's data for ${at}+${length} cannot be read: ${e.message}`, { cause: err });
        }
        await this.#target.write(buf, at);
      }
      this.#map.set(i);
    } finally {
      unlock();
    }
  }

  /** A read of the backup, tried once more after the source was reloaded (a repair may have stored the piece since). */
  async #readSource(buf: Buffer, offsetBytes: number): Promise<void> {
    try {
      await this.#source.read(buf, offsetBytes);
    } catch (err) {
      if (!(await this.#refreshSource())) throw err;
      await this.#source.read(buf, offsetBytes);
    }
  }

  /**
   * The background copy's step: the slots of `batch` (ascending) not done yet get their content,
   * `content(i)`: the piece, null for a zero slot, undefined for a slot left for later. Adjacent
   * slots of one kind are written as one extent, under their locks (a slot a client made done
   * meanwhile is left alone). Returns the bytes written.
   */
  async fillSlots(batch: readonly number[], content: (i: number) => Buffer | null | undefined): Promise<number> {
    let written = 0;
    let run: number[] = [];
    const writeRun = async (): Promise<void> => {
      const slots = run;
      run = [];
      const locked: Array<{ i: number; unlock: () => void }> = [];
      try {
        for (const i of slots) {
          const unlock = await this.#lock(i);
          if (unlock) locked.push({ i, unlock });
        }
        for (let a = 0; a < locked.length;) {
          let b = a + 1;
          while (b < locked.length && locked[b]!.i === locked[b - 1]!.i + 1) b++;
          const extent = locked.slice(a, b).map((x) => x.i);
          a = b;
          const at = extent[0]! * this.#P;
          const pieces = extent.map((i) => content(i));
          if (pieces[0] === null) {
            const length = Math.min(extent.length * this.#P, this.size - at);
            await this.#target.zero(at, length);
            written += length;
          } else {
            const data = Buffer.concat(pieces as Buffer[]);
            await this.#target.write(data, at);
            this.#target.startWriteback(at, data.length);
            written += data.length;
          }
          for (const i of extent) this.#map.set(i);
        }
      } finally {
        for (const { unlock } of locked) unlock();
      }
    };
    for (const i of batch) {
      if (this.#map.has(i)) continue;
      const c = content(i);
      const prev = run[run.length - 1];
      if (prev !== undefined && (c === undefined || prev + 1 !== i || (content(prev) === null) !== (c === null))) await writeRun();
      if (c !== undefined) run.push(i);
    }
    await writeRun();
    return written;
  }

  /**
   * The background copy's step where the source places pieces itself (a local repository: a
   * piece worker reads, checks and writes each piece into the target, no copy on this thread).
   * The slots of `batch` (ascending) are locked one after another, in order; a slot a client
   * made done first is left alone, and each placed slot is done and unlocked as soon as its
   * piece is written, so a client waits at most for the pieces in flight. Zero slots are
   * written as extents of adjacent ones. A piece that cannot be had goes to `failed` (its slot
   * stays for the next round); a failed write of the target is thrown once the pieces in
   * flight have settled. Returns the bytes written.
   */
  async placeSlots(batch: readonly number[], placePiece: PiecePlacer, failed: (err: BdsnapError) => void): Promise<number> {
    const P = this.#P;
    const lengthOf = (i: number): number => Math.min(P, this.size - i * P);
    // Uses of each piece left in the batch: a worker keeps a piece decoded for the next.
    const uses = new Map<string, number>();
    for (const i of batch) {
      const hash = this.#slots[i];
      if (hash && !this.#map.has(i)) uses.set(hash, (uses.get(hash) ?? 0) + 1);
    }
    const usedOnce = (hash: string): boolean => {
      const left = uses.get(hash)! - 1;
      uses.set(hash, left);
      return left > 0;
    };
    let written = 0;
    let writeError: BdsnapError | undefined;
    const inFlight = new Set<Promise<void>>();
    const place = async (i: number, hash: string, keep: boolean): Promise<void> => {
      const at = i * P;
      try {
        const placed = await this.#target.writeThroughDescriptor(async (fd) => {
          try {
            const r = await placePiece({ hash, fd, offsetBytes: at, lengthBytes: lengthOf(i), keep });
            return r.failure ? new BdsnapError(r.failure.code as ErrorCode, r.failure.message) : undefined;
          } catch (err) {
            failed(new BdsnapError('EIO', `the backup's data for ${at}+${lengthOf(i)} cannot be read: ${toBdsnapError(err).message}`, { cause: err }));
            return null;
          }
        });
        if (placed === null) return;
        if (placed) throw placed;
        this.#map.set(i);
        written += lengthOf(i);
      } catch (err) {
        writeError ??= toBdsnapError(err);
      }
    };
    let zeros: Array<{ i: number; unlock: () => void }> = [];
    const zeroRun = async (): Promise<void> => {
      const run = zeros;
      zeros = [];
      if (run.length === 0) return;
      try {
        const at = run[0]!.i * P;
        const length = Math.min(run.length * P, this.size - at);
        if (!writeError) {
          await this.#target.zero(at, length);
          for (const { i } of run) this.#map.set(i);
          written += length;
        }
      } catch (err) {
        writeError ??= toBdsnapError(err);
      } finally {
        for (const { unlock } of run) unlock();
      }
    };
    try {
      for (const i of batch) {
        if (writeError) break;
        const hash = this.#slots[i];
        const unlock = await this.#lock(i);
        if (!unlock) {
          if (hash) usedOnce(hash);
          continue;
        }
        if (!hash) {
          if (zeros.length > 0 && zeros[zeros.length - 1]!.i + 1 !== i) await zeroRun();
          zeros.push({ i, unlock });
          continue;
        }
        const task: Promise<void> = place(i, hash, usedOnce(hash)).finally(() => {
          unlock();
          inFlight.delete(task);
        });
        inFlight.add(task);
        while (inFlight.size >= PLACES_IN_FLIGHT) await Promise.race(inFlight);
      }
    } finally {
      await zeroRun();
      await Promise.all(inFlight);
    }
    if (batch.length > 0) this.#target.startWriteback(batch[0]! * P, Math.min((batch[batch.length - 1]! + 1) * P, this.size) - batch[0]! * P);
    if (writeError) throw writeError;
    return written;
  }

  /**
   * A change of `offset+length`: slots not done that it covers in part are filled first; those
   * it covers whole are locked across it and done once it is.
   */
  async #change(offsetBytes: number, lengthBytes: number, apply: () => Promise<void>): Promise<void> {
    this.lastClientRequestMs = Date.now();
    this.#markFirstRequest();
    const P = this.#P;
    const end = offsetBytes + lengthBytes;
    const whole: number[] = [];
    for (let i = Math.floor(offsetBytes / P); i * P < end; i++) {
      if (this.#map.has(i)) continue;
      if (offsetBytes <= i * P && end >= Math.min((i + 1) * P, this.size)) whole.push(i);
      else await this.fill(i);
    }
    const unlocks: Array<{ i: number; unlock: () => void }> = [];
    try {
      for (const i of whole) {
        const unlock = await this.#lock(i);
        if (unlock) unlocks.push({ i, unlock });
      }
      await apply();
      for (const { i } of unlocks) this.#map.set(i);
    } finally {
      for (const { unlock } of unlocks) unlock();
    }
  }

  async read(target: Buffer, offsetBytes: number): Promise<void> {
    checkRange(this, offsetBytes, target.length, false);
    this.lastClientRequestMs = Date.now();
    this.#markFirstRequest();
    const P = this.#P;
    const end = offsetBytes + target.length;
    const fills: Array<Promise<void>> = [];
    for (let i = Math.floor(offsetBytes / P); i * P < end; i++) if (!this.#map.has(i)) fills.push(this.fill(i));
    await Promise.all(fills);
    await this.#target.read(target, offsetBytes);
  }

  async write(data: Buffer, offsetBytes: number, options?: WriteOptions): Promise<void> {
    checkRange(this, offsetBytes, data.length, true);
    await this.#change(offsetBytes, data.length, () => this.#target.write(data, offsetBytes));
    if (options?.fua) await this.flush();
  }

  async trim(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    checkRange(this, offsetBytes, lengthBytes, true);
    await this.#change(offsetBytes, lengthBytes, () => this.#target.trim(offsetBytes, lengthBytes));
    if (options?.fua) await this.flush();
  }

  async zero(offsetBytes: number, lengthBytes: number, options?: ZeroOptions): Promise<void> {
    checkRange(this, offsetBytes, lengthBytes, true);
    if (options?.fastZero) throw new BdsnapError('ENOTSUP', 'fast zero is not offered while a restore runs');
    await this.#change(offsetBytes, lengthBytes, () => this.#target.zero(offsetBytes, lengthBytes));
    if (options?.fua) await this.flush();
  }

  /** The target's data first, then the map: a FLUSH answered means both are durable. */
  flush(): Promise<void> {
    return this.#map.persist(() => this.#target.flush());
  }

  cache(): Promise<void> {
    return Promise.resolve();
  }

  extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    checkRange(this, offsetBytes, lengthBytes, false);
    return Promise.resolve([{ length: lengthBytes, flags: 0 }]);
  }

  close(): Promise<void> {
    return Promise.resolve();
  }
}

interface Running {
  state: RestoreState;
  /** The target's identity as the registry tells devices apart. */
  identity: StampIdentity;
  dir: string;
  device: InstantRestoreDevice;
  target: FileDevice;
  map: DoneMap;
  source: RestoreSource;
  refresh: SourceRefresh;
  phase: 'running' | 'complete' | 'failed';
  connections: number;
  lastError: string | undefined;
  startedMs: number;
  doneAtStart: number;
  /** Bytes the background copy itself filled since startedMs (client reads fill the others). */
  copiedBytes: number;
  finishedAt: string | undefined;
  stopping: boolean;
  /** Ends the copy's backoff wait early, so that a shutdown need not sit it out. */
  wake: (() => void) | undefined;
  copier: Promise<void> | undefined;
}

/** A restore recorded as running that could not resume: kept, its target refused, until resumed or given up. */
interface Stopped {
  state: RestoreState;
  dir: string;
  /** The target's identity, when it can be told: another name of it is refused too. */
  identity: StampIdentity | undefined;
  reason: string;
  doneBytes: number;
  /** A resume is being tried: a second one waits for no one, it is refused. */
  resuming: boolean;
}

export interface InstantRestoresOptions {
  stateDir: string;
  events: EventLog;
  log: Logger;
  openSource: SourceOpener;
  /** Bytes per second the background copy may fill (default: no limit). */
  rateBytes?: number;
}

export interface StartRequest {
  repo: string;
  backup: string;
  /** The device of the backup. */
  device: string;
  /** Where to restore: the device itself, or a new file. */
  target: string;
  output: boolean;
  /** The repository's password, if it is encrypted. */
  password?: string;
  /** Give up the stopped restore onto `target` (of this backup) instead. */
  abandon?: boolean;
}

/**
 * The pieces of `batch`'s slots, by id, each checked to fill its slot: through the source's
 * fetchPieces (by runs of packs) where it has one, else slot by slot through the device. A
 * piece that cannot be had is left out and reported (to `failed` and as the device's source
 * error); its slots stay for the next round.
 */
async function fetchBatch(source: RestoreSource, batch: readonly number[], P: number, sizeBytes: number, failed: (err: BdsnapError) => void): Promise<Map<string, Buffer>> {
  const slotOf = new Map<string, number>();
  for (const i of batch) {
    const hash = source.slots[i];
    if (hash !== null && hash !== undefined && !slotOf.has(hash)) slotOf.set(hash, i);
  }
  const pieces = new Map<string, Buffer>();
  const lengthOf = (i: number): number => Math.min(P, sizeBytes - i * P);
  const onError = (hash: string, err: BdsnapError): void => {
    const i = slotOf.get(hash)!;
    failed(new BdsnapError('EIO', `the backup's data for ${i * P}+${lengthOf(i)} cannot be read: ${err.message}`, { cause: err }));
  };
  const onPiece = (hash: string, raw: Buffer): void => {
    const length = lengthOf(slotOf.get(hash)!);
    if (raw.length === length) pieces.set(hash, raw);
    else onError(hash, new BdsnapError('ECORRUPT', `piece ${hash} holds ${raw.length} bytes where ${length} are needed`));
  };
  if (source.fetchPieces) {
    await source.fetchPieces(slotOf.keys(), { onPiece, onError });
  } else {
    await runLimited(slotOf, SLOT_READS_IN_FLIGHT, async ([hash, i]) => {
      const buf = Buffer.allocUnsafe(lengthOf(i));
      try {
        await source.source.read(buf, i * P);
        onPiece(hash, buf);
      } catch (err) {
        onError(hash, toBdsnapError(err));
      }
    });
  }
  return pieces;
}

interface Starting {
  identity: StampIdentity | undefined;
}

/**
 * The canonical name of a new --output file: its directory's real path and its own name, which
 * must not be a symbolic link (refused here as openOutputFile would, before a walk that cannot
 * follow it says less).
 */
async function canonicalOutputPath(target: string): Promise<string> {
  const resolved = path.resolve(target);
  if ((await fs.promises.lstat(resolved).catch(() => undefined))?.isSymbolicLink()) throw symlinkRefused(resolved, { given: target });
  const dir = await fs.promises.realpath(path.dirname(resolved)).catch((err: unknown) => {
    throw new BdsnapError('ENOENT', `the directory of ${target} does not exist; create it first`, { cause: err });
  });
  return path.join(dir, path.basename(resolved));
}

/** The command that starts the restore `st` records, and resumes it. */
function restoreCommand(st: RestoreState): string {
  return `bdsnap backup restore --repo ${st.repo} ${st.backup} ${st.device}${st.created ? ` --output ${st.target}` : ''} --instant`;
}

/** What to do about a stopped restore: resume it (with the same command), or give it up. */
function whatToDo(st: RestoreState): string {
  const command = restoreCommand(st);
  return `once that is fixed, resume it where it stopped with '${command}' (a new repository password may be given with it), or give it up with '${command} --abandon' (the target is then left incomplete)`;
}

function stoppedInfo(s: Stopped, state: 'stopped' | 'abandoned'): InstantRestoreInfo {
  const st = s.state;
  return {
    target: st.target, backup: st.backup, device: st.device, repo: st.repo, state, doneBytes: s.doneBytes, totalBytes: st.sizeBytes,
    rateBytesPerSecond: 0, readFilledBytesPerSecond: 0, secondsLeft: null, startedAt: st.startedAt, finishedAt: null,
    error: `${s.reason}; ${whatToDo(st)}`, connections: 0, mountpoint: null, loopDevice: null,
  };
}

/** Slots the map file names done. */
async function countDone(file: string, slots: number): Promise<number> {
  const map = await DoneMap.open(file, slots);
  try {
    return map.count;
  } finally {
    await map.close();
  }
}

/**
 * Refuse the file `identity` (opened as `devicePath`) while a daemon whose state directory is
 * `stateDir` has an instant restore into it that is not complete (it was running when that
 * daemon stopped, or it is stopped): for a server that runs without the daemon. The file holds
 * neither its old content nor the backup's, and the daemon, once started, resumes the copy over
 * whatever such a server's clients wrote. A state directory this user may not read (not root)
 * or that holds no restores says nothing; a state file that cannot be read is the daemon's to
 * report, and is passed over here.
 */
export async function refuseUnfinishedInstantRestore(stateDir: string, devicePath: string, identity: { dev: number; ino: number }): Promise<void> {
  const root = path.join(stateDir, RESTORES_DIR);
  const names = await fs.promises.readdir(root).catch((err: unknown) => {
    if (['ENOENT', 'ENOTDIR', 'EACCES'].includes((err as NodeJS.ErrnoException).code ?? '')) return [];
    throw toBdsnapError(err);
  });
  for (const name of names) {
    const stateFile = path.join(root, name, STATE_FILE);
    const st = await fs.promises.readFile(stateFile, { flag: fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW })
      .then((text) => parseJson(text, stateSchema, (problem) => problem))
      .catch(() => undefined);
    if (st === undefined || st.identity.dev !== identity.dev || st.identity.ino !== identity.ino) continue;
    const command = restoreCommand(st);
    throw new BdsnapError('EBUSY', `${devicePath} is the target of an instant restore from backup ${st.backup} (started at ${st.startedAt}) that is not complete: it holds neither its old content nor the backup's, and the daemon resumes the copy over whatever is written to it meanwhile; start the daemon (state directory ${stateDir}), which resumes it ('bdsnap status' shows it), or give it up there with '${command} --abandon'`);
  }
}

function restoreDirName(target: string): string {
  return crypto.createHash('sha256').update(target).digest('hex').slice(0, 24);
}

export class InstantRestores {
  readonly #options: InstantRestoresOptions;
  readonly #root: string;
  readonly #running = new Map<string, Running>();
  /** Restores that could not resume, by target. */
  readonly #stopped = new Map<string, Stopped>();
  /** Restores being started, by target: their identity once the target is open. */
  readonly #starting = new Map<string, Starting>();
  /** Where a target is mounted through the daemon: the mount manager knows (it mounts a target as an image), status asks it here. */
  mountOf: ((target: string) => MountInfo | undefined) | undefined;

  constructor(options: InstantRestoresOptions) {
    this.#options = options;
    this.#root = path.join(options.stateDir, RESTORES_DIR);
  }

  /**
   * The restore whose target `name` names: by its export name, else by what the name names now
   * (any name of the target's device). A name that names nothing (or cannot be told) names no
   * restore's target: the caller goes on to what else it may name, and opens it as that.
   */
  async #find(name: string): Promise<Running | undefined> {
    const r = this.#running.get(name);
    if (r || this.#running.size === 0) return r;
    const identity = await readDeviceIdentity(path.resolve(name)).catch(() => undefined);
    if (identity === undefined) return undefined;
    return [...this.#running.values()].find((x) => sameIdentity(x.identity, identity));
  }

  /** The stopped restore whose target `name` names, by name or by what it names now. */
  async #findStopped(name: string): Promise<Stopped | undefined> {
    if (this.#stopped.size === 0) return undefined;
    const s = this.#stopped.get(name);
    if (s) return s;
    const identity = await readDeviceIdentity(path.resolve(name)).catch(() => undefined);
    if (identity === undefined) return undefined;
    return [...this.#stopped.values()].find((x) => x.identity !== undefined && sameIdentity(x.identity, identity));
  }

  /** Throws EBUSY while `devicePath` is (a name of) the target of a restore or served by one, naming the restore and what to do. */
  async checkAttach(devicePath: string): Promise<void> {
    const r = await this.infoOf(devicePath);
    if (r) throw new BdsnapError('EBUSY', describeRestoreHold(r, devicePath));
  }

  /** The restore, running or stopped, whose target `name` names (by any name of it), as status shows it. */
  async infoOf(name: string): Promise<InstantRestoreInfo | undefined> {
    const stopped = await this.#findStopped(name);
    return stopped ? stoppedInfo(stopped, 'stopped') : this.servingOf(name);
  }

  /** The restore that serves the target `name` names (running, or complete and still open), as status shows it; its export name is its target. */
  async servingOf(name: string): Promise<InstantRestoreInfo | undefined> {
    const r = await this.#find(name);
    return r && this.#info(r);
  }

  /** The export of a target under restore, by any name of it. */
  async open(name: string): Promise<ExportHandle | undefined> {
    const r = await this.#find(name);
    if (!r) return undefined;
    r.connections++;
    let released = false;
    return {
      name, device: r.device,
      release: async () => {
        if (released) return;
        released = true;
        r.connections--;
        if (r.connections === 0 && r.phase === 'complete') await this.#retire(r);
      },
    };
  }

  /**
   * How a target under restore is open, as status shows a device: through its restore (its
   * clients and mount are the restore's, the device table never attaches it); undefined for
   * any other device.
   */
  attachmentOf(target: string): Pick<DeviceStatus, 'attached' | 'connections' | 'mountpoint' | 'loopDevice'> | undefined {
    const r = this.#running.get(target);
    if (!r) return undefined;
    const mount = this.mountOf?.(target);
    return { attached: r.connections > 0 || mount !== undefined, connections: r.connections, mountpoint: mount?.mountpoint ?? null, loopDevice: mount?.loopDevice ?? null };
  }

  list(): InstantRestoreInfo[] {
    return [...this.#running.values()].map((r) => this.#info(r)).concat([...this.#stopped.values()].map((s) => stoppedInfo(s, 'stopped')));
  }

  #info(r: Running): InstantRestoreInfo {
    const P = r.state.pieceBytes;
    const mount = this.mountOf?.(r.state.target);
    const doneBytes = Math.min(r.device.doneSlots * P, r.state.sizeBytes);
    const seconds = (Date.now() - r.startedMs) / 1000;
    // The copy's own rate is what --restore-rate bounds; what client reads filled comes on top
    // of it, in bursts, so the time left is the copy's alone: it may end sooner, not later. While
    // the copy retries a piece it cannot have, no time is promised.
    const doneRate = seconds > 0 ? Math.max(0, (r.device.doneSlots - r.doneAtStart) * P) / seconds : 0;
    const copyRate = seconds > 0 ? r.copiedBytes / seconds : 0;
    return {
      target: r.state.target, backup: r.state.backup, device: r.state.device, repo: r.state.repo,
      state: r.phase, doneBytes, totalBytes: r.state.sizeBytes,
      rateBytesPerSecond: Math.round(copyRate),
      readFilledBytesPerSecond: Math.round(Math.max(0, doneRate - copyRate)),
      secondsLeft: copyRate > 0 && r.lastError === undefined ? Math.round((r.state.sizeBytes - doneBytes) / copyRate) : null,
      startedAt: r.state.startedAt, finishedAt: r.finishedAt ?? null,
      error: r.lastError === undefined ? null : r.refresh.problem === undefined ? r.lastError : `${r.lastError}; ${r.refresh.problem}`,
      connections: r.connections, mountpoint: mount?.mountpoint ?? null, loopDevice: mount?.loopDevice ?? null,
    };
  }

  /** Begin a restore; returns once the target is served with the backup's content. */
  async start(req: StartRequest, checkTarget: (target: string) => Promise<void>): Promise<InstantRestoreInfo> {
    const target = await followedSafely(req.target, req.output ? await canonicalOutputPath(req.target) : await canonicalDevicePath(req.target));
    const stopped = this.#stopped.get(target) ?? (req.output ? undefined : await this.#findStopped(target));
    if (stopped) return this.#resumeOrAbandon(stopped, req);
    if (req.abandon) throw new BdsnapError('ENOENT', `no stopped instant restore onto ${target} to give up${this.#running.has(target) ? ' (the restore onto it is running, not stopped)' : ''}`);
    if (this.#running.has(target) || this.#starting.has(target)) throw new BdsnapError('EBUSY', `${target} is already being restored`);
    const starting: Starting = { identity: undefined };
    this.#starting.set(target, starting);
    try {
      return await this.#start(req, target, starting, checkTarget);
    } finally {
      this.#starting.delete(target);
    }
  }

  async #start(req: StartRequest, target: string, starting: Starting, checkTarget: (target: string) => Promise<void>): Promise<InstantRestoreInfo> {
    // An existing target is checked against the other restores first: another name of a device
    // under restore is that restore's, whatever else would be said of it (open, in use).
    let identity = req.output ? undefined : await this.#claim(target, starting);
    const opened = await this.#options.openSource(req.repo, req.backup, req.device, req.password);
    let file: FileDevice | undefined;
    let created = false;
    try {
      const sizeBytes = opened.source.size;
      if (req.output) {
        // Created, never opened: a file already there is left exactly as it was.
        const out = await openOutputFile(target, 0o600, 'refuse');
        created = out.created;
        try {
          fs.ftruncateSync(out.fd, sizeBytes);
          await out.close();
        } catch (err) {
          await out.discard();
          throw err;
        }
      } else {
        await checkTarget(target);
        await checkNotInUse(target);
      }
      identity ??= await this.#claim(target, starting);
      file = await FileDevice.open(target);
      if (identity.kind === 'file' && (identity.dev !== String(file.identity.dev) || identity.ino !== String(file.identity.ino))) {
        throw new BdsnapError('EBUSY', `${target} was replaced while the restore was opening it; try again`);
      }
      if (file.size < sizeBytes) throw new BdsnapError('EINVAL', `${target} is ${file.size} bytes, smaller than the backup's ${sizeBytes}: it cannot hold it`);
      const state: RestoreState = {
        version: 1, target, created, identity: { dev: file.identity.dev, ino: file.identity.ino }, repo: req.repo, backup: req.backup, device: req.device,
        sizeBytes, pieceBytes: opened.pieceBytes, startedAt: new Date().toISOString(),
      };
      const dir = path.join(this.#root, restoreDirName(target));
      await ensurePrivateDir(this.#root);
      await fs.promises.rm(dir, { recursive: true, force: true });
      await ensurePrivateDir(dir);
      const map = await DoneMap.open(path.join(dir, MAP_FILE), opened.slots.length);
      // A new file is all holes: its zero slots are done already.
      if (created) opened.slots.forEach((h, i) => h === null && map.set(i));
      await map.persist(async () => undefined);
      if (req.password !== undefined && opened.encrypted !== false) await writeFileAtomic(path.join(dir, PASSWORD_FILE), req.password, 0o600);
      await writeFileAtomic(path.join(dir, STATE_FILE), `${JSON.stringify(state)}\n`);
      const r = this.#begin(state, identity, dir, file, map, opened);
      this.#options.events.emit('restore-started', { device: target, details: { backup: req.backup, repo: req.repo, sizeBytes } });
      return this.#info(r);
    } catch (err) {
      await file?.close();
      await opened.close();
      if (created) await fs.promises.rm(target, { force: true });
      throw err;
    }
  }

  /** The identity of what `target` names, claimed for this restore; EBUSY when another restore, running or starting, has that device. */
  async #claim(target: string, starting: Starting): Promise<StampIdentity> {
    const identity = await readDeviceIdentity(target);
    // Checked and set in one turn: of two restores onto one device by two names, the second sees the first.
    const other = this.#holderOf(identity);
    if (other !== undefined) {
      throw new BdsnapError('EBUSY', `${target} is ${other} (the same ${describeIdentity(identity)}), which is already being restored; wait until that restore is complete ('bdsnap status' shows it)`);
    }
    starting.identity = identity;
    return identity;
  }

  /** The target of another restore, running or starting, that is the device `identity` names. */
  #holderOf(identity: StampIdentity): string | undefined {
    for (const r of this.#running.values()) if (sameIdentity(r.identity, identity)) return r.state.target;
    for (const s of this.#stopped.values()) if (s.identity !== undefined && sameIdentity(s.identity, identity)) return s.state.target;
    for (const [target, s] of this.#starting) if (s.identity !== undefined && sameIdentity(s.identity, identity)) return target;
    return undefined;
  }

  #begin(state: RestoreState, identity: StampIdentity, dir: string, target: FileDevice, map: DoneMap, opened: RestoreSource): Running {
    // The device reports to its restore's record, which holds the device: it finds the record
    // by its target when it reports.
    const reportSourceError = (err: BdsnapError): void => {
      const running = this.#running.get(state.target);
      if (running?.device === device) running.lastError = err.message;
      this.#options.events.emit('restore-failed', { device: state.target, details: { reason: err.message, retrying: true } });
    };
    const refresh = new SourceRefresh(opened.refresh?.bind(opened), (err) => {
      this.#options.log.warn({ event: 'restore-refresh-failed', target: state.target, reason: err.message }, 'instant restore: the repository was read again in vain');
      this.#options.events.emit('restore-failed', { device: state.target, details: { reason: err.message, retrying: true } });
    });
    const device = new InstantRestoreDevice(target, opened.source, opened.slots, opened.pieceBytes, map, { onSourceError: reportSourceError, refreshSource: () => refresh.run() });
    const r: Running = {
      state, identity, dir, device, target, map, source: opened, refresh, phase: 'running', connections: 0, lastError: undefined,
      startedMs: Date.now(), doneAtStart: map.count, copiedBytes: 0, finishedAt: undefined, stopping: false, wake: undefined, copier: undefined,
    };
    this.#running.set(state.target, r);
    r.copier = this.#copy(r).catch((err: unknown) => {
      r.lastError = toBdsnapError(err).message;
      this.#options.log.error({ event: 'restore-copy-failed', target: r.state.target, reason: r.lastError }, 'instant restore: the background copy stopped');
    });
    return r;
  }

  /**
   * The background copy: every slot not done, in order, a batch at a time (see BATCH_BYTES);
   * retried with backoff while the backup cannot be read.
   */
  async #copy(r: Running): Promise<void> {
    const dev = r.device;
    const P = r.state.pieceBytes;
    let lastPersist = Date.now();
    let delay = RETRY_MIN_MS;
    const rate = this.#options.rateBytes;
    const rateStartMs = Date.now();
    // A rate-limited copy takes steps of a tenth of a second's bytes, so that it keeps to the rate.
    const batchSlots = Math.max(1, Math.floor(Math.min(BATCH_BYTES, rate !== undefined ? rate / 10 : BATCH_BYTES) / P));
    const busySlots = Math.max(1, Math.min(batchSlots, Math.floor(BUSY_BATCH_BYTES / P)));
    let firstClientWait: NodeJS.Timeout | undefined;
    const firstClient = Promise.race([dev.firstRequest, new Promise<void>((resolve) => (firstClientWait = setTimeout(resolve, FIRST_CLIENT_WAIT_MS)))]);
    firstClientWait?.unref();
    let batchesInFlight = 0;
    while (!r.stopping && dev.doneSlots < dev.slotCount) {
      let failure: BdsnapError | undefined;
      let next = 0;
      // Planned one at a time as the lanes ask, so that what clients did meanwhile is skipped.
      const batches = function* (): Generator<number[]> {
        while (next < dev.slotCount) {
          const limit = Date.now() - dev.lastClientRequestMs < 5 ? busySlots : batchSlots;
          const batch: number[] = [];
          for (; next < dev.slotCount && batch.length < limit; next++) if (!dev.isDone(next)) batch.push(next);
          if (batch.length > 0) yield batch;
        }
      };
      const copyBatch = async (batch: number[]): Promise<void> => {
        if (r.stopping || failure) return;
        // Clients first: while one is busy, the copy takes small steps.
        if (Date.now() - dev.lastClientRequestMs < 5) await new Promise((resolve) => setTimeout(resolve, 2));
        const failed = (err: BdsnapError): void => {
          if (!failure) dev.sourceFailed(err);
          failure ??= err;
        };
        if (r.source.placePiece) {
          try {
            r.copiedBytes += await dev.placeSlots(batch, r.source.placePiece, failed);
          } catch (err) {
            failure ??= toBdsnapError(err);
            return;
          }
        } else {
          let pieces: Map<string, Buffer>;
          try {
            pieces = await fetchBatch(r.source, batch, P, dev.size, failed);
          } catch (err) {
            failed(toBdsnapError(err));
            return;
          }
          try {
            r.copiedBytes += await dev.fillSlots(batch, (i) => {
              const hash = r.source.slots[i];
              return hash === null ? null : pieces.get(hash!);
            });
          } catch (err) {
            failure ??= toBdsnapError(err);
            return;
          }
        }
        if (rate !== undefined) {
          const aheadMs = (r.copiedBytes / rate) * 1000 - (Date.now() - rateStartMs);
          if (aheadMs > 0) await new Promise((resolve) => setTimeout(resolve, aheadMs));
        }
        if (Date.now() - lastPersist >= PERSIST_EVERY_MS) {
          lastPersist = Date.now();
          await dev.flush().catch((err: unknown) => (failure ??= toBdsnapError(err)));
        }
      };
      await runLimited(batches(), BATCHES_IN_FLIGHT, async (batch) => {
        if (batchesInFlight > 0) await firstClient;
        batchesInFlight++;
        try {
          await copyBatch(batch);
        } finally {
          batchesInFlight--;
        }
      });
      if (failure) {
        r.lastError = failure.message;
        this.#options.log.warn({ event: 'restore-retry', target: r.state.target, reason: r.lastError, inMs: delay }, 'instant restore: retrying');
        await new Promise<void>((resolve) => {
          if (r.stopping) return resolve();
          const timer = setTimeout(resolve, delay);
          r.wake = () => { clearTimeout(timer); resolve(); };
        });
        r.wake = undefined;
        delay = Math.min(delay * 2, RETRY_MAX_MS);
        // The next round reads what a repair stored meanwhile.
        if (!r.stopping) await r.refresh.run();
        continue;
      }
      delay = RETRY_MIN_MS;
    }
    if (r.stopping) return;
    try {
      await dev.flush();
    } catch (err) {
      r.lastError = toBdsnapError(err).message;
      r.phase = 'failed';
      this.#options.events.emit('restore-failed', { device: r.state.target, details: { reason: r.lastError, retrying: false } });
      return;
    }
    r.phase = 'complete';
    r.lastError = undefined;
    r.finishedAt = new Date().toISOString();
    this.#options.events.emit('restore-completed', { device: r.state.target, details: { backup: r.state.backup, sizeBytes: r.state.sizeBytes } });
    if (r.connections === 0) await this.#retire(r);
  }

  /** A complete restore nobody uses any more: forget it; the target is an ordinary device. */
  async #retire(r: Running): Promise<void> {
    if (this.#running.get(r.state.target) !== r) return;
    this.#running.delete(r.state.target);
    // The target is complete whatever happens here; a state directory left behind resumes at
    // the next start as a restore with nothing to copy, so a failure is reported, not thrown
    // (nobody awaits the copy that retires its restore).
    const results = await Promise.allSettled([r.map.close(), r.target.close(), r.source.close()]);
    const removed = await fs.promises.rm(r.dir, { recursive: true, force: true }).then(() => undefined, (err: unknown) => err);
    const failed = [...results.flatMap((x) => (x.status === 'rejected' ? [x.reason as unknown] : [])), ...(removed === undefined ? [] : [removed])];
    if (failed.length > 0) {
      this.#options.log.warn({ event: 'restore-cleanup-failed', target: r.state.target, dir: r.dir, reason: toBdsnapError(failed[0]).message }, 'instant restore: complete, but its state was not cleaned up');
    }
  }

  /**
   * At daemon start: resume every restore the last run left. One that cannot resume is stopped:
   * listed with the reason, its target refused, until it is resumed or given up.
   */
  async resumeAll(): Promise<void> {
    const names = await fs.promises.readdir(this.#root).catch(() => [] as string[]);
    for (const name of names) {
      // The journals of restores in place (device/interrupted-restore.ts, named after their
      // target's identity) share this directory by default: theirs to judge, not restores here.
      if (/^(file|block)-/.test(name)) continue;
      const dir = path.join(this.#root, name);
      let state: RestoreState;
      try {
        const stateFile = path.join(dir, STATE_FILE);
        state = parseJson(await fs.promises.readFile(stateFile), stateSchema, (problem) => `${stateFile} is damaged: ${problem}`);
      } catch (err) {
        const e = toBdsnapError(err);
        this.#options.events.emit('restore-failed', { details: { dir, reason: e.message, retrying: false } });
        continue;
      }
      try {
        await this.#resume(state, dir, undefined);
      } catch (err) {
        await this.#stop(state, dir, toBdsnapError(err));
      }
    }
  }

  /**
   * Resume the restore `state` records in `dir` where its map says, with `password` (kept in
   * place of the saved one once it opened the repository) or the saved one. Errors: why it cannot.
   */
  async #resume(state: RestoreState, dir: string, password: string | undefined): Promise<Running> {
    const saved = await fs.promises.readFile(path.join(dir, PASSWORD_FILE), 'utf8').catch(() => undefined);
    const opened = await this.#options.openSource(state.repo, state.backup, state.device, password ?? saved);
    let file: FileDevice | undefined;
    let map: DoneMap | undefined;
    try {
      file = await FileDevice.open(state.target);
      if (file.identity.dev !== state.identity.dev || file.identity.ino !== state.identity.ino) {
        throw new BdsnapError('EMISMATCH', `${state.target} is no longer the file the restore began on`);
      }
      map = await DoneMap.open(path.join(dir, MAP_FILE), opened.slots.length);
      if (password !== undefined && password !== saved && opened.encrypted !== false) await writeFileAtomic(path.join(dir, PASSWORD_FILE), password, 0o600);
      const identity = await readDeviceIdentity(state.target);
      this.#stopped.delete(state.target);
      const r = this.#begin(state, identity, dir, file, map, opened);
      this.#options.log.info({ event: 'restore-resumed', target: state.target, done: map.count, of: opened.slots.length }, 'instant restore resumed');
      return r;
    } catch (err) {
      await map?.close();
      await file?.close();
      await opened.close();
      throw err;
    }
  }

  /** Keep the restore `state` records as stopped by `err`: listed, its target refused, nothing of it changed. */
  async #stop(state: RestoreState, dir: string, err: BdsnapError): Promise<void> {
    const identity = await readDeviceIdentity(state.target).catch(() => undefined);
    const slots = Math.ceil(state.sizeBytes / state.pieceBytes);
    const doneSlots = await countDone(path.join(dir, MAP_FILE), slots).catch(() => 0);
    const stopped: Stopped = { state, dir, identity, reason: err.message, doneBytes: Math.min(doneSlots * state.pieceBytes, state.sizeBytes), resuming: false };
    this.#stopped.set(state.target, stopped);
    this.#options.log.warn({ event: 'restore-stopped', target: state.target, reason: err.message }, 'instant restore stopped: it cannot resume');
    this.#options.events.emit('restore-failed', { device: state.target, details: { reason: err.message, retrying: false, stopped: true, todo: whatToDo(state) } });
  }

  /** The request names the target of a stopped restore: resume it (same backup), or give it up. */
  async #resumeOrAbandon(s: Stopped, req: StartRequest): Promise<InstantRestoreInfo> {
    const st = s.state;
    if (req.repo !== st.repo || req.backup !== st.backup || req.device !== st.device || req.output !== st.created) {
      throw new BdsnapError('EBUSY', `${st.target} is part way through a stopped instant restore of device ${st.device} of backup ${st.backup} from ${st.repo}${st.created ? ' (--output)' : ''}, not the one asked for; ${whatToDo(st)}`);
    }
    if (s.resuming) throw new BdsnapError('EBUSY', `the stopped restore onto ${st.target} is being resumed already`);
    s.resuming = true;
    try {
      if (req.abandon) return await this.#abandon(s);
      try {
        return this.#info(await this.#resume(st, s.dir, req.password));
      } catch (err) {
        const e = toBdsnapError(err);
        s.reason = e.message;
        throw new BdsnapError(e.code, `the instant restore onto ${st.target} stays stopped: ${e.message}`, { cause: err });
      }
    } finally {
      s.resuming = false;
    }
  }

  /** Give up a stopped restore: its state (map, saved password) goes; the target stays as it is, part restored. */
  async #abandon(s: Stopped): Promise<InstantRestoreInfo> {
    const st = s.state;
    await fs.promises.rm(s.dir, { recursive: true, force: true });
    this.#stopped.delete(st.target);
    const note = `${st.target} is left incomplete: ${formatBytes(s.doneBytes)} of its ${formatBytes(st.sizeBytes)} hold backup ${st.backup} (or what clients wrote over it), the rest what was there before; it is a copy of neither: restore it again, or write it over`;
    this.#options.log.warn({ event: 'restore-abandoned', target: st.target, doneBytes: s.doneBytes }, 'instant restore given up');
    this.#options.events.emit('restore-abandoned', { device: st.target, details: { backup: st.backup, doneBytes: s.doneBytes, sizeBytes: st.sizeBytes, note } });
    return { ...stoppedInfo(s, 'abandoned'), error: note };
  }

  /** Shutdown: stop the copies, make what is done durable, close. Restores resume at the next start. */
  async closeAll(): Promise<void> {
    for (const r of this.#running.values()) {
      r.stopping = true;
      r.wake?.();
    }
    for (const r of [...this.#running.values()]) {
      await r.copier;
      await r.device.flush().catch(() => undefined);
      await r.map.close();
      await r.target.close();
      await r.source.close();
    }
    this.#running.clear();
    this.#stopped.clear();
  }
}
