/**
 * Where a restore writes, and how a failed restore is undone, so that the target ends with the
 * backup's content or as it was before:
 *
 * - A new file (`--output` naming nothing yet): written under a temporary name beside it
 *   (`.NAME.bdsnap-restore-XXXXXXXX`), created exclusively and without following a symbolic
 *   link (root must not write through a link another user planted), mode 0600, sparse, so zero
 *   pieces are holes. `commit` makes it durable and only then gives it its name (a hard link,
 *   which fails rather than replace a file that appeared meanwhile), so the name never shows a
 *   partly written restore, not even after a crash. A failed restore removes the temporary
 *   file, if its path still names the file made here. Nothing being at stake until then, its
 *   pieces need no check before the first write (see restore.ts).
 * - An existing regular file or block device (the device itself, or `--output` naming a
 *   file): opened at once, which takes FileDevice's lock (so a daemon serving it gives EBUSY)
 *   but changes nothing. Each range is read before it is written: one that already holds the
 *   backup's bytes is left alone, any other has its original kept in an UndoLog first. A failed
 *   restore writes the originals back and gives a file its original size again. A restore
 *   killed half way cannot do that: before its first write it leaves a journal where the next
 *   run finds it from the target's identity (device/interrupted-restore.ts), so that the daemon
 *   refuses the target and the next restore into it, of any backup, finishes it: every range
 *   of the target is given the backup's content, so what the killed one left no longer matters.
 *   The journal goes once a restore into the target ended whole (or a failed one put back a
 *   target that was whole before it).
 */

import fs from 'node:fs';
import { FileDevice } from '../device/file-device.js';
import { isAllZero } from '../bytes.js';
import { BdsnapError, toBdsnapError, type ErrorCode } from '../errors.js';
import { checkNoOtherWriters, checkNotInUse } from '../host/in-use.js';
import { followedSafely } from '../host/private-dir.js';
import { BackupRestoreRecord, type BackupRestoreJournal } from '../device/interrupted-restore.js';
import type { PiecePool } from '../repository/piece-pool.js';
import type { PieceRange } from '../repository/piece-worker.js';
import { UndoLog } from './undo-log.js';
import { checkOutputFile, openStagedOutputFile, stagedLeftovers, symlinkRefused, type StagedOutputFile } from '../host/output-file.js';

/** Largest range of a file's cut tail read at once to keep it. */
const TAIL_CHUNK_BYTES = 16 * 1024 * 1024;

/** A piece kept in a local file (all of it, or `range` of it), and the range of the target it fills. */
export interface PieceFile {
  file: string;
  range: PieceRange;
  hash: string;
  offsetBytes: number;
  lengthBytes: number;
  /** Later slots use the piece too: the worker keeps it decoded. */
  keep: boolean;
}

export interface RestoreTarget {
  readonly path: string;
  /** Zero ranges already read as zeroes (a new sparse file): nothing need be written for them. */
  readonly holes: boolean;
  /**
   * A failure may leave the target changed until `abandon` puts it back (a file or device
   * restored in place): every piece is read and checked before the first write, so that the
   * common failure, a damaged repository, is a refusal rather than a rollback. A new file is
   * not seen under its name before `commit`, so its pieces are checked as they are written.
   */
  readonly checkFirst: boolean;
  /** Prepare to write (create the file, or set up the undo log); nothing is written before. A failure here is undone by `abandon` too. */
  begin(): Promise<void>;
  /**
   * Have a worker of `pool` read, check and write a piece kept as a local file into its range
   * (see PiecePool.place), keeping the original first where `put` would.
   */
  place(pool: PiecePool, piece: PieceFile): Promise<void>;
  /** Give the range at `offsetBytes` the content `data`, or `zeroBytes` zeroes. */
  put(offsetBytes: number, data: Buffer | { zeroBytes: number }): Promise<void>;
  /** See BlockDevice.startWriteback. */
  startWriteback(offsetBytes: number, lengthBytes: number): void;
  /** Every range is put: give the target the backup's size and make it durable. */
  commit(): Promise<void>;
  /**
   * Files an earlier restore into the same new file left when it was killed (their temporary
   * names, whole paths): never removed here, since another restore may still be writing one.
   */
  leftovers(): Promise<string[]>;
  /** After a failure: undo what was written; returns what was done, as a clause for the error. */
  abandon(): Promise<string>;
  /** After `begin`: the journal of an earlier restore into the target, killed half way, that this one finishes. */
  readonly interrupted: BackupRestoreJournal | undefined;
  /**
   * After `commit`: the size an existing target had where it differed from the backup's, and
   * what became of the difference: a file is cut or grown to the backup's size, a larger block
   * device keeps its range past the backup's end as it was.
   */
  readonly sizeBefore: SizeBefore | undefined;
  close(): Promise<void>;
}

