/**
 * CowDevice: a mount's session, a point of the copy-before-write engine (CowLayer). It wraps
 * any BlockDevice (or joins the CowLayer it is given, beside the snapshots' points) and, for
 * every write, trim and write-zeroes, the engine first hands it the original content of each
 * chunk not yet preserved in this session, which it stores in its session store; then the
 * request goes through.
 *
 * Invariants:
 * - A chunk's original is in the store file (write(2) returned; in strict mode also fdatasync'ed)
 *   before any request touching that chunk reaches the base device.
 * - Copies in flight are the engine's: two requests racing for a chunk copy it once, and an
 *   original read for several points is read once.
 * - Reads and rewrites of preserved chunks cost one bit lookup per point (`#preserved` here), and
 *   no await.
 * - Memory follows the touched chunks: a bitmap of the device plus a compact chunk table.
 * - Nothing touches the disk until the first modifying request: a read-only client leaves no
 *   session directory.
 * - When the store fails (size limit, full disk, I/O error) the session is marked failed with
 *   the reason and requests go on to the device untouched.
 * - A run of at least `cloneMinBytes` whose bytes are whole filesystem blocks is kept by reflink
 *   (FICLONERANGE from the device into the store) where the device is an image file on the
 *   store's reflink filesystem: the filesystem then copies on the device's write, and we read
 *   nothing. Smaller runs are copied: a clone has a fixed cost (tens of microseconds) and
 *   writes back the range's dirty pages first. The first refused clone ('unsupported': another
 *   filesystem, no reflink, a block device) is copied instead, and the session copies from then
 *   on. A cloned original gets its checksum later (see StoreWriter.seal), off the request path.
 */

import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { BdsnapError, toBdsnapError } from '../errors.js';
import { fsyncDirectory, makeDirectoryDurable, writeFileAtomic } from '../host/atomic-file.js';
import { closeFd, ftruncateFd, preadFully, removePath } from '../host/fd-io.js';
import {
  checkRange, type BlockDevice, type DeviceStamp, type BlockSizes, type DeviceIdentity, type Extent, type WriteOptions, type ZeroOptions,
} from '../device/block-device.js';
import {
  DEFAULT_CHUNK_SIZE, DEFAULT_SNAPSHOT_ROOT, DIGEST_ALGORITHM, DIGEST_BYTES, DIGESTS_FILE, FORMAT_NAME, FORMAT_VERSION, INDEX_FILE,
  RECORD_HEADER_BYTES, checkChunkSize, chunkDigest, encodeDigestArrays, encodeIndex, writeManifest, SESSION_FILE_MODE,
  type Durability, type Manifest,
} from './format.js';
import { StoreWriter } from './store-writer.js';
import { ChunkBitmap, ChunkTable } from './chunk-table.js';
import { forEachChunk } from './chunk-runs.js';
import { InFlight } from './copy-claims.js';
import { CowLayer, MAX_CLONE_RUN_BYTES, MAX_RUN_BYTES, type CowCloner, type CowPoint } from './cow-layer.js';
import { DeferredSync } from './deferred-sync.js';
import { PointInTimeView } from './point-in-time-view.js';
import { cloneAlignment, createDataFile, makeSessionDir } from './session-dir.js';

/** Clones ahead only while the store stays this far below its size limit, if it has one. */
const CLONE_AHEAD_ROOM_BYTES = 4 * MAX_CLONE_RUN_BYTES;
/**
 * In 'process' durability a copied run at least this long gets its CRC-32 later, in a seal
 * (StoreWriter.appendUnsealed): about 0.2 ms of the event loop per MiB off the request path,
 * paid by the background seal and sync (a second after first writes pause, at the latest
 * 30 s into a steady stream of them: see deferred-sync.ts) or at the end; the seal reads the bytes
 * back from the store. Strict mode always checksums before the sync.
 */
