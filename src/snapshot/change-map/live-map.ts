/**
 * The live change map of one device: change-block tracking (CBT) that survives daemon restarts
 * and crashes.
 *
 * Model (blksnap's, with wider entries and a file behind it): the device is cut into tracking
 * blocks; `map[i]` holds the number of the snapshot period in which block i last changed (0 =
 * not changed in this generation). The current period starts at 1; taking a snapshot freezes
 * a copy of the map (the snapshot's view, with the number of the period it ends) and moves the
 * live map to the next number. "Changed since snapshot N" is `map[i] > N`. Numbers compare only
 * within one generation (a random id); whenever the map cannot be trusted it is reset to a new
 * generation with numbers starting again at 1, and the reset says why (trust.ts).
 *
 * Block size: 64 KiB, doubled until the map has at most 2^21 blocks (so up to 128 GiB -> 64 KiB,
 * 256 GiB -> 128 KiB, 1 TiB -> 512 KiB); memory and file stay at most 8 MiB per map. Entries
 * are Uint32: a device would need four billion snapshots to wrap one (a wrap resets the
 * generation with reason 'wrapped', as blksnap does at 255).
 *
 * Invariants:
 * - mark() puts the new entries in memory and in the map file (pwrite into the page cache)
 *   synchronously, before it returns; the caller issues the device write afterwards. So a
 *   killed process never leaves a written block unmarked. A rewrite of a block already marked
 *   in this period costs a typed-array compare and no system call.
 * - 'strict' durability: the entries are also on stable storage (one fdatasync for every mark
 *   that queued meanwhile, group commit) before mark()'s promise resolves, and a rewrite of a
 *   block whose entry is not yet durable waits for that sync too. A host crash then loses
 *   nothing, and the map is kept across it.
 * - The header is written before any entry that depends on it (a new number, a new
 *   generation), so an entry is never above the header's number + 1.
 * - Own writes and the device's stamp (an image file's, given `readStamp`): writing() before a
 *   write to the device and written() once it settled. The header says "idle" (FLAG_IDLE), with
 *   the file's stamp read once the device's own writes have settled, only while none is in
 *   flight; the first write after that clears the flag before it is issued. So after an unclean
 *   stop an idle header's stamp must equal the file's now (anything else wrote it), and a header
 *   that is not idle cannot tell the daemon's last writes from anyone else's: the map starts
 *   again (trust.ts). While idle, the stamp is also checked once a second and on demand
 *   (verify()): a file changed while the daemon held it and did not write it starts a new
 *   generation at once. Writes by others while the daemon's own writes run are not seen here:
 *   the daemon watches who opens the file (src/host/write-watch.ts) and resets the map then.
 */

import fs from 'node:fs';
import path from 'node:path';
import { BdsnapError, toBdsnapError } from '../../errors.js';
import { checkRange } from '../../device/block-device.js';
import { makeDirectoryDurable, writeFileAtomicSync } from '../../host/atomic-file.js';
import { compareDeviceStamps, readBootId, type DeviceStamp } from '../../host/device-stamp.js';
import { fdatasyncFd, fdatasyncFdSync, ftruncateFdSync, openFdSync, pwriteFullySync } from '../../host/fd-io.js';
import { encodeStamp, entryBytes, fillHeader, FLAG_CLEAN, FLAG_IDLE, FLAG_POISONED, HEADER_BYTES, newGeneration } from './file-format.js';
import { FrozenChangeMap } from './frozen-map.js';
import { GroupSync } from './group-sync.js';
import { changedRanges, changedSpan, setEntries, trackingBlockSize, visitChanged, type ByteRange } from './ranges.js';
import { loadMap, type ChangeMapReset, type ChangeMapResetReason, type MapState } from './trust.js';
import type { Durability } from '../format.js';

