/**
 * DiffStorage: the difference storage of one snapshot, shared by its devices. It keeps the
 * originals of chunks that changed on a device after the snapshot was taken, and the chunks
 * written to the snapshot's images, as append-only records in files `<id>.<n>.rec`, file n in
 * the n-th directory it was given (a directory added by extend() gets the next file). New
 * records always go to the newest file. The records are the session store's (format.ts), each
 * naming its device and its place in the storage's order, written by the same StoreWriter and
 * read by the same scanner.
 *
 * Storages written before hold `<id>.<n>.diff` files of an older record layout
 * (legacy-diff-record.ts): they are read, never appended to. Opening one starts a `.rec` file
 * for new records; a build that knows only `.diff` files then refuses the storage (a file is
 * missing) instead of taking the new records for damage. `<id>.dirs` (written
 * atomically at create, extend and open, in the first directory and in the newest one) lists
 * the directories, the number of files and how many are sealed (nothing in flight for them any
 * more), so that open() finds every file from the first directory alone and accepts a torn
 * tail only where one can be.
 *
 * Invariants:
 * - A record counts as stored (its append resolves true, `holds` says so) only once it and
 *   every record before it in its file are in the file (page cache; in 'strict' durability
 *   also fdatasync'ed, one sync for every record that queued meanwhile). A SIGKILL can only
 *   leave a torn or missing part after the last stored record, which open() cuts.
 * - Records are never rewritten: a newer image record of a chunk supersedes older records, so
 *   a scan gives back the last stored state.
 * - `usedBytes` counts every record queued, headers included; a record that would pass the
 *   limit is refused and the storage becomes 'overflowed'. ENOSPC/EDQUOT from the disk also
 *   means 'overflowed', any other I/O error 'failed'. Either is final: chunks changed on the
 *   device afterwards are not preserved, so the images are no longer exact. fail() brings
 *   either state from outside (the snapshot's device changed where it could not see). The state is
 *   recorded at once, synchronously, in `<id>.state` in the first directory (an empty file is
 *   enough to mean "failed", which needs no free data block), so that open() after a kill never
 *   brings a broken storage back as 'ok'.
 * - Events go through setImmediate: a listener never runs on the request path, and a
 *   listener's exception is dropped.
 *
 * Low space (`low-space` event, once per crossing, again after the condition cleared):
 * - used bytes pass 90% of the limit;
 * - the filesystem of the current directory has less than 5% or less than 256 MiB free.
 * The filesystem is checked with statfs in the background, at most once a second while
 * records are being stored.
 */

import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { BdsnapError, toBdsnapError } from '../errors.js';
import { formatBytes } from '../units.js';
import { checkChunkSize, type Durability } from './format.js';
import { writeFileAtomic, writeFileAtomicSync } from '../host/atomic-file.js';
import { checkPrivateDir } from '../host/private-dir.js';
import { ChunkTable } from './chunk-table.js';
import { StoreWriter } from './store-writer.js';
import { scanRecords, type RecordScanner } from './record-scan.js';
import { closeFd, ftruncateFd, openFd, preadFully, preadFullySync, removePath } from '../host/fd-io.js';
import { MAX_DEVICE_KEY, RECORD_HEADER_BYTES, decodeRecordHeader, encodeRecordHeader, payloadMatches, type RecordHeader } from './format.js';
import { decodeDiffRecordHeader, diffRecordMatches, type DiffRecordHeader, type DiffRecordKind } from './legacy-diff-record.js';


export type DiffStorageState = 'ok' | 'overflowed' | 'failed';

export type DiffStorageEvent =
  | { type: 'low-space'; usedBytes: number; limitBytes: number | null; freeBytes: number; dir: string }
  | { type: 'overflowed'; reason: string }
  | { type: 'failed'; reason: string };

export interface DiffStorageOptions {
  /** Snapshot id; names the files. Letters, digits, '.', '_', '-' (not first). */
  id: string;
  /** Directories (must exist); records are appended to the file in the last one. */
  dirs: string[];
  /** Bytes, power of two >= 4096. */
  chunkSize: number;
  /** Cap on the bytes of all files; undefined = no limit (a full disk is still handled). */
  limitBytes?: number;
  /**
   * 'process' (default): a record counts as stored once it is in the page cache, which a
   * killed process does not lose. 'strict': once fdatasync'ed (group commit).
   */
  durability?: Durability;
  /** Called off the request path; exceptions are ignored. */
  onEvent?: (event: DiffStorageEvent) => void;
  /** Thresholds of the low-space event (defaults documented above; tests lower them). */
  lowSpace?: { limitFraction?: number; fsFreeFraction?: number; fsFreeBytes?: number };
}