const UNSEALED_COPY_MIN_BYTES = 256 * 1024;
/**
 * Default smallest run kept by reflink instead of a copy. Measured on XFS in a loop-mounted
 * file, sequential first writes through a session, cloned against copied: see BENCHMARKS.md.
 */
export const DEFAULT_CLONE_MIN_BYTES = 256 * 1024;
export interface SessionOptions {
  /** Canonical absolute path of the device, recorded in the manifest. */
  devicePath: string;
  /** Where session directories go; default '/snapshot' (created if missing). */
  snapshotRoot?: string;
  /** Bytes, power of two >= 4096; default 16 KiB (DEFAULT_CHUNK_SIZE). */
  chunkSize?: number;
  /**
   * 'process' (default): an original is in the store file (page cache) before its chunk is
   * written, so a killed process loses nothing. 'strict': it is also on stable storage (one
   * fdatasync per batch of chunks), so power loss loses nothing either.
   */
  durability?: Durability;
  /** Cap on the store's size in bytes; undefined = no limit (a full disk is still handled). */
  sizeLimitBytes?: number;
  /** Default: when create() is called. Names the directory. */
  mountTime?: Date;
  /** Recorded in the manifest next to the size, and checked by restore. */
  deviceIdentity?: DeviceIdentity;
  /** Called off the request path (a listener's errors are ignored). */
  onEvent?: (event: SessionEvent) => void;
  /**
   * Runs of first writes of at least this many bytes keep their original by reflink where the
   * device and the store allow it (default DEFAULT_CLONE_MIN_BYTES); Infinity: always copy.
   */
  cloneMinBytes?: number;
  /** The monotonic clock (ms) the deferred sync measures pauses with; default performance.now. */
  clockMs?: () => number;
  /**
   * Asked at close, once the last write is done: why another process wrote the device during
   * the session, if it did (see writtenAround()); the caller may also report it earlier.
   */
  checkWrittenAround?: () => Promise<string | undefined>;
}

/** What a session reports as it goes, in order: start, then failed and/or error, then end. */
export type SessionEvent =
  /** The session directory and its manifest exist: the first modifying request arrived. */
  | { type: 'session-start'; sessionDir: string; devicePath: string; mountTime: string }
  /** Copy-before-write stopped (overflow, full disk, I/O error); the device carries on untouched. */
  | { type: 'session-failed'; sessionDir: string | undefined; reason: string; cause?: string }
  /** Something went wrong around the session (recording a failure), not on the data path. */
  | { type: 'session-error'; sessionDir: string; reason: string }
  /** close(): the session is closed and durable. */
  | ({ type: 'session-end' } & SessionSummary);

/**
 * What close() reports about a session that modified something (and the 'session-end' event).
 * Not to be confused with a session as the daemon lists it (SessionListEntry, control API).
 */
export type SessionSummary = {
  sessionDir: string;
  devicePath: string;
  state: 'complete' | 'failed';
  /** ISO 8601. */
  mountTime: string;
  endTime: string;
  preservedChunks: number;
  preservedBytes: number;
  /** Size of data.bin (record headers included). */
  storeBytes: number;
  failedReason?: string;
};

export type CowState = 'idle' | 'active' | 'failed' | 'complete';

export class CowDevice implements BlockDevice {
  readonly size: number;
  readonly readOnly: boolean;
  readonly blockSizes: BlockSizes;
  readonly canTrim: boolean;
  readonly canFastZero: boolean;
  readonly canMultiConn: boolean;
  readonly chunkSize: number;