/** Highest period number before the map wraps to a new generation. */
const MAX_NUMBER = 0xffff_fff0;
/** The device's own writes count as settled once none has run for this long. */
const SETTLE_MS = 50;
/** How often the stamp of a device the daemon holds without writing is checked. */
const WATCH_MS = 1000;

export type { Durability };

export interface ChangeMapOptions {
  /** The map file (created with its directory if missing). */
  file: string;
  deviceSizeBytes: number;
  durability: Durability;
  /**
   * The device's stamp now (readDeviceStamp, after a flush of the device). Absent: nothing is
   * compared, for a map used on its own; the daemon always gives one.
   */
  deviceStamp?: DeviceStamp | null;
  /** Default: read /proc/sys/kernel/random/boot_id. */
  bootId?: string;
  /** Called for a reset the map decides on its own later (a wrap in advance(), a change seen by the watch). */
  onReset?: (reset: ChangeMapReset) => void;
  /**
   * The device's stamp now, from what the daemon opened (an image file's descriptor): given, the
   * map records it once the daemon's own writes have settled and watches it while they do not
   * run (see the module's comment). Only for image files: a block device's counters move with
   * the daemon's own write-back.
   */
  readStamp?: () => Promise<DeviceStamp | undefined>;
}


export interface ChangeMapInfo {
  blockSize: number;
  blocks: number;
  generation: string;
  number: number;
  deviceSizeBytes: number;
}