/** Defaults of the low-space thresholds. */
export const LOW_SPACE_LIMIT_FRACTION = 0.9;
export const LOW_SPACE_FS_FREE_FRACTION = 0.05;
export const LOW_SPACE_FS_FREE_BYTES = 256 * 1024 * 1024;
/** Shortest time between two statfs of the current directory. */
const FS_CHECK_INTERVAL_MS = 1000;
/**
 * A chunk's location is one number: file index * FILE_SPAN + byte position of its payload in
 * that file. 2^44 bytes (16 TiB) per file, up to 512 files, all below 2^53.
 */
const FILE_SPAN = 2 ** 44;
const MAX_FILES = 512;
/**
 * Reads of the storage up to this size are synchronous, as FileDevice does for the device: a
 * page-cache hit costs microseconds, a thread-pool round trip much more, and an image read
 * of changed chunks is one read per stored run (measured in process: sequential 1 MiB reads
 * of an image whose chunks had mostly changed in random order, 16 KiB chunks, went from 0.47x
 * to 0.65x of the device's own reads).
 */
const SYNC_READ_MAX_BYTES = 64 * 1024;
const ID_PATTERN = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/;

interface DiffFile {
  index: number;
  /** An `.diff` file of the older record layout: read only. */
  legacy: boolean;
  dir: string;
  path: string;
  fd: number;
  writer: StoreWriter;
}

export function diffFileName(id: string, index: number, legacy = false): string {
  return `${id}.${index}.${legacy ? LEGACY_SUFFIX : SUFFIX}`;
}

const SUFFIX = 'rec';
const LEGACY_SUFFIX = 'diff';

function stateFileName(id: string): string {
  return `${id}.state`;
}

/** Lists every directory of the storage, so that open() finds them all from any one of them. */
function dirsFileName(id: string): string {
  return `${id}.dirs`;
}

export class DiffStorage {
  readonly id: string;
  readonly chunkSize: number;
  readonly durability: Durability;
  readonly #onEvent: ((event: DiffStorageEvent) => void) | undefined;
  readonly #limitFraction: number;
  readonly #fsFreeFraction: number;
  readonly #fsFreeBytes: number;
  #dirs: string[];
  #files: DiffFile[] = [];
  #limitBytes: number | null;
  #usedBytes = 0;
  #nextSequence = 0;
  /** deviceKey -> (chunk -> location, see FILE_SPAN). */
  readonly #tables = new Map<number, ChunkTable>();
  readonly #attached = new Set<number>();
  #state: DiffStorageState = 'ok';
  #failedReason: string | undefined;
  #closing: Promise<void> | undefined;
  #lowOnLimit = false;
  #lowOnDisk = false;
  #fsCheckedAtMs = 0;
  #fsChecking = false;
  /** extend() calls that add a directory, one after the other. */
  #extending: Promise<void> = Promise.resolve();

  private constructor(options: DiffStorageOptions, dirs: string[]) {
    this.id = options.id;
    this.chunkSize = options.chunkSize;
    this.durability = options.durability ?? 'process';
    this.#onEvent = options.onEvent;
    this.#dirs = dirs;
    this.#limitBytes = options.limitBytes ?? null;
    this.#limitFraction = options.lowSpace?.limitFraction ?? LOW_SPACE_LIMIT_FRACTION;
    this.#fsFreeFraction = options.lowSpace?.fsFreeFraction ?? LOW_SPACE_FS_FREE_FRACTION;
    this.#fsFreeBytes = options.lowSpace?.fsFreeBytes ?? LOW_SPACE_FS_FREE_BYTES;
  }

  /** A new, empty storage. Errors: EINVAL (options, files of this id already there), ENOENT (a dir). */
  static async create(options: DiffStorageOptions): Promise<DiffStorage> {
    const dirs = await checkOptions(options);
    for (const dir of new Set(dirs)) {
      const existing = await listDiffFiles(dir, options.id);
      if (existing.length > 0 || [stateFileName(options.id), dirsFileName(options.id)].some((n) => fs.existsSync(path.join(dir, n)))) {
        throw new BdsnapError('EINVAL', `a difference storage named ${options.id} already exists in ${dir}`);
      }
    }
    const storage = new DiffStorage(options, dirs);
    storage.#files.push(await storage.#openFile(dirs[dirs.length - 1]!, 0, false, 'wx+'));
    await storage.#recordDirs([dirs[0]!], 0);
    storage.#checkSpace(true);
    return storage;
  }