  readonly #base: BlockDevice;
  readonly #options: SessionOptions;
  readonly #mountTime: Date;
  readonly #root: string;
  readonly #durability: Durability;
  /** Set = the chunk's original is in the store. */
  readonly #preserved: ChunkBitmap;
  /** chunk -> byte position of its original in data.bin. */
  readonly #location = new ChunkTable();
  /** The engine this session is a point of: its own, or the snapshots' layer it was given. */
  readonly #layer: CowLayer;
  readonly #ownLayer: boolean;
  readonly #point: CowPoint;
  #state: CowState = 'idle';
  #sessionDir: string | undefined;
  /** The device's stamp before the first write and after the last (see `host/file-stamp.ts`). */
  #startStamp: DeviceStamp | undefined;
  #endStamp: DeviceStamp | undefined;
  #starting: Promise<boolean> | undefined;
  #writer: StoreWriter | undefined;
  #dataFd: number | undefined;
  #failedReason: string | undefined;
  #failurePersisted: Promise<void> = Promise.resolve();
  #preservedChunks = 0;
  #preservedBytes = 0;
  readonly #inflight = new InFlight();
  #closing: Promise<SessionSummary | undefined> | undefined;
  /** Cloned originals get their checksums there too, while the session is quiet (or at the latest at close). */
  readonly #deferredSync: DeferredSync;
  readonly #cloneMinBytes: number;
  /** The store's filesystem block size: cloned ranges are whole blocks. Set at start. */
  #cloneAlignBytes: number | undefined;
  /** False once a clone was refused: the pair (device, store) cannot clone. */
  #cloneWorks: boolean | undefined;
  #clonedRuns = 0;
  #clonedBytes = 0;

  private constructor(base: BlockDevice, options: SessionOptions) {
    const chunkSize = options.chunkSize ?? DEFAULT_CHUNK_SIZE;
    checkChunkSize(chunkSize);
    if (!path.isAbsolute(options.devicePath)) throw new BdsnapError('EINVAL', `device path must be absolute: ${options.devicePath}`);
    if (options.sizeLimitBytes !== undefined && !(Number.isSafeInteger(options.sizeLimitBytes) && options.sizeLimitBytes >= 0)) {
      throw new BdsnapError('EINVAL', `sizeLimitBytes must be a non-negative integer, got ${options.sizeLimitBytes}`);
    }
    if (options.cloneMinBytes !== undefined && !(options.cloneMinBytes >= 0)) {
      throw new BdsnapError('EINVAL', `cloneMinBytes must be a non-negative number, got ${options.cloneMinBytes}`);
    }
    if (options.durability !== undefined && options.durability !== 'process' && options.durability !== 'strict') {
      throw new BdsnapError('EINVAL', `durability must be 'process' or 'strict', got ${String(options.durability)}`);
    }
    this.#base = base;
    this.#options = options;
    this.chunkSize = chunkSize;
    this.#mountTime = options.mountTime ?? new Date();
    this.#root = options.snapshotRoot ?? DEFAULT_SNAPSHOT_ROOT;
    this.#durability = options.durability ?? 'process';
    this.#cloneMinBytes = options.cloneMinBytes ?? DEFAULT_CLONE_MIN_BYTES;
    this.#deferredSync = new DeferredSync(options.clockMs ?? (() => performance.now()), () => this.#sealStore().then(() => this.#syncStore()), () => this.#closing !== undefined);
    this.size = base.size;
    this.readOnly = base.readOnly;
    this.blockSizes = base.blockSizes;
    this.canTrim = base.canTrim;
    this.canFastZero = base.canFastZero;
    this.canMultiConn = base.canMultiConn;
    this.#preserved = new ChunkBitmap(Math.ceil(base.size / chunkSize));
    this.#ownLayer = !(base instanceof CowLayer);
    this.#layer = base instanceof CowLayer ? base : new CowLayer(base, { chunkSize });
    if (this.#layer.chunkSize !== chunkSize) {
      throw new BdsnapError('EINVAL', `the session's chunk size ${chunkSize} differs from its copy-before-write layer's ${this.#layer.chunkSize}`);
    }
    this.#point = this.#makePoint();
    this.#layer.attachPoint(this.#point);
  }

  /** Wrap `base`. No I/O happens until the first modifying request. Errors: EINVAL. */
  static create(base: BlockDevice, options: SessionOptions): CowDevice {
    return new CowDevice(base, options);
  }

  /** Set once the session directory exists. */
  get sessionDir(): string | undefined {
    return this.#sessionDir;
  }