export interface SizeBefore {
  bytes: number;
  tail: 'cut' | 'grown' | 'kept';
}

/** What a restore in place writes in its journal: the backup, and the command that restores it again. */
export interface RestoreJob {
  backup: string;
  command: string;
}

/**
 * The target of a restore of `sizeBytes`: `target` is the device (which must exist: a
 * regular file or a block device) or, with `output`, a file (which may not exist yet). One
 * that exists must not be in use: not mounted, not behind a loop device, not open in another
 * bdsnap process. `given` is the target as the user typed it (relative, or through a linked
 * directory): a refusal names it, and where it leads when that is elsewhere.
 */
export async function openRestoreTarget(target: string, output: boolean, sizeBytes: number, job: RestoreJob, given = target): Promise<RestoreTarget> {
  // The device as the operator named it, links resolved once (FileDevice opens only a real
  // path), but not through a link another user could point at any file or device.
  const named = target;
  if (!output) {
    const real = await fs.promises.realpath(target).catch(() => undefined);
    if (real !== undefined) target = await followedSafely(target, real);
  }
  try {
    const st = await (output ? fs.promises.lstat(target) : fs.promises.stat(target)).catch((err: unknown) => {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw toBdsnapError(err);
    });
    if (!st && !output) throw new BdsnapError('ENOENT', `${target} does not exist; give --output FILE to restore into a new file`);
    if (!st) return new NewFileTarget(target, sizeBytes);
    if (st.isSymbolicLink()) throw symlinkRefused(target, { given });
    if (!st.isFile() && !(st.isBlockDevice() && !output)) {
      throw new BdsnapError('EINVAL', `${target} is not a regular file${output ? '' : ' or a block device'}; refusing to write to it`);
    }
    await checkNotInUse(target, {}, { writers: false });
    return await InPlaceTarget.open(target, st.isBlockDevice(), sizeBytes, output, job);
  } catch (err) {
    if (target === named) throw err;
    // Refused under the name links led to: said with the name the user gave.
    const e = toBdsnapError(err);
    throw new BdsnapError(e.code, `${given} leads to ${target} through a symbolic link, and ${e.message}`, { cause: err });
  }
}

/** FileDevice.open, with EBUSY saying who may hold the device. */
async function openFree(target: string, options?: { shared: boolean }): Promise<FileDevice> {
  try {
    return await FileDevice.open(target, options);
  } catch (err) {
    const e = toBdsnapError(err);
    if (e.code !== 'EBUSY') throw e;
    throw new BdsnapError('EBUSY', `${target} is in use, so it is not restored in place: ${e.message}`, { cause: err });
  }
}

function sameFile(file: FileDevice, st: fs.Stats): boolean {
  return file.identity.dev === st.dev && file.identity.ino === st.ino;
}

class NewFileTarget implements RestoreTarget {
  readonly path: string;
  readonly holes = true;
  readonly checkFirst = false;
  readonly interrupted = undefined;
  readonly sizeBefore = undefined;
  readonly #sizeBytes: number;
  /** The file, under its temporary name until `commit` names it. */
  #out: StagedOutputFile | undefined;
  #file: FileDevice | undefined;

  constructor(target: string, sizeBytes: number) {
    this.path = target;
    this.#sizeBytes = sizeBytes;
  }