  /**
   * The storage as a previous process left it (closed, killed, or after a power loss in
   * 'strict' durability): scans every file, verifies every record, cuts a torn tail and
   * rebuilds the chunk tables. `dirs` must include the first directory it was given (or the
   * one extend() added last): the storage records all of its directories there and finds the
   * others. Errors: ENOENT (no files, a directory or file missing), ECORRUPT (a bad record in
   * a sealed file), EINVAL.
   */
  static async open(options: DiffStorageOptions): Promise<DiffStorage> {
    const recorded = await readDirsFile(await checkOptions(options), options.id);
    const dirs = await checkDirs(recorded.dirs);
    const found: Array<{ index: number; legacy: boolean; dir: string }> = [];
    for (const dir of new Set(dirs)) for (const f of await listDiffFiles(dir, options.id)) found.push({ ...f, dir });
    found.sort((a, b) => a.index - b.index);
    if (found.length === 0) throw new BdsnapError('ENOENT', `no difference storage named ${options.id} in ${dirs.join(', ')}`);
    for (let i = 0; i < Math.max(found.length, recorded.files); i++) {
      if (found[i]?.index !== i) {
        const f = found[i];
        if (f !== undefined && f.index === i - 1) {
          throw new BdsnapError('ECORRUPT', `difference storage ${options.id} has two files number ${f.index} (${diffFileName(options.id, f.index)} and ${diffFileName(options.id, f.index, true)})`);
        }
        throw new BdsnapError('ENOENT', `difference storage ${options.id}: file ${diffFileName(options.id, i)} is missing (pass every directory it was given)`);
      }
    }
    const storage = new DiffStorage(options, dirs);
    try {
      for (const f of found) {
        const file = await storage.#openFile(f.dir, f.index, f.legacy, 'r+');
        storage.#files.push(file);
        await storage.#scan(file, f.index >= recorded.sealedFiles);
      }
      storage.#readStateFile();
      const newest = found[found.length - 1]!;
      // New records go to a file of the current layout, next to the older file they follow.
      if (newest.legacy) {
        if (found.length >= MAX_FILES) throw new BdsnapError('EINVAL', `difference storage ${options.id} already has ${MAX_FILES} files of an older layout; it cannot take new records`);
        storage.#files.push(await storage.#openFile(newest.dir, found.length, false, 'wx+'));
      }
      // Appends go to the newest file only, so every other one is sealed now.
      await storage.#recordDirs([dirs[0]!, newest.dir], storage.#files.length - 1);
    } catch (err) {
      await storage.#closeFiles();
      throw toBdsnapError(err);
    }
    storage.#checkSpace(true);
    return storage;
  }

  get state(): DiffStorageState {
    return this.#state;
  }

  get failedReason(): string | undefined {
    return this.#failedReason;
  }

  /**
   * Mark the storage overflowed or failed for a reason found outside it (the device it keeps
   * changed where no point saw the change): as final, recorded and announced as its own
   * failures. Its points take no more originals, so device writes neither grow it nor wait
   * for it; its reads fail. Nothing when it is not 'ok' already.
   */
  fail(state: 'overflowed' | 'failed', reason: string): void {
    this.#fail(state, reason);
  }

  /** True while records can be stored: state 'ok' and not closed. */
  get usable(): boolean {
    return this.#state === 'ok' && this.#closing === undefined;
  }