  get state(): CowState {
    return this.#state;
  }

  /**
   * `unsyncedBytes`: store bytes in the page cache only, until the next (background) sync.
   * `clonedBytes`: preserved bytes kept by reflink (part of preservedBytes).
   */
  stats(): { preservedChunks: number; preservedBytes: number; storeBytes: number; unsyncedBytes: number; clonedRuns: number; clonedBytes: number; failedReason?: string } {
    const s = {
      preservedChunks: this.#preservedChunks,
      preservedBytes: this.#preservedBytes,
      storeBytes: this.#writer?.sizeBytes ?? 0,
      unsyncedBytes: this.#writer?.unsyncedBytes ?? 0,
      clonedRuns: this.#clonedRuns,
      clonedBytes: this.#clonedBytes,
    };
    return this.#failedReason === undefined ? s : { ...s, failedReason: this.#failedReason };
  }

  // ---- BlockDevice ----------------------------------------------------------------------

  read(target: Buffer, offsetBytes: number): Promise<void> {
    if (this.#closing) return Promise.reject(new BdsnapError('ESHUTDOWN', 'the session is closed'));
    return this.#base.read(target, offsetBytes);
  }

  write(data: Buffer, offsetBytes: number, options?: WriteOptions): Promise<void> {
    return this.#modify(() => this.#layer.write(data, offsetBytes, options));
  }

  trim(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    return this.#modify(() => this.#layer.trim(offsetBytes, lengthBytes, options));
  }

  zero(offsetBytes: number, lengthBytes: number, options?: ZeroOptions): Promise<void> {
    return this.#modify(() => this.#layer.zero(offsetBytes, lengthBytes, options));
  }

  /** The store (and every other point's) first, then the device: an acknowledged flush covers both. */
  flush(): Promise<void> {
    return this.#inflight.track(() => this.#layer.flush());
  }

  cache(offsetBytes: number, lengthBytes: number): Promise<void> {
    return this.#base.cache(offsetBytes, lengthBytes);
  }

  extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    return this.#base.extents(offsetBytes, lengthBytes);
  }

  /**
   * End the session durably: wait for requests in flight, sync the store, record the digest of
   * the final content of every touched chunk, write the index and mark the manifest complete.
   * Returns undefined when nothing was modified (no directory exists). Does not close the base.
   */
  close(): Promise<SessionSummary | undefined>;
  /** The BlockDevice signature, so that a CowDevice is served like any other device. */
  close(): Promise<void>;
  close(): Promise<SessionSummary | void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  /**
   * Stop without ending the session, for a daemon that must exit while the device is still in
   * use (a filesystem that would not unmount): the requests in flight finish, the store is made
   * durable, the manifest stays 'active', and the next start recovers the session as
   * interrupted, as after a crash. Never 'complete' while something may still write the device.
   */
  async leaveForRecovery(): Promise<void> {
    this.#closing ??= Promise.resolve(undefined);
    await this.#inflight.idle();
    await this.#detach();
    await this.#deferredSync.stop();
    await this.#sealStore();
    await this.#syncStore();
    await this.#closeDataFd();
  }

  /**
   * Stop as a killed process stops, for tests that simulate a kill inside one process: no
   * request, sync, seal or manifest update follows, and the store's descriptor is closed (the
   * kernel closes it at a kill), which lets recovery take the session's lock. The store is
   * left exactly as it was.
   */
  async dropAsIfKilled(): Promise<void> {
    this.#closing ??= Promise.resolve(undefined);
    await this.#detach();
    await this.#deferredSync.stop();
    await this.#closeDataFd();
  }