  leftovers(): Promise<string[]> {
    return stagedLeftovers(this.path, this.#out?.tempPath);
  }

  async begin(): Promise<void> {
    this.#out = await openStagedOutputFile(this.path);
    fs.ftruncateSync(this.#out.fd, this.#sizeBytes);
    // Through /proc/self/fd: the file just made, whatever happens to its name (the lock goes with it).
    this.#file = await FileDevice.open(this.#out.procPath, { followSymlinks: true });
  }

  async place(pool: PiecePool, piece: PieceFile): Promise<void> {
    const r = await pool.place({ ...piece, fd: this.#out!.fd });
    if (r.failure) throw new BdsnapError(r.failure.code as ErrorCode, r.failure.message);
  }

  async put(offsetBytes: number, data: Buffer | { zeroBytes: number }): Promise<void> {
    if (Buffer.isBuffer(data)) await this.#file!.write(data, offsetBytes);
    else await this.#file!.zero(offsetBytes, data.zeroBytes);
  }

  startWriteback(offsetBytes: number, lengthBytes: number): void {
    this.#file!.startWriteback(offsetBytes, lengthBytes);
  }

  async commit(): Promise<void> {
    // publish's fdatasync covers the file whichever descriptor wrote it (the workers write through its fd).
    await this.#out!.publish();
  }

  async abandon(): Promise<string> {
    if (!this.#out) return 'nothing was written';
    await this.#file?.close();
    this.#file = undefined;
    return this.#out.discard();
  }

  async close(): Promise<void> {
    const [out, file] = [this.#out, this.#file];
    this.#file = undefined;
    try {
      await file?.close();
    } finally {
      await out?.close();
    }
  }
}

class InPlaceTarget implements RestoreTarget {
  readonly path: string;
  readonly holes = false;
  readonly checkFirst = true;
  readonly #block: boolean;
  readonly #sizeBytes: number;
  /** Holds the lock from open to close. */
  readonly #guard: FileDevice;
  /** Size before the restore: what a rollback gives a file back. */
  readonly #originalBytes: number;
  /** What ranges are read and written through: the guard, or a second handle once a file grew. */
  #file: FileDevice;
  /** A descriptor of the same file or device, for setting a file's size and for the piece workers. */
  #fh: fs.promises.FileHandle | undefined;
  #resized = false;
  #undo: UndoLog | undefined;
  #keepUndo = false;
  /** The journal and the undo log's directory, from `begin` on. */
  #record: BackupRestoreRecord | undefined;
  /** The target holds the backup or what it held before a restore began into it: the journal goes at close. */
  #whole = false;
  /** An existing file given as --output, not the device itself. */
  readonly #output: boolean;
  readonly #job: RestoreJob;

  private constructor(target: string, block: boolean, sizeBytes: number, guard: FileDevice, output: boolean, job: RestoreJob) {
    this.path = target;
    this.#job = job;
    this.#output = output;
    this.#block = block;
    this.#sizeBytes = sizeBytes;
    this.#guard = guard;
    this.#file = guard;
    this.#originalBytes = guard.size;
  }

  static async open(target: string, block: boolean, sizeBytes: number, output: boolean, job: RestoreJob): Promise<InPlaceTarget> {
    const guard = await openFree(target);
    // Under the device's lock now: a bdsnap holding the device was refused by it, naming what frees it.
    await checkNoOtherWriters(target).catch(async (err: unknown) => {
      await guard.close();
      throw err;
    });
    if (block && guard.size < sizeBytes) {
      await guard.close();
      throw new BdsnapError('ENOSPC', `${target} holds ${guard.size} bytes; the backup needs ${sizeBytes}`);
    }
    return new InPlaceTarget(target, block, sizeBytes, guard, output, job);
  }

  get interrupted(): BackupRestoreJournal | undefined {
    return this.#record?.interrupted;
  }

  get sizeBefore(): SizeBefore | undefined {
    if (!this.#whole || this.#originalBytes === this.#sizeBytes) return undefined;
    return { bytes: this.#originalBytes, tail: this.#block ? 'kept' : this.#originalBytes > this.#sizeBytes ? 'cut' : 'grown' };
  }

  async begin(): Promise<void> {
    // Opened by path like the guard: being the file the guard locked is what makes it safe.
    this.#fh = await fs.promises.open(this.path, 'r+').catch((err: unknown) => { throw toBdsnapError(err); });
    const st = await this.#fh.stat();
    if (!sameFile(this.#guard, st)) throw new BdsnapError('EBUSY', `${this.path} was replaced since it was opened; refusing to write to it`);
    // An existing --output file is overwritten only if it is this user's own, with one name.
    if (this.#output) checkOutputFile(st, this.path);
    // The journal is durable before the target's first change (a file grown below included).
    this.#record = await BackupRestoreRecord.begin(this.#guard.identity, { ...this.#job, target: this.path });
    this.#undo = await UndoLog.create(this.#record.dir);
    if (!this.#block && this.#originalBytes < this.#sizeBytes) {
      await this.#fh.truncate(this.#sizeBytes);
      this.#resized = true;
      // The guard's size was fixed at open; a second handle (the guard keeps the lock) sees the new one.
      this.#file = await FileDevice.open(this.path, { shared: true });
      if (!sameFile(this.#file, await this.#fh.stat())) throw new BdsnapError('EBUSY', `${this.path} was replaced since it was opened; refusing to write to it`);
    }
  }

  async place(pool: PiecePool, piece: PieceFile): Promise<void> {
    const keepBytes = this.#keepBytes(piece.offsetBytes, piece.lengthBytes);
    const r = await pool.place({ ...piece, fd: this.#fh!.fd, undo: { fd: this.#undo!.fd, keepBytes } });
    if (r.savedBytes > 0) this.#undo!.record(piece.offsetBytes, r.savedBytes);
    if (r.failure?.stage === 'undo') throw this.#undo!.keepFailed(piece.offsetBytes, new BdsnapError(r.failure.code as ErrorCode, r.failure.message));
    if (r.failure) throw new BdsnapError(r.failure.code as ErrorCode, r.failure.message);
  }

  /** Bytes past the original end are cut off again by a rollback: nothing to keep there. */
  #keepBytes(offsetBytes: number, lengthBytes: number): number {
    return Math.max(0, Math.min(lengthBytes, this.#originalBytes - offsetBytes));
  }

  async put(offsetBytes: number, data: Buffer | { zeroBytes: number }): Promise<void> {
    const lengthBytes = Buffer.isBuffer(data) ? data.length : data.zeroBytes;
    const original = Buffer.allocUnsafe(lengthBytes);
    await this.#file.read(original, offsetBytes);
    if (Buffer.isBuffer(data) ? original.equals(data) : isAllZero(original)) return;
    const kept = this.#keepBytes(offsetBytes, lengthBytes);
    if (kept > 0) await this.#undo!.save(offsetBytes, original.subarray(0, kept));
    if (Buffer.isBuffer(data)) await this.#file.write(data, offsetBytes);
    else await this.#file.zero(offsetBytes, lengthBytes);
  }

  startWriteback(offsetBytes: number, lengthBytes: number): void {
    this.#file.startWriteback(offsetBytes, lengthBytes);
  }

  leftovers(): Promise<string[]> {
    return Promise.resolve([]);
  }

  async commit(): Promise<void> {
    if (!this.#block && this.#originalBytes > this.#sizeBytes) {
      const buf = Buffer.allocUnsafe(Math.min(TAIL_CHUNK_BYTES, this.#originalBytes - this.#sizeBytes));
      for (let at = this.#sizeBytes; at < this.#originalBytes; at += buf.length) {
        const part = buf.subarray(0, Math.min(buf.length, this.#originalBytes - at));
        await this.#file.read(part, at);
        await this.#undo!.save(at, part);
      }
      this.#resized = true;
      await this.#fh!.truncate(this.#sizeBytes);
    }
    await this.#file.flush();
    this.#whole = true;
  }

  async abandon(): Promise<string> {
    const undo = this.#undo;
    // Put back as it was, which is half way if a killed restore left it so: then it stays flagged.
    const earlier = this.#record?.interrupted;
    const still = earlier
      ? `; it is still half way through the restore of backup ${earlier.backup} killed since ${earlier.startedAt}: run ${this.#job.command} again to finish it`
      : '';
    this.#whole = earlier === undefined;
    if (!undo || (undo.savedBytes === 0 && !this.#resized)) return `nothing was written to ${this.path}${still}`;
    try {
      if (this.#resized) await this.#fh!.truncate(this.#originalBytes);
      await undo.rollback(this.#file, this.#originalBytes);
    } catch (err) {
      this.#keepUndo = true;
      this.#whole = false;
      return `putting ${this.path} back failed too (${toBdsnapError(err).message}); the original bytes of what was overwritten are in ${undo.path}, each at its own offset, until the next restore into ${this.path} (which finishes this one) replaces them`;
    }
    return `${this.path} was put back as it was (${undo.savedBytes} bytes rewritten)${still}`;
  }

  async close(): Promise<void> {
    try {
      if (this.#keepUndo) await this.#undo?.close();
      else await this.#undo?.discard();
      if (this.#whole) await this.#record?.end();
      await this.#fh?.close();
      if (this.#file !== this.#guard) await this.#file.close();
    } finally {
      await this.#guard.close();
    }
  }
}