  usage(): { usedBytes: number; limitBytes: number | null; dirs: string[] } {
    return { usedBytes: this.#usedBytes, limitBytes: this.#limitBytes, dirs: [...this.#dirs] };
  }

  /**
   * Raise (or lower, not below what is used) the limit, and/or add a directory: new records go
   * to a new file there while records already queued finish in the old one. Runs beside writes.
   * Errors: EINVAL (limit below usedBytes, not a directory), ENOENT (dir), ESESSION (the
   * storage has overflowed or failed: extending cannot bring back what was not preserved).
   */
  async extend(options: { limitBytes?: number; dir?: string }): Promise<void> {
    if (this.#closing) throw new BdsnapError('ESHUTDOWN', `difference storage ${this.id} is closed`);
    if (this.#state !== 'ok') throw new BdsnapError('ESESSION', `difference storage ${this.id} has ${this.#state} (${this.#failedReason ?? 'unknown reason'}); it cannot be extended`);
    const { limitBytes, dir } = options;
    if (limitBytes !== undefined) {
      checkLimit(limitBytes);
      if (limitBytes < this.#usedBytes) {
        throw new BdsnapError('EINVAL', `limit ${limitBytes} is below the ${this.#usedBytes} bytes already stored in difference storage ${this.id}`);
      }
    }
    if (dir !== undefined) {
      const [checked] = await checkDirs([dir]);
      const extending = this.#extending.then(() => this.#addDir(checked!));
      this.#extending = extending.catch(() => undefined);
      await extending;
    }
    if (limitBytes !== undefined) this.#limitBytes = limitBytes;
    this.#checkSpace(true);
  }

  /**
   * Switch appends to a new file in `dir`. The directory list names the new file before any
   * record goes there (else a restart would not find acknowledged records); the previous file
   * is sealed once the records still queued for it are written (until then a kill may leave a
   * torn tail in it, which open() accepts for unsealed files only).
   */
  async #addDir(dir: string): Promise<void> {
    const previous = this.#files[this.#files.length - 1]!;
    if (dir === previous.dir || this.#state !== 'ok') return;
    if (this.#files.length >= MAX_FILES) throw new BdsnapError('EINVAL', `difference storage ${this.id} already has ${MAX_FILES} files`);
    const file = await this.#openFile(dir, this.#files.length, false, 'wx+');
    const dirs = this.#dirs.includes(dir) ? this.#dirs : [...this.#dirs, dir];
    try {
      await this.#recordDirs([dirs[0]!, dir], previous.index, dirs, file.index + 1);
    } catch (err) {
      await closeFd(file.fd).catch(() => undefined);
      await removePath(file.path);
      throw toBdsnapError(err);
    }
    this.#dirs = dirs;
    this.#files.push(file);
    await previous.writer.drain();
    await this.#recordDirs([dirs[0]!, dir], file.index);
  }

  /** Whether a chunk of a device is stored (original or image). */
  holds(deviceKey: number, chunk: number): boolean {
    return this.#tables.get(deviceKey)?.has(chunk) ?? false;
  }

  /** Make every stored record durable. Errors: EIO with the reason when the storage failed. */
  async sync(): Promise<void> {
    this.#checkReadable();
    try {
      await Promise.all(this.#files.map((f) => f.writer.sync()));
    } catch {
      // The writer has marked the storage failed.
    }
    this.#checkReadable();
  }

  /** Wait for records in flight, make everything durable and close the files. Idempotent. */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      await Promise.all(this.#files.map((f) => f.writer.sync().catch(() => undefined)));
      await this.#closeFiles();
    })();
    return this.#closing;
  }

  /** Close and remove every file of the storage. */
  async destroy(): Promise<void> {
    await this.close();
    for (const f of this.#files) await removePath(f.path);
    for (const dir of this.#dirs) {
      await removePath(path.join(dir, stateFileName(this.id)));
      await removePath(path.join(dir, dirsFileName(this.id)));
    }
  }

  // ---- for SnapshotLayer and SnapshotImage ------------------------------------------------

  /**
   * Claim a device key for one image (a second claim is EBUSY until detach). Returns the chunks
   * the storage already holds for it (reopened after a restart).
   * @internal
   */
  attach(deviceKey: number): Float64Array {
    if (!Number.isInteger(deviceKey) || deviceKey < 0 || deviceKey > MAX_DEVICE_KEY) throw new BdsnapError('EINVAL', `bad device key ${deviceKey}`);
    if (this.#closing) throw new BdsnapError('ESHUTDOWN', `difference storage ${this.id} is closed`);
    if (this.#attached.has(deviceKey)) throw new BdsnapError('EBUSY', `device key ${deviceKey} of difference storage ${this.id} is already in use`);
    this.#attached.add(deviceKey);
    return this.#tables.get(deviceKey)?.sorted().chunks ?? new Float64Array(0);
  }

  /** @internal */
  detach(deviceKey: number): void {
    this.#attached.delete(deviceKey);
  }

  /**
   * Store chunks firstChunk.. of a device (payload = their bytes, whole chunks but for a short
   * last chunk of the device). Resolves true once stored, false if the storage cannot store
   * (overflowed, failed, closed): the caller goes on without it. Never rejects.
   * @internal
   */
  append(deviceKey: number, kind: DiffRecordKind, firstChunk: number, payload: Buffer): Promise<boolean> {
    if (!this.usable) return Promise.resolve(false);
    const recordBytes = RECORD_HEADER_BYTES + payload.length;
    if (this.#limitBytes !== null && this.#usedBytes + recordBytes > this.#limitBytes) {
      this.#fail('overflowed', overflowReason(kind, firstChunk * this.chunkSize, payload.length, this.#usedBytes, this.#limitBytes));
      return Promise.resolve(false);
    }
    this.#usedBytes += recordBytes;
    const chunkCount = Math.ceil(payload.length / this.chunkSize);
    const header = encodeRecordHeader(firstChunk, payload, { deviceKey, sequence: this.#nextSequence++, image: kind === 'image' });
    const file = this.#files[this.#files.length - 1]!;
    const stored = file.writer.appendRecord(header, payload);
    this.#checkSpace(false);
    return stored.then((position) => {
      if (position === undefined) return false;
      this.#index(deviceKey, kind, firstChunk, chunkCount, file.index * FILE_SPAN + position + RECORD_HEADER_BYTES);
      return true;
    });
  }

  /** Where a chunk's bytes are (see FILE_SPAN), or undefined. @internal */
  locate(deviceKey: number, chunk: number): number | undefined {
    return this.#tables.get(deviceKey)?.get(chunk);
  }

  /** Read `target.length` bytes at a location (+ offset) given by locate(). @internal */
  async readAt(location: number, target: Buffer): Promise<void> {
    this.#checkReadable();
    const file = this.#files[Math.floor(location / FILE_SPAN)];
    if (file === undefined || file.fd < 0) throw new BdsnapError('ESHUTDOWN', `difference storage ${this.id} is closed`);
    let n: number;
    try {
      n = target.length <= SYNC_READ_MAX_BYTES ? preadFullySync(file.fd, target, location % FILE_SPAN) : await preadFully(file.fd, target, location % FILE_SPAN);
    } catch (err) {
      throw new BdsnapError('EIO', `cannot read difference storage ${this.id}: ${(err as Error).message}`, { cause: err });
    }
    if (n !== target.length) throw new BdsnapError('EIO', `difference storage ${this.id} is shorter than its index says`);
  }

  /** Throws EIO (with the reason) unless the stored records can be read. @internal */
  checkReadable(): void {
    this.#checkReadable();
  }

  // ---- inside ---------------------------------------------------------------------------

  #checkReadable(): void {
    if (this.#state !== 'ok') {
      throw new BdsnapError('EIO', `snapshot storage ${this.id} has ${this.#state}: ${this.#failedReason ?? 'unknown reason'}`);
    }
    if (this.#closing) throw new BdsnapError('ESHUTDOWN', `difference storage ${this.id} is closed`);
  }

  #index(deviceKey: number, kind: DiffRecordKind, firstChunk: number, chunkCount: number, location: number): void {
    let table = this.#tables.get(deviceKey);
    if (!table) {
      table = new ChunkTable();
      this.#tables.set(deviceKey, table);
    }
    for (let i = 0; i < chunkCount; i++) {
      // An original never replaces what is there (the first original, or a newer image).
      if (kind === 'image') table.set(firstChunk + i, location + i * this.chunkSize);
      else table.setIfAbsent(firstChunk + i, location + i * this.chunkSize);
    }
  }

  async #openFile(dir: string, index: number, legacy: boolean, flags: 'wx+' | 'r+'): Promise<DiffFile> {
    const filePath = path.join(dir, diffFileName(this.id, index, legacy));
    const { O_RDWR, O_CREAT, O_EXCL, O_NOFOLLOW } = fs.constants;
    let fd: number;
    try {
      fd = await openFd(filePath, O_RDWR | O_NOFOLLOW | (flags === 'wx+' ? O_CREAT | O_EXCL : 0), 0o600);
    } catch (err) {
      const e = toBdsnapError(err);
      if ((err as NodeJS.ErrnoException).code === 'ELOOP') throw new BdsnapError('EPERM', `${filePath} is a symbolic link, not a difference storage file`, { cause: err });
      throw new BdsnapError(e.code === 'ENOENT' ? 'ENOENT' : e.code, `cannot open ${filePath}: ${e.message}`, { cause: err });
    }
    try {
      checkOwnFile(filePath, fs.fstatSync(fd));
    } catch (err) {
      await closeFd(fd);
      throw err;
    }
    return { index, legacy, dir, path: filePath, fd, writer: this.#writer(fd, dir, 0) };
  }

  /** Verify the records of one file, index them, and cut a torn tail (unless the file is sealed). */
  async #scan(file: DiffFile, mayBeTorn: boolean): Promise<void> {
    const scan = file.legacy ? await scanRecords(file.fd, this.#legacyScanner(file)) : await scanRecords(file.fd, this.#scanner(file));
    if (scan.tornReason !== undefined) {
      // A sealed file had nothing in flight when the process died: a bad record there is
      // damage, not a torn tail.
      if (!mayBeTorn) throw new BdsnapError('ECORRUPT', `${file.path} is corrupt: ${scan.tornReason} at byte ${scan.validBytes}`);
      await ftruncateFd(file.fd, scan.validBytes);
    }
    this.#usedBytes += scan.validBytes;
    file.writer = this.#writer(file.fd, file.dir, scan.validBytes);
  }

  /** A record of a file is indexed as its device's run of chunks at its place in the storage's order. */
  #take(file: DiffFile, r: DiffRecordHeader, position: number): void {
    this.#index(r.deviceKey, r.kind, r.firstChunk, r.chunkCount, file.index * FILE_SPAN + position + RECORD_HEADER_BYTES);
    if (r.sequence >= this.#nextSequence) this.#nextSequence = r.sequence + 1;
  }

  #scanner(file: DiffFile): RecordScanner<RecordHeader> {
    return {
      headerBytes: RECORD_HEADER_BYTES,
      decode: (header) => {
        const h = decodeRecordHeader(header);
        return typeof h === 'string' || h.kind === 'copied' || h.kind === 'image' ? h : `${h.kind} record in a difference storage`;
      },
      accept: (h, _header, payload, position) => {
        if (!payloadMatches(h, payload)) return 'record checksum mismatch';
        const { deviceKey, firstChunk, sequence, payloadBytes } = h;
        this.#take(file, { kind: h.kind === 'image' ? 'image' : 'original', deviceKey, firstChunk, chunkCount: Math.ceil(payloadBytes / this.chunkSize), sequence, payloadBytes }, position);
        return undefined;
      },
    };
  }

  /** Files of the older record layout: one CRC over header and payload. */
  #legacyScanner(file: DiffFile): RecordScanner<DiffRecordHeader & { payloadOffset: number }> {
    return {
      headerBytes: RECORD_HEADER_BYTES,
      decode: (header) => {
        const h = decodeDiffRecordHeader(header, this.chunkSize);
        return typeof h === 'string' ? h : { ...h, payloadOffset: RECORD_HEADER_BYTES };
      },
      accept: (r, header, payload, position) => {
        if (!diffRecordMatches(header, payload)) return 'record checksum mismatch';
        this.#take(file, r, position);
        return undefined;
      },
    };
  }

  #writer(fd: number, dir: string, startBytes: number): StoreWriter {
    return new StoreWriter(fd, startBytes, { strict: this.durability === 'strict', onFailure: (reason, err) => this.#writeFailed(reason, dir, err) });
  }

  /** Write the directory list, atomically, into each of `into`. */
  async #recordDirs(into: string[], sealedFiles: number, dirs = this.#dirs, files = this.#files.length): Promise<void> {
    const text = `${JSON.stringify({ dirs, files, sealedFiles })}\n`;
    for (const dir of new Set(into)) await writeFileAtomic(path.join(dir, dirsFileName(this.id)), text);
  }

  #writeFailed(reason: string, dir: string, err: unknown): void {
    const code = (err as NodeJS.ErrnoException | undefined)?.code;
    if (code === 'ENOSPC' || code === 'EDQUOT') this.#fail('overflowed', `the disk of ${dir} is full`);
    else this.#fail('failed', `${reason} (${dir})`);
  }

  #fail(state: 'overflowed' | 'failed', reason: string): void {
    if (this.#state !== 'ok') return;
    this.#state = state;
    this.#failedReason = reason;
    this.#writeStateFile();
    this.#emit({ type: state, reason });
  }

  /**
   * Synchronous on purpose: the device write that could not be preserved is only issued after
   * this returns, so a kill cannot leave that write on the device and the storage looking fine.
   */
  #writeStateFile(): void {
    // Replaced, never opened by name: a link planted under the name is not written through.
    const file = path.join(this.#dirs[0]!, stateFileName(this.id));
    try {
      writeFileAtomicSync(file, `${JSON.stringify({ state: this.#state, reason: this.#failedReason })}\n`);
    } catch {
      // A full disk may refuse the text; an empty state file, which needs no data block,
      // still says "failed". Without one, the daemon's own record must.
      try {
        writeFileAtomicSync(file, '');
      } catch {
        // Nothing more to try here.
      }
    }
  }

  #readStateFile(): void {
    for (const dir of this.#dirs) {
      let text: string;
      try {
        text = readNoFollowSync(path.join(dir, stateFileName(this.id)));
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') continue;
        // A state file that cannot be trusted does not make the storage good again.
        this.#state = 'failed';
        this.#failedReason = `its state file in ${dir} cannot be read: ${(err as Error).message}`;
        return;
      }
      let state: DiffStorageState = 'failed';
      let reason = 'the storage failed before a restart (reason not recorded)';
      try {
        const parsed = JSON.parse(text) as { state?: unknown; reason?: unknown };
        if (parsed.state === 'overflowed') state = 'overflowed';
        if (typeof parsed.reason === 'string') reason = parsed.reason;
      } catch {
        // Empty or torn: 'failed' with the default reason.
      }
      this.#state = state;
      this.#failedReason = reason;
      return;
    }
  }

  async #closeFiles(): Promise<void> {
    for (const f of this.#files) {
      const fd = f.fd;
      f.fd = -1;
      if (fd >= 0) await closeFd(fd).catch(() => undefined);
    }
  }

  /** `force`: check the filesystem now (after create, open, extend), else at most once a second. */
  #checkSpace(force: boolean): void {
    const limit = this.#limitBytes;
    const lowOnLimit = limit !== null && this.#usedBytes >= this.#limitFraction * limit;
    if (!lowOnLimit) this.#lowOnLimit = false;
    const now = performance.now();
    const limitCrossed = lowOnLimit && !this.#lowOnLimit;
    if (this.#fsChecking || (!force && !limitCrossed && now - this.#fsCheckedAtMs < FS_CHECK_INTERVAL_MS)) return;
    this.#fsChecking = true;
    this.#fsCheckedAtMs = now;
    const dir = this.#files[this.#files.length - 1]!.dir;
    fs.promises.statfs(dir).then((st) => {
      const freeBytes = st.bavail * st.bsize;
      const lowOnDisk = freeBytes < this.#fsFreeBytes || freeBytes < this.#fsFreeFraction * st.blocks * st.bsize;
      const stillLowOnLimit = this.#limitBytes !== null && this.#usedBytes >= this.#limitFraction * this.#limitBytes;
      const fire = (stillLowOnLimit && !this.#lowOnLimit) || (lowOnDisk && !this.#lowOnDisk);
      this.#lowOnLimit = stillLowOnLimit;
      this.#lowOnDisk = lowOnDisk;
      if (fire && this.#state === 'ok') this.#emit({ type: 'low-space', usedBytes: this.#usedBytes, limitBytes: this.#limitBytes, freeBytes, dir });
    }, () => undefined).finally(() => {
      this.#fsChecking = false;
      // A crossing of the limit while statfs ran is picked up now rather than a second later.
      if (this.#limitBytes !== null && this.#usedBytes >= this.#limitFraction * this.#limitBytes && !this.#lowOnLimit) this.#checkSpace(true);
    });
  }

  #emit(event: DiffStorageEvent): void {
    const onEvent = this.#onEvent;
    if (!onEvent) return;
    setImmediate(() => {
      try {
        onEvent(event);
      } catch {
        // A listener's bug must not break the data path.
      }
    });
  }
}

/**
 * Why a record did not fit under the limit, in the device's terms: one large first write can
 * overflow a storage far from full, so a bare "limit reached" at 58% used would look wrong.
 */
function overflowReason(kind: DiffRecordKind, offsetBytes: number, lengthBytes: number, usedBytes: number, limitBytes: number): string {
  const what = kind === 'original' ? 'the originals of' : 'an image write of';
  const share = Math.floor((usedBytes / limitBytes) * 100);
  return `the difference storage reached its limit: ${what} ${formatBytes(lengthBytes)} at offset ${formatBytes(offsetBytes)} ` +
    `did not fit (${formatBytes(usedBytes)} of ${formatBytes(limitBytes)} used, ${share}%)`;
}

function checkLimit(limitBytes: number): void {
  if (!Number.isSafeInteger(limitBytes) || limitBytes < 0) throw new BdsnapError('EINVAL', `limitBytes must be a non-negative integer, got ${limitBytes}`);
}

async function checkOptions(options: DiffStorageOptions): Promise<string[]> {
  if (typeof options.id !== 'string' || !ID_PATTERN.test(options.id)) {
    throw new BdsnapError('EINVAL', `bad snapshot id ${JSON.stringify(options.id)}: letters, digits, '.', '_' and '-' only`);
  }
  checkChunkSize(options.chunkSize);
  if (options.limitBytes !== undefined) checkLimit(options.limitBytes);
  if (options.durability !== undefined && options.durability !== 'process' && options.durability !== 'strict') {
    throw new BdsnapError('EINVAL', `durability must be 'process' or 'strict', got ${String(options.durability)}`);
  }
  if (!Array.isArray(options.dirs) || options.dirs.length === 0) throw new BdsnapError('EINVAL', 'at least one storage directory is needed');
  return checkDirs(options.dirs);
}

/**
 * Absolute paths of existing private directories of this user. Another user who could write
 * one could replace a diff file (and so the image a backup reads) or plant a link where the
 * state file goes. Errors: ENOENT, EINVAL (not a directory), EPERM (someone else's, or open).
 */
async function checkDirs(dirs: string[]): Promise<string[]> {
  const out: string[] = [];
  for (const dir of dirs) {
    const abs = path.resolve(dir);
    try {
      await checkPrivateDir(abs);
    } catch (err) {
      const e = toBdsnapError(err);
      if (e.code === 'ENOENT') throw new BdsnapError('ENOENT', `storage directory ${abs} does not exist`, { cause: err });
      if (e.code === 'EINVAL') throw new BdsnapError('EINVAL', `storage directory ${abs} is not a directory (ENOTDIR)`, { cause: err });
      throw new BdsnapError(e.code, `storage directory ${e.message}`, { cause: err });
    }
    out.push(abs);
  }
  return out;
}

/** A file of the storage must be a regular file of this user with one name. Errors: EPERM. */
function checkOwnFile(filePath: string, st: fs.Stats): void {
  const euid = process.geteuid?.() ?? st.uid;
  if (!st.isFile() || st.uid !== euid || st.nlink !== 1) {
    throw new BdsnapError('EPERM', `${filePath} is not a difference storage file of this user (a regular file with one name, owned by uid ${euid}); the storage is not used`);
  }
}

/** The text of a small file, refusing a symbolic link or a file not ours (see checkOwnFile). */
function readNoFollowSync(filePath: string): string {
  const fd = fs.openSync(filePath, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK);
  try {
    checkOwnFile(filePath, fs.fstatSync(fd));
    return fs.readFileSync(fd, 'utf8');
  } finally {
    fs.closeSync(fd);
  }
}

interface DirsFile {
  /** Recorded directories first, in their order, then the others given. */
  dirs: string[];
  /** Files the storage has at least. */
  files: number;
  /** Files 0..sealedFiles-1 had nothing in flight any more: no torn tail is possible there. */
  sealedFiles: number;
}

/** What the `<id>.dirs` files found in any of `dirs` say (the newest knowledge of each field). */
async function readDirsFile(dirs: string[], id: string): Promise<DirsFile> {
  const out: DirsFile = { dirs: [], files: 0, sealedFiles: 0 };
  for (const dir of dirs) {
    const file = path.join(dir, dirsFileName(id));
    let text: string;
    try {
      text = readNoFollowSync(file);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') continue;
      throw new BdsnapError('ECORRUPT', `${file} cannot be read: ${(err as Error).message}`, { cause: err });
    }
    let parsed: Partial<Record<keyof DirsFile, unknown>>;
    try {
      parsed = JSON.parse(text) as typeof parsed;
    } catch (err) {
      throw new BdsnapError('ECORRUPT', `${file} is not valid JSON`, { cause: err });
    }
    const { dirs: recorded, files, sealedFiles } = parsed;
    if (!Array.isArray(recorded) || !recorded.every((d) => typeof d === 'string') || !Number.isSafeInteger(files) || !Number.isSafeInteger(sealedFiles)) {
      throw new BdsnapError('ECORRUPT', `${file} does not describe a difference storage`);
    }
    for (const d of recorded as string[]) if (!out.dirs.includes(d)) out.dirs.push(d);
    out.files = Math.max(out.files, files as number);
    out.sealedFiles = Math.max(out.sealedFiles, sealedFiles as number);
  }
  for (const dir of dirs) if (!out.dirs.includes(dir)) out.dirs.push(dir);
  return out;
}

/** The files `<id>.<n>.rec` and `<id>.<n>.diff` (legacy) in `dir`. */
async function listDiffFiles(dir: string, id: string): Promise<Array<{ index: number; legacy: boolean }>> {
  const prefix = `${id}.`;
  const out: Array<{ index: number; legacy: boolean }> = [];
  for (const name of await fs.promises.readdir(dir)) {
    if (!name.startsWith(prefix)) continue;
    const m = /^(0|[1-9][0-9]{0,8})\.(rec|diff)$/.exec(name.slice(prefix.length));
    if (m) out.push({ index: Number(m[1]), legacy: m[2] === LEGACY_SUFFIX });
  }
  return out;
}