  /** A read-only BlockDevice showing the device as it was when the session began. */
  view(): BlockDevice {
    return new PointInTimeView(this.size, this.#base.blockSizes, (target, offsetBytes) => this.#readOriginal(target, offsetBytes));
  }

  /** Leave the engine once no copy in flight may still hand this session an original. */
  async #detach(): Promise<void> {
    await this.#layer.detachPoint(this.#point);
    if (this.#ownLayer) await this.#layer.close();
  }

  // ---- write path -----------------------------------------------------------------------

  #modify(apply: () => Promise<void>): Promise<void> {
    if (this.#closing) return Promise.reject(new BdsnapError('ESHUTDOWN', 'the session is closing'));
    if (this.readOnly) return Promise.reject(new BdsnapError('EPERM', `${this.#options.devicePath} is read-only`));
    return this.#inflight.run(apply);
  }

  /** The session as the engine sees it: its bitmap, its store as the sink, its reflink path. */
  #makePoint(): CowPoint {
    const cloneWorks = (): boolean => this.#cloneWorks === true;
    const storing = (): boolean => this.#state === 'idle' || this.#state === 'active';
    const cloner: CowCloner = {
      get cloning() {
        return cloneWorks();
      },
      clones: (startBytes, lengthBytes) => this.#clones(startBytes, lengthBytes),
      mayCloneAhead: () => this.#mayCloneAhead(),
      cloneOriginal: (firstChunk, lastChunk, bytes) => this.#cloneRun(firstChunk, lastChunk, bytes),
    };
    const sink = {
      get usable() {
        return storing();
      },
      sync: () => this.#syncStore(),
    };
    return {
      preserved: this.#preserved,
      get usable() {
        return storing();
      },
      sink,
      cloner,
      ready: () => this.#ensureStarted(),
      storeOriginal: (firstChunk, payload) => this.#storeOriginal(firstChunk, payload),
      locate: (chunk) => this.#location.get(chunk),
      readAt: (position, target) => this.#readStore(position, target),
      checkReadable: () => this.#checkViewUsable(),
    };
  }