/** The live change map of one device. Open with ChangeMap.open(). */
export class ChangeMap {
  readonly blockSize: number;
  readonly blocks: number;
  readonly #file: string;
  readonly #deviceSizeBytes: number;
  readonly #durability: Durability;
  readonly #bootId: string;
  readonly #onReset: ((reset: ChangeMapReset) => void) | undefined;
  #fd: number;
  #entries: Uint32Array;
  /** strict only: the value of each entry known to be on stable storage. */
  #durable: Uint32Array | undefined;
  #generation: string;
  #createdMs: number;
  #number: number;
  #lastWriteSeenMs = 0;
  readonly #readStamp: (() => Promise<DeviceStamp | undefined>) | undefined;
  /** Own device writes begun and not yet settled. */
  #writing = 0;
  /** Own device writes begun, ever: a stamp read while this moved says nothing. */
  #begun = 0;
  /** The header says idle and #stamp is the device's after its last own write. */
  #idle = false;
  #settleTimer: NodeJS.Timeout | undefined;
  /** #begun when the settle timer was armed. */
  #settleArmedAt = 0;
  #watchTimer: NodeJS.Timeout | undefined;
  #closed = false;
  #failure: string | undefined;
  /** Bumped by every reset, so a sync batch of the old file does not touch the new state. */
  #epoch = 0;
  readonly #sync = new GroupSync({
    fd: () => this.#fd,
    epoch: () => this.#epoch,
    durable: (ranges) => this.#markDurable(ranges),
    failed: (err) => {
      this.#poison(err);
      return new BdsnapError('EIO', `the change map cannot be made durable: ${err.message}`, { cause: err });
    },
  });
  #header = Buffer.alloc(HEADER_BYTES);
  /** The device's stamp the header records: the one read at open, then the one given to close(). */
  #stamp: DeviceStamp | undefined;
  /** #stamp as the header stores it (encoded once, not at every header write). */
  #stampBytes: Buffer | undefined;

  private constructor(options: ChangeMapOptions, bootId: string, fd: number, state: MapState) {
    this.#file = options.file;
    this.#deviceSizeBytes = options.deviceSizeBytes;
    this.#durability = options.durability;
    this.#bootId = bootId;
    this.#onReset = options.onReset;
    this.#stamp = options.deviceStamp ?? undefined;
    this.#stampBytes = encodeStamp(this.#stamp);
    this.blockSize = trackingBlockSize(options.deviceSizeBytes);
    this.blocks = Math.ceil(options.deviceSizeBytes / this.blockSize);
    this.#fd = fd;
    this.#entries = state.entries;
    this.#generation = state.generation;
    this.#number = state.number;
    this.#createdMs = state.createdMs;
    if (this.#durability === 'strict') this.#durable = state.entries.slice();
    this.#readStamp = options.readStamp;
    // The stamp at open was read after the device was flushed, before any write of the daemon's.
    this.#idle = this.#stamp?.kind === 'file';
    if (this.#readStamp) {
      this.#watchTimer = setInterval(() => void this.verify().catch(() => undefined), WATCH_MS);
      this.#watchTimer.unref();
    }
  }

  /**
   * Open the map of a device, or start a new generation when there is none or it cannot be
   * trusted; `reset` says why (null when the map was kept). Errors: EINVAL (bad options),
   * EIO/EPERM (the file cannot be written).
   */
  static async open(options: ChangeMapOptions): Promise<{ map: ChangeMap; reset: ChangeMapReset | null }> {
    if (!Number.isSafeInteger(options.deviceSizeBytes) || options.deviceSizeBytes < 0) {
      throw new BdsnapError('EINVAL', `bad device size ${options.deviceSizeBytes}`);
    }
    if (options.durability !== 'process' && options.durability !== 'strict') {
      throw new BdsnapError('EINVAL', `durability must be 'process' or 'strict', got ${String(options.durability)}`);
    }
    const stamp = options.deviceStamp ?? undefined;
    encodeStamp(stamp);
    const bootId = options.bootId ?? readBootId();
    try {
      await makeDirectoryDurable(path.dirname(options.file), { recursive: true, mode: 0o700 });
      const { fd, state, reset } = loadMap({ file: options.file, deviceSizeBytes: options.deviceSizeBytes, durability: options.durability, bootId, stamp });
      const map = new ChangeMap(options, bootId, fd, state);
      try {
        if (reset) {
          map.#replaceFile();
        } else {
          // From here on the file is "in use": unclean until close(), with this boot's id and
          // the stamp at open (what an unclean stop leaves to compare).
          map.#lastWriteSeenMs = Date.now();
          map.#writeHeader(0);
          fdatasyncFdSync(fd);
        }
      } catch (err) {
        map.#stopTimers();
        if (fd >= 0) fs.closeSync(fd);
        throw err;
      }
      return { map, reset };
    } catch (err) {
      throw toBdsnapError(err);
    }
  }

  get generation(): string {
    return this.#generation;
  }

  get number(): number {
    return this.#number;
  }

  get durability(): Durability {
    return this.#durability;
  }

  /** Why the map file could not be written (the map is then reset at the next open), if it failed. */
  get failure(): string | undefined {
    return this.#failure;
  }

  info(): ChangeMapInfo {
    return { blockSize: this.blockSize, blocks: this.blocks, generation: this.#generation, number: this.#number, deviceSizeBytes: this.#deviceSizeBytes };
  }

  /**
   * Record that bytes offset..offset+length are about to change. Call BEFORE the write can
   * reach the device. 'process': returns undefined, everything is done. 'strict': returns a
   * promise when the entries are not yet on stable storage; issue the write after it resolves.
   */
  mark(offsetBytes: number, lengthBytes: number): void | Promise<void> {
    if (this.#closed) throw new BdsnapError('ESHUTDOWN', 'the change map is closed');
    if (lengthBytes <= 0) return undefined;
    if (offsetBytes + lengthBytes > this.#deviceSizeBytes || offsetBytes < 0) {
      throw new BdsnapError('EINVAL', `range ${offsetBytes}+${lengthBytes} is past the end of the device (${this.#deviceSizeBytes} bytes)`);
    }
    const bs = this.blockSize;
    const first = Math.floor(offsetBytes / bs);
    const last = Math.floor((offsetBytes + lengthBytes - 1) / bs);
    const n = this.#number;
    const lo = setEntries(this.#entries, first, last, n);
    const hi = changedSpan[1]!;
    if (lo >= 0) this.#writeEntries(lo, hi);
    const durable = this.#durable;
    if (!durable) return undefined;
    if (lo >= 0) return this.#sync.wait(lo, hi, n);
    for (let i = first; i <= last; i++) if (durable[i] !== n) return this.#sync.wait();
    return undefined;
  }

  /**
   * A write of the daemon's is about to be issued to the device (after mark()). The first one
   * after the device was idle clears the header's idle flag first; in 'strict' the returned
   * promise resolves once that header is on stable storage. Pair with written().
   */
  writing(): void | Promise<void> {
    this.#begun++;
    this.#writing++;
    if (!this.#idle) return undefined;
    this.#idle = false;
    this.#lastWriteSeenMs = Date.now();
    if (this.#failure !== undefined) return undefined;
    try {
      this.#writeHeader(0);
    } catch (err) {
      this.#poison(err);
      return undefined;
    }
    return this.#durable ? this.#sync.wait() : undefined;
  }

  /** A write announced with writing() has settled (done or failed). */
  written(): void {
    if (--this.#writing > 0 || this.#readStamp === undefined || this.#closed || this.#settleTimer !== undefined) return;
    this.#armSettle();
  }

  #armSettle(): void {
    this.#settleArmedAt = this.#begun;
    this.#settleTimer = setTimeout(() => {
      this.#settleTimer = undefined;
      if (this.#closed || this.#writing > 0) return;
      // Writes came and went meanwhile: wait until a whole period passes without one.
      if (this.#begun !== this.#settleArmedAt) this.#armSettle();
      else void this.#settle().catch(() => undefined);
    }, SETTLE_MS);
    this.#settleTimer.unref();
  }

  /** No own write ran for SETTLE_MS: record the device's stamp now and say idle. */
  async #settle(): Promise<void> {
    const begun = this.#begun;
    const stamp = await this.#readStamp!();
    if (begun !== this.#begun || this.#writing > 0 || this.#closed || stamp?.kind !== 'file') return;
    this.#setIdle(stamp);
  }

  #setIdle(stamp: DeviceStamp): void {
    let bytes: Buffer;
    try {
      bytes = encodeStamp(stamp)!;
    } catch {
      return;
    }
    this.#stamp = stamp;
    this.#stampBytes = bytes;
    this.#idle = true;
    if (this.#failure !== undefined) return;
    try {
      this.#writeHeader(0);
    } catch (err) {
      this.#poison(err);
      return;
    }
    // strict: let the idle header reach the disk too (a host crash keeps the map then).
    if (this.#durable && !this.#sync.queued) this.#sync.wait().catch(() => undefined);
  }

  /**
   * While the device is idle, compare its stamp with the one recorded when the daemon's own
   * writes settled: a difference is someone else's write (or a replacement) and starts a new
   * generation, reported through onReset. Busy, or without readStamp, it proves nothing and
   * does nothing.
   */
  async verify(): Promise<void> {
    if (!this.#idle || this.#closed) return;
    const begun = this.#begun;
    const recorded = this.#stamp;
    const now = await this.#readStamp!();
    if (begun !== this.#begun || !this.#idle || this.#closed || recorded === undefined || now === undefined || this.#stamp !== recorded) return;
    if (this.#resetIfChanged(recorded, now)) this.#setIdle(now);
  }

  /** `now` differs from `recorded`, the stamp after the daemon's last write: start a new generation and report it. */
  #resetIfChanged(recorded: DeviceStamp, now: DeviceStamp): boolean {
    const compared = compareDeviceStamps(recorded, now, 'while the daemon held it and did not write it');
    if (compared.same) return false;
    this.#onReset?.(this.#resetSync('changed-outside', `${compared.detail}: something wrote it around bdsnap`));
    return true;
  }

  /** Mark ranges changed by hand (the operator knows better); durable in 'strict'. */
  async markDirty(ranges: ByteRange[]): Promise<void> {
    for (const r of ranges) checkRange({ size: this.#deviceSizeBytes }, r.offsetBytes, r.lengthBytes, false);
    const waits: Promise<void>[] = [];
    for (const r of ranges) {
      const p = this.mark(r.offsetBytes, r.lengthBytes);
      if (p) waits.push(p);
    }
    await Promise.all(waits);
  }

  /**
   * The snapshot's frozen view at this point, then the next number. Call under the write
   * barrier (no modifying request in flight), so no write falls between the two.
   */
  advance(): FrozenChangeMap {
    if (this.#closed) throw new BdsnapError('ESHUTDOWN', 'the change map is closed');
    const frozen = new FrozenChangeMap({
      generation: this.#generation, number: this.#number, blockSize: this.blockSize,
      deviceSizeBytes: this.#deviceSizeBytes, entries: this.#entries.slice(),
    });
    if (this.#number >= MAX_NUMBER) {
      const reset = this.#resetSync('wrapped', `the period number reached ${this.#number}`);
      this.#onReset?.(reset);
      return frozen;
    }
    this.#number++;
    try {
      this.#writeHeader(0);
      // The new number must be on disk before any entry of the new period can be (strict).
      if (this.#durable) fdatasyncFdSync(this.#fd);
    } catch (err) {
      this.#poison(err);
    }
    return frozen;
  }

  /**
   * Start a new generation: every block counts as changed for every consumer. Call under the
   * write barrier, like advance(): a write marked in the old generation and landing after the
   * reset is not in the new one.
   */
  async reset(reason: ChangeMapResetReason, detail: string): Promise<ChangeMapReset> {
    if (this.#closed) throw new BdsnapError('ESHUTDOWN', 'the change map is closed');
    return this.#resetSync(reason, detail);
  }

  /** Merged byte ranges changed since snapshot `sinceNumber` (0: since the generation began). */
  changedSince(sinceNumber: number, offsetBytes?: number, lengthBytes?: number): ByteRange[] {
    return changedRanges(this.#entries, this.blockSize, this.#deviceSizeBytes, sinceNumber, offsetBytes, lengthBytes);
  }

  /**
   * The same ranges as changedSince, handed to `visit` in order without building an array: for
   * streaming a map with very many ranges (a million alternating blocks) where allocation dominates.
   */
  forEachChanged(sinceNumber: number, visit: (offsetBytes: number, lengthBytes: number) => void, offsetBytes?: number, lengthBytes?: number): void {
    visitChanged(this.#entries, this.blockSize, this.#deviceSizeBytes, sinceNumber, visit, offsetBytes, lengthBytes);
  }

  /** The device's stamp given at open, or null: what to give close() when nothing wrote the device meanwhile. */
  get deviceStamp(): DeviceStamp | null {
    return this.#stamp ?? null;
  }

  /**
   * Clean close: wait for syncs in flight, record the device's stamp, mark the file clean and
   * make it durable. Give the stamp read after the device's last write was flushed and its
   * descriptor closed; null when it is not known (the next open that compares stamps then
   * resets). A map whose file failed is left unclean (reset at the next open).
   */
  async close(deviceStamp: DeviceStamp | null): Promise<void> {
    if (this.#closed) return;
    let stamp = deviceStamp ?? undefined;
    let stampBytes: Buffer | undefined;
    try {
      stampBytes = encodeStamp(stamp);
    } catch {
      // Too large to record: the next open cannot vouch for the device.
      stamp = undefined;
    }
    // Idle since the daemon's last write, and the file moved anyway: someone else wrote it.
    if (this.#idle && this.#stamp !== undefined && stamp !== undefined) this.#resetIfChanged(this.#stamp, stamp);
    this.#closed = true;
    this.#stopTimers();
    try {
      await this.#sync.settled();
      if (this.#failure === undefined) {
        this.#lastWriteSeenMs = Date.now();
        this.#stamp = stamp;
        this.#stampBytes = stampBytes;
        this.#writeHeader(FLAG_CLEAN);
        await fdatasyncFd(this.#fd);
      }
    } finally {
      fs.closeSync(this.#fd);
    }
  }

  // ---- file -------------------------------------------------------------------------------

  #writeHeader(flags: number): void {
    this.#fillHeader(flags);
    pwriteFullySync(this.#fd, this.#header, 0);
  }

  #stopTimers(): void {
    clearInterval(this.#watchTimer);
    clearTimeout(this.#settleTimer);
    this.#settleTimer = undefined;
  }

  #writeEntries(lo: number, hi: number): void {
    if (this.#failure !== undefined) {
      if (this.#durable) throw new BdsnapError('EIO', `the change map cannot be written: ${this.#failure}`);
      return;
    }
    try {
      pwriteFullySync(this.#fd, entryBytes(this.#entries, lo, hi), HEADER_BYTES + lo * 4);
    } catch (err) {
      this.#poison(err);
      // strict promises durability before the device write: without it the write must fail.
      if (this.#durable) throw new BdsnapError('EIO', `the change map cannot be written: ${this.#failure}`, { cause: err });
    }
  }

  /**
   * The file cannot be written: keep tracking in memory (exact while the process lives) and
   * make sure the next open resets: flag the header, or failing that cut the file short.
   */
  #poison(err: unknown): void {
    if (this.#failure !== undefined) return;
    this.#failure = toBdsnapError(err).message;
    try {
      this.#writeHeader(FLAG_POISONED);
      fdatasyncFdSync(this.#fd);
    } catch {
      try {
        ftruncateFdSync(this.#fd, 0);
      } catch {
        // Nothing more can be done from here; the failure is reported through `failure`.
      }
    }
  }

  /** strict: entry ranges ([first, last, number]...) of the current epoch reached stable storage. */
  #markDurable(ranges: readonly number[]): void {
    const durable = this.#durable;
    if (!durable) return;
    for (let k = 0; k < ranges.length; k += 3) {
      const n = ranges[k + 2]!;
      for (let i = ranges[k]!; i <= ranges[k + 1]!; i++) if (durable[i]! < n) durable[i] = n;
    }
  }

  /** New generation, in memory and in a new file that replaces the old one atomically. */
  #resetSync(reason: ChangeMapResetReason, detail: string): ChangeMapReset {
    const previousGeneration = this.#generation;
    this.#epoch++;
    this.#generation = newGeneration();
    this.#createdMs = Date.now();
    this.#number = 1;
    this.#entries.fill(0);
    this.#durable?.fill(0);
    // A sync in flight on the old fd closes it when done (so its number is not reused under it).
    if (!this.#sync.inFlight) {
      try {
        fs.closeSync(this.#fd);
      } catch {
        // The old file is about to be replaced.
      }
    }
    this.#failure = undefined;
    this.#replaceFile();
    return { reason, detail, previousGeneration };
  }

  /** Write the whole map to a new file (unclean, this boot) and make it the map file. */
  #replaceFile(): void {
    this.#lastWriteSeenMs = Date.now();
    this.#fillHeader(0);
    writeFileAtomicSync(this.#file, [this.#header, entryBytes(this.#entries, 0, this.#entries.length - 1)]);
    this.#fd = openFdSync(this.#file, 'r+');
  }

  #fillHeader(flags: number): void {
    if (this.#idle && (flags & (FLAG_CLEAN | FLAG_POISONED)) === 0) flags |= FLAG_IDLE;
    fillHeader(this.#header, {
      generation: this.#generation, blockSize: this.blockSize, blocks: this.blocks, number: this.#number,
      deviceSizeBytes: this.#deviceSizeBytes, flags, bootId: this.#bootId, lastWriteSeenMs: this.#lastWriteSeenMs,
      createdMs: this.#createdMs, stampBytes: this.#stampBytes,
    });
  }
}