  async #storeOriginal(firstChunk: number, payload: Buffer): Promise<void> {
    const lastChunk = firstChunk + Math.ceil(payload.length / this.chunkSize) - 1;
    if (this.#durability === 'process' && payload.length >= UNSEALED_COPY_MIN_BYTES) {
      this.#stored(firstChunk, lastChunk, await this.#writer!.appendUnsealed(firstChunk, payload), payload.length);
      return;
    }
    const position = await this.#writer!.append(firstChunk, payload);
    this.#stored(firstChunk, lastChunk, position === undefined ? undefined : position + RECORD_HEADER_BYTES, payload.length);
  }

  /** Whether a run of these bytes is tried as a clone: whole filesystem blocks, long enough, not refused before. */
  #clones(startBytes: number, lengthBytes: number): boolean {
    const align = this.#cloneAlignBytes;
    return this.#cloneWorks !== false && lengthBytes >= this.#cloneMinBytes && align !== undefined && startBytes % align === 0 && lengthBytes % align === 0;
  }

  async #cloneRun(firstChunk: number, lastChunk: number, bytes?: () => Promise<Buffer>): Promise<void> {
    const startBytes = firstChunk * this.chunkSize;
    const lengthBytes = Math.min((lastChunk + 1) * this.chunkSize, this.size) - startBytes;
    const payloadPosition = await this.#writer!.appendCloned(firstChunk, lengthBytes, this.#cloneAlignBytes!,
      (dstFd, dstOffsetBytes) => this.#cloneOriginal(startBytes, lengthBytes, dstFd, dstOffsetBytes, bytes));
    this.#stored(firstChunk, lastChunk, payloadPosition, lengthBytes);
  }

  async #readStore(position: number, target: Buffer): Promise<void> {
    const fd = this.#dataFd;
    if (fd === undefined) throw new BdsnapError('ESHUTDOWN', 'the session is closed; its point-in-time view is gone');
    const n = await preadFully(fd, target, position).catch((err: unknown) => {
      throw toBdsnapError(err);
    });
    if (n !== target.length) throw new BdsnapError('EIO', `the session store is shorter than expected at byte ${position}`);
  }

  /**
   * Whether chunks ahead of a sequential request can be kept by clone: every run of whole
   * chunks is made of whole filesystem blocks (else the run would be copied, bytes read for
   * chunks nobody wrote), and the store is far enough from its size limit.
   */
  #mayCloneAhead(): boolean {
    if (this.#cloneAlignBytes === undefined || this.#cloneAlignBytes > this.chunkSize) return false;
    const limit = this.#options.sizeLimitBytes;
    return limit === undefined || this.#writer!.sizeBytes + CLONE_AHEAD_ROOM_BYTES <= limit;
  }

  /** Chunks firstChunk..lastChunk are in the store from `payloadPosition` on (undefined: the store failed). */
  #stored(firstChunk: number, lastChunk: number, payloadPosition: number | undefined, lengthBytes: number): void {
    if (payloadPosition === undefined) return; // the session is marked failed
    this.#preserved.addRange(firstChunk, lastChunk);
    this.#location.setRunIfAbsent(firstChunk, lastChunk, payloadPosition, this.chunkSize);
    this.#preservedChunks += lastChunk - firstChunk + 1;
    this.#preservedBytes += lengthBytes;
    this.#scheduleSync();
  }

  /** The fill of a cloned record: reflink the device's range, or return its bytes to write. */
  async #cloneOriginal(startBytes: number, lengthBytes: number, dstFd: number, dstOffsetBytes: number, bytes?: () => Promise<Buffer>): Promise<Buffer | undefined> {
    if (this.#cloneWorks !== false && (await this.#base.cloneRangeTo?.(startBytes, lengthBytes, dstFd, dstOffsetBytes)) === 'cloned') {
      this.#cloneWorks = true;
      this.#clonedRuns++;
      this.#clonedBytes += lengthBytes;
      return undefined;
    }
    // Refused: this device and store cannot clone; copy this run and every later one.
    this.#cloneWorks = false;
    if (bytes) return bytes();
    const buf = Buffer.allocUnsafe(lengthBytes);
    await this.#base.read(buf, startBytes);
    return buf;
  }

  #ensureStarted(): Promise<boolean> | boolean {
    if (this.#state === 'active') return true;
    if (this.#state === 'failed') return false;
    this.#starting ??= this.#start();
    return this.#starting;
  }

  async #start(): Promise<boolean> {
    let dir: string | undefined;
    let fd: number | undefined;
    let manifestWritten = false;
    try {
      await makeDirectoryDurable(this.#root, { recursive: true, mode: 0o700 });
      dir = await makeSessionDir(this.#root, this.#options.devicePath, this.#mountTime);
      // The data file exists before the manifest says 'active', so a crash right after leaves
      // a session that recovers as an empty interrupted one.
      fd = createDataFile(dir);
      // Taken before any write of this session reaches the device: what the previous session
      // or restore left must carry this stamp, else something else wrote the device between.
      // A stamp that cannot be read is unknown (restore then says so), never a reason to fail the session.
      this.#startStamp = await this.#base.stamp?.().catch(() => undefined);
      await writeManifest(dir, this.#manifest('active'));
      manifestWritten = true;
      await fsyncDirectory(this.#root);
      this.#dataFd = fd;
      this.#sessionDir = dir;
      this.#cloneAlignBytes = await cloneAlignment(this.#base, dir);
      if (this.#cloneAlignBytes === undefined) this.#cloneWorks = false;
      this.#writer = new StoreWriter(fd, 0, {
        strict: this.#durability === 'strict',
        sizeLimitBytes: this.#options.sizeLimitBytes,
        onFailure: (reason, err) => this.#fail(reason, err),
      });
      this.#state = 'active';
      this.#emit({ type: 'session-start', sessionDir: dir, devicePath: this.#options.devicePath, mountTime: this.#mountTime.toISOString() });
      return true;
    } catch (err) {
      if (fd !== undefined) await closeFd(fd).catch(() => undefined);
      // A directory without a manifest would block restores of older sessions: remove it.
      if (dir !== undefined && !manifestWritten) await removePath(dir, { recursive: true }).catch(() => undefined);
      if (dir !== undefined && manifestWritten) this.#sessionDir = dir;
      this.#state = 'failed';
      this.#failedReason = `cannot create the session directory: ${(err as Error).message}`;
      this.#emit({ type: 'session-failed', sessionDir: this.#sessionDir, reason: this.#failedReason });
      if (manifestWritten) this.#failurePersisted = this.#persistFailure();
      return false;
    }
  }

  /**
   * Another process wrote the device while this session was active: what it wrote has no
   * original here, so the session cannot restore exactly and is failed with `reason`. Before
   * the session's first write nothing is needed: the session's start stamp, read at that
   * write, includes the other write, and restore compares it with what the session before left.
   */
  writtenAround(reason: string): void {
    if (this.#state === 'active') this.#fail(reason);
  }

  #fail(reason: string, err?: unknown): void {
    if (this.#state === 'failed') return;
    this.#state = 'failed';
    this.#failedReason = reason;
    const cause = err instanceof Error ? err.message : undefined;
    this.#emit({ type: 'session-failed', sessionDir: this.#sessionDir, reason, ...(cause ? { cause } : {}) });
    this.#failurePersisted = this.#persistFailure();
  }

  /** Record the failure; if the disk is full, give the useless data back first. */
  async #persistFailure(): Promise<void> {
    const dir = this.#sessionDir;
    if (dir === undefined) return;
    try {
      await writeManifest(dir, this.#manifest('failed'));
    } catch {
      try {
        if (this.#dataFd !== undefined) await ftruncateFd(this.#dataFd, 0);
        await writeManifest(dir, this.#manifest('failed'));
      } catch (err) {
        this.#emit({ type: 'session-error', sessionDir: dir, reason: `cannot record the failure in the manifest: ${(err as Error).message}` });
      }
    }
  }

  async #syncStore(): Promise<void> {
    if (this.#starting) await this.#starting;
    if (this.#state !== 'active' || !this.#writer) return;
    try {
      await this.#writer.sync();
    } catch {
      // The writer has marked the session failed; the device write goes on regardless.
    }
  }

  async #sealStore(): Promise<void> {
    if (this.#state !== 'active' || !this.#writer) return;
    try {
      await this.#writer.seal();
    } catch {
      // The writer has marked the session failed.
    }
  }

  #scheduleSync(): void {
    if (this.#durability === 'strict' || this.#closing) return;
    this.#deferredSync.stored();
  }

  async #close(): Promise<SessionSummary | undefined> {
    await this.#inflight.idle();
    await this.#detach();
    await this.#deferredSync.stop();
    if (this.#starting) await this.#starting;
    const around = await this.#options.checkWrittenAround?.().catch((err: unknown) => `writes by other processes cannot be ruled out: ${(err as Error).message}`);
    if (around !== undefined) this.writtenAround(around);
    if (this.#state === 'idle' || this.#sessionDir === undefined) return undefined;
    const dir = this.#sessionDir;
    const endTime = new Date().toISOString();
    try {
      // A failing sync marks the session failed (handled below) instead of failing close().
      if (this.#state === 'active') await this.#sealStore();
      if (this.#state === 'active') await this.#writer!.sync().catch(() => undefined);
      if (this.#state === 'active') {
        await this.#base.flush();
        const { chunks } = this.#location.sorted();
        const digests = await this.#finalDigests(chunks);
        this.#endStamp = await this.#base.stamp?.().catch(() => undefined);
        await writeFileAtomic(path.join(dir, DIGESTS_FILE), encodeDigestArrays(chunks, digests), SESSION_FILE_MODE);
        await writeFileAtomic(path.join(dir, INDEX_FILE), encodeIndex(this.#location), SESSION_FILE_MODE);
        await writeManifest(dir, { ...this.#manifest('complete'), endTime, digestedChunks: chunks.length });
        this.#state = 'complete';
      } else {
        await this.#failurePersisted;
        await writeManifest(dir, { ...this.#manifest('failed'), endTime }).catch(() => undefined);
      }
    } catch (err) {
      // Still restorable from the originals, like a crash; the digests are what is missing.
      if (this.#state === 'active') await writeManifest(dir, { ...this.#manifest('interrupted'), endTime }).catch(() => undefined);
      await this.#closeDataFd();
      throw toBdsnapError(err);
    }
    await this.#closeDataFd();
    const { preservedChunks, preservedBytes, storeBytes, failedReason } = this.stats();
    const summary: SessionSummary = {
      sessionDir: dir,
      devicePath: this.#options.devicePath,
      state: this.#state === 'complete' ? 'complete' : 'failed',
      mountTime: this.#mountTime.toISOString(),
      endTime,
      preservedChunks,
      preservedBytes,
      storeBytes,
      ...(failedReason !== undefined ? { failedReason } : {}),
    };
    this.#emit({ type: 'session-end', ...summary });
    return summary;
  }

  async #closeDataFd(): Promise<void> {
    const fd = this.#dataFd;
    this.#dataFd = undefined;
    if (fd !== undefined) await closeFd(fd);
  }

  /** The end digest of each of `chunks` (sorted), DIGEST_BYTES each, read in large runs. */
  async #finalDigests(chunks: Float64Array): Promise<Buffer> {
    const digests = Buffer.allocUnsafe(chunks.length * DIGEST_BYTES);
    await forEachChunk(this.#base, chunks, this.chunkSize, MAX_RUN_BYTES, (_chunk, data, i) => chunkDigest(data, DIGEST_ALGORITHM, digests, i * DIGEST_BYTES), {
      // A long digest pass must not starve the other sessions and exports on the loop.
      yieldBetweenRuns: true,
    });
    return digests;
  }

  #manifest(state: Manifest['state']): Manifest {
    return {
      format: FORMAT_NAME,
      version: FORMAT_VERSION,
      devicePath: this.#options.devicePath,
      deviceSize: this.size,
      deviceIdentity: this.#options.deviceIdentity ?? {},
      chunkSize: this.chunkSize,
      durability: this.#durability,
      mountTime: this.#mountTime.toISOString(),
      endTime: null,
      state,
      preservedChunks: this.#preservedChunks,
      preservedBytes: this.#preservedBytes,
      storeBytes: this.#writer?.sizeBytes ?? 0,
      digestedChunks: null,
      failedReason: this.#failedReason ?? null,
      digestAlgorithm: DIGEST_ALGORITHM,
      ...(this.#startStamp ? { startStamp: this.#startStamp } : {}),
      ...(this.#endStamp ? { endStamp: this.#endStamp } : {}),
    };
  }

  #emit(event: SessionEvent): void {
    const onEvent = this.#options.onEvent;
    if (!onEvent) return;
    setImmediate(() => {
      try {
        onEvent(event);
      } catch {
        // A listener's bug must not break the data path.
      }
    });
  }

  // ---- point-in-time reads ----------------------------------------------------------------

  /** The content as it was at session start, through the engine's point-in-time reader. */
  async #readOriginal(target: Buffer, offsetBytes: number): Promise<void> {
    if (this.#closing) throw new BdsnapError('ESHUTDOWN', 'the session is closed; its point-in-time view is gone');
    checkRange(this, offsetBytes, target.length, false);
    if (target.length === 0) return;
    this.#checkViewUsable();
    await this.#layer.readPoint(this.#point, target, offsetBytes);
  }

  #checkViewUsable(): void {
    if (this.#state === 'failed') {
      throw new BdsnapError('ESESSION', `the session failed (${this.#failedReason ?? 'unknown reason'}); its point-in-time view is no longer valid`);
    }
    if (this.#state === 'complete' || (this.#closing && this.#dataFd === undefined && this.#state !== 'idle')) {
      throw new BdsnapError('ESHUTDOWN', 'the session is closed; its point-in-time view is gone');
    }
  }
}
