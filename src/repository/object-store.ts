/**
 * The storage under a backup repository: named, immutable objects, with the operations an
 * S3-compatible store offers (put, get whole or a byte range, list by prefix, stat, delete)
 * and nothing more: no rename, no append, no lock. Repository logic uses only this interface,
 * so a local directory and an object store are two backends of one design.
 *
 * Names are slash-separated segments of [A-Za-z0-9._-], each starting with a letter or digit,
 * so a name is safe as a file path (no '..', no hidden files, no absolute paths) and as an
 * object key.
 *
 * LocalDirStore: an object is a file at `<root>/<name>`. The directory may be writable by
 * someone who is not trusted (it is refused to root unless only root can change it), so it is
 * reached through a ConfinedTree: no symbolic link below the root is ever followed, files are
 * created O_EXCL with mode 0600 and directories 0700, and a file is read only if it is a regular
 * file no larger than the reader allows (fstat before reading). `put` writes a temp file in the
 * target's directory (a name starting with '.', which `list` never shows), fsyncs it, renames
 * it into place and fsyncs the directory, so a crash leaves either no object or the whole one.
 * `stage` writes the temp file only; staged files are then published in batches, in the
 * background as they accumulate and the rest at `commit`: a batch's files are synced together,
 * renamed, and their directories synced together. A file is renamed only once its data is durable,
 * so a name in the store always holds the whole object, whenever the machine stops; and the
 * syncs of many objects share the disk's cache flushes instead of paying two each (measured:
 * about 1.5 ms per piece here).
 */

import { constants } from 'node:buffer';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { ByteRange } from '../bytes.js';
import { BdsnapError, toBdsnapError } from '../errors.js';
import { ConfinedTree } from '../host/confined-tree.js';
import { closeFd, fdatasyncFd, fsyncFd, openFd, preadFully, renamePath, unlinkPath, writevFully } from '../host/fd-io.js';
import { runLimited } from '../run-limited.js';

export interface ObjectInfo {
  name: string;
  sizeBytes: number;
  /** When the object was written (ms since the epoch), as the store reports it. */
  modifiedMs: number;
}

export interface ObjectStore {
  /** A description for messages (a directory path, a bucket URL). */
  readonly location: string;
  /**
   * Store `data` (the buffers one after the other) under `name`, atomically: readers see no
   * object or all of it. Replaces an existing one.
   */
  put(name: string, data: Buffer | readonly Buffer[]): Promise<void>;
  /**
   * The whole object (ECORRUPT if larger than `maxBytes`, checked before reading; default
   * MAX_OBJECT_BYTES), or `lengthBytes` from `offsetBytes`. ENOENT if absent.
   */
  get(name: string, options?: GetOptions): Promise<Buffer>;
  /** Undefined if absent. */
  stat(name: string): Promise<ObjectInfo | undefined>;
  /** Every object whose name starts with `prefix`, in no particular order. */
  list(prefix: string): Promise<ObjectInfo[]>;
  /** The names list() would give, where a backend can find them cheaper (no stat per file). */
  names(prefix: string): Promise<string[]>;
  /**
   * Write an object that readers see, whole and durable, at the latest when the next `commit()`
   * returns (a backend may make it visible at once). For bulk writes, such as packs.
   */
  stage(name: string, data: Buffer | readonly Buffer[]): Promise<void>;
  /** Make every staged object visible and durable. */
  commit(): Promise<void>;
  /** Drop the staged objects not yet committed (after a failure); best effort. */
  discard(): Promise<void>;
  /** Remove an object; absent is not an error. */
  delete(name: string): Promise<void>;
  /**
   * Where the backend keeps an object as a plain local file that may be read directly (by a
   * worker thread, say); absent where objects are not files (an object store).
   */
  localPath?(name: string): string;
  /**
   * Remove what interrupted puts left behind (temp files here, incomplete multipart uploads
   * on S3) older than `olderThanMs`. Only safe when no writer is running; prune calls it under
   * its exclusive lock. Returns how many were removed.
   */
  removeIncomplete(olderThanMs: number): Promise<number>;
  /** Release what the store holds (open directories); it is unusable afterwards. */
  close?(): void;
}

/** A byte range of an object, or a bound on the size of the whole object. */
export type GetOptions = ByteRange | { maxBytes: number };

/**
 * The largest object a whole-object get reads by default: a manifest, the largest object of
 * the format, must parse as one string.
 */
export const MAX_OBJECT_BYTES = constants.MAX_STRING_LENGTH;

const SEGMENT = /^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$/;
const TEMP_PREFIX = '.put-';

/** Throw EINVAL unless `name` is a safe object name (see the file header). */
export function checkObjectName(name: string): void {
  const segments = name.split('/');
  if (name.length > 1000 || segments.some((s) => !SEGMENT.test(s))) {
    throw new BdsnapError('EINVAL', `bad object name "${name}": segments of letters, digits, '.', '_' and '-' are allowed`);
  }
}


/**
 * Staged objects are published in the background in batches of this many, or of this many
 * bytes, so that their syncs (mostly waiting for the disk) overlap the writes that follow, and
 * a commit finds at most one batch left. Objects spread over 256 directories, and a batch syncs
 * each directory it touched once: larger batches share more of those syncs. 32 MiB is what 128
 * pieces of 256 KiB made when each piece was an object; packs of 16 MiB go two at a time.
 */
const STAGE_BATCH = 128;
const STAGE_BATCH_BYTES = 32 * 1024 * 1024;
/** Background publishes at once at most; a stage waits for one to finish beyond that. */
const PUBLISHING_MAX = 2;
/** Files synced or renamed at once by a commit. */
const COMMIT_CONCURRENCY = 32;

/** A file of the store: its directory's descriptor (see ConfinedTree) and its name there. */
interface Place {
  dirFd: number;
  base: string;
}

interface Staged {
  dirFd: number;
  tmp: string;
  base: string;
}

const { O_RDONLY, O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW, O_NONBLOCK } = fs.constants;
/** O_NONBLOCK: a FIFO planted in the store must not hang a reader (fstat refuses it next). */
const READ_FLAGS = O_RDONLY | O_NOFOLLOW | O_NONBLOCK;
const CREATE_FLAGS = O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW;
const FILE_MODE = 0o600;


/** Remove the temp files of staged objects that will not be published; best effort. */
async function removeTemps(batch: readonly Staged[]): Promise<void> {
  await Promise.all(batch.map((s) => unlinkPath(ConfinedTree.at(s.dirFd, s.tmp)).catch(() => undefined)));
}

export class LocalDirStore implements ObjectStore {
  readonly location: string;
  #tree: ConfinedTree | undefined;
  #staged: Staged[] = [];
  #stagedBytes = 0;
  /** Batches being published in the background, and the first error one of them met. */
  readonly #publishing = new Set<Promise<void>>();
  #publishFailure: { err: unknown } | undefined;
  /** Staged temp files are named by this random tag and a counter. */
  readonly #tempTag = `${randomBytes(4).toString('hex')}-`;
  #tempCount = 0;

  constructor(root: string) {
    this.location = path.resolve(root);
  }

  /** The tree, opened on first use (created by a writer); undefined while it does not exist. */
  #open(create: boolean): ConfinedTree | undefined {
    this.#tree ??= ConfinedTree.open(this.location, create);
    return this.#tree;
  }

  /** Where object `name` lives; undefined when its directory does not exist and `create` is false. */
  #place(name: string, create: boolean): Place | undefined {
    checkObjectName(name);
    const cut = name.lastIndexOf('/');
    const dirFd = this.#open(create)?.dir(cut >= 0 ? name.slice(0, cut) : '', create);
    return dirFd === undefined ? undefined : { dirFd, base: name.slice(cut + 1) };
  }

  async put(name: string, data: Buffer | readonly Buffer[]): Promise<void> {
    await this.#publish([await this.#writeTemp(name, data)], name);
  }

  async stage(name: string, data: Buffer | readonly Buffer[]): Promise<void> {
    this.#throwPublishFailure();
    // Pushed only once written: `this.#staged.push(await ...)` would take the array before the
    // await, and a batch published meanwhile would carry this file off unpublished, for good.
    const staged = await this.#writeTemp(name, data);
    this.#staged.push(staged);
    this.#stagedBytes += Buffer.isBuffer(data) ? data.length : data.reduce((n, b) => n + b.length, 0);
    if (this.#staged.length >= STAGE_BATCH || this.#stagedBytes >= STAGE_BATCH_BYTES) this.#publishStaged();
    while (this.#publishing.size > PUBLISHING_MAX) await Promise.race(this.#publishing);
  }

  async commit(): Promise<void> {
    this.#publishStaged();
    while (this.#publishing.size > 0) await Promise.all(this.#publishing);
    this.#throwPublishFailure();
  }

  /** Publish what is staged, in the background; commit() and the next stage() report a failure. */
  #publishStaged(): void {
    const batch = this.#staged;
    this.#staged = [];
    this.#stagedBytes = 0;
    if (batch.length === 0) return;
    const publishing: Promise<void> = this.#publish(batch, `${batch.length} staged objects`)
      .catch((err: unknown) => {
        this.#publishFailure ??= { err };
      })
      .finally(() => this.#publishing.delete(publishing));
    this.#publishing.add(publishing);
  }

  #throwPublishFailure(): void {
    const failure = this.#publishFailure;
    this.#publishFailure = undefined;
    if (failure) throw failure.err;
  }

  /**
   * Make written temp files objects: their data durable first, all files together; only then
   * the names (a rename inside one directory descriptor: it replaces a link at the target, never
   * follows it), then the directories together. On failure the temp files are removed.
   */
  async #publish(batch: readonly Staged[], what: string): Promise<void> {
    try {
      await runLimited(batch, COMMIT_CONCURRENCY, async (s) => {
        const fd = await openFd(ConfinedTree.at(s.dirFd, s.tmp), O_RDONLY | O_NOFOLLOW);
        try {
          await fdatasyncFd(fd);
        } finally {
          await closeFd(fd);
        }
      });
      await runLimited(batch, COMMIT_CONCURRENCY, (s) => renamePath(ConfinedTree.at(s.dirFd, s.tmp), ConfinedTree.at(s.dirFd, s.base)));
      await runLimited(new Set(batch.map((s) => s.dirFd)), COMMIT_CONCURRENCY, (fd) => fsyncFd(fd));
    } catch (err) {
      await removeTemps(batch);
      throw this.#writeError(what, err);
    }
  }

  async discard(): Promise<void> {
    // A batch being published either becomes objects (unused ones, which prune removes) or is
    // removed by #publish itself; its error was the caller's to see.
    await Promise.allSettled(this.#publishing);
    this.#publishFailure = undefined;
    const batch = this.#staged;
    this.#staged = [];
    this.#stagedBytes = 0;
    await removeTemps(batch);
  }

  /**
   * Write `data` to a new temp file beside the object (not synced: #publish does that). On the
   * thread pool, not the event loop: creating a file can wait for the disk (ext4 spreads new
   * directories over block groups, whose bitmaps may have to be read; a commit's syncs hold
   * the journal), which cost a full backup's main thread 0.4 ms per piece when done
   * synchronously, against about 0.1 ms of round trips.
   */
  async #writeTemp(name: string, data: Buffer | readonly Buffer[]): Promise<Staged> {
    let staged: Staged | undefined;
    let fd: number | undefined;
    try {
      const { dirFd, base } = this.#place(name, true)!;
      staged = { dirFd, base, tmp: `${TEMP_PREFIX}${base}.${this.#tempTag}${(this.#tempCount++).toString(36)}` };
      fd = await openFd(ConfinedTree.at(dirFd, staged.tmp), CREATE_FLAGS, FILE_MODE);
      await writevFully(fd, Buffer.isBuffer(data) ? [data] : data, 0);
      const closing = fd;
      fd = undefined;
      await closeFd(closing);
    } catch (err) {
      if (fd !== undefined) await closeFd(fd).catch(() => undefined);
      if (staged) await removeTemps([staged]);
      throw this.#writeError(name, err);
    }
    return staged;
  }

  #writeError(what: string, err: unknown): BdsnapError {
    const e = toBdsnapError(err);
    if (e.code === 'ENOSPC') return new BdsnapError('ENOSPC', `the repository at ${this.location} is full (writing ${what})`, { cause: err });
    return e;
  }

  /**
   * A path that names the object's file through its directory's descriptor, for a reader on
   * another thread of this process; valid until close(). The reader must open it O_NOFOLLOW and
   * check what it opened (fstat), as get() does. ENOENT when its directory does not exist.
   */
  localPath(name: string): string {
    const at = this.#place(name, false);
    if (!at) throw new BdsnapError('ENOENT', `object ${name} is missing from ${this.location}`);
    return ConfinedTree.at(at.dirFd, at.base);
  }

  async get(name: string, options?: GetOptions): Promise<Buffer> {
    const missing = (cause?: unknown): BdsnapError => new BdsnapError('ENOENT', `object ${name} is missing from ${this.location}`, { cause });
    const at = this.#place(name, false);
    if (!at) throw missing();
    let fh: fs.promises.FileHandle;
    try {
      fh = await fs.promises.open(ConfinedTree.at(at.dirFd, at.base), READ_FLAGS);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') throw missing(err);
      if (code === 'ELOOP') throw new BdsnapError('ECORRUPT', `object ${name} in ${this.location} is a symbolic link; bdsnap does not follow one there: remove it`, { cause: err });
      throw toBdsnapError(err);
    }
    try {
      const st = await fh.stat();
      if (!st.isFile()) throw new BdsnapError('ECORRUPT', `object ${name} in ${this.location} is not a regular file: remove it`);
      const range = options && 'offsetBytes' in options ? options : undefined;
      const maxBytes = options && 'maxBytes' in options ? options.maxBytes : MAX_OBJECT_BYTES;
      // Before allocating: a sparse file can claim any size.
      if (!range && st.size > maxBytes) {
        throw new BdsnapError('ECORRUPT', `object ${name} in ${this.location} is ${st.size} bytes, more than the ${maxBytes} it can be; it is damaged or not bdsnap's`);
      }
      // One read of the known size rather than readFile's 512 KiB steps.
      const { offsetBytes, lengthBytes } = range ?? { offsetBytes: 0, lengthBytes: st.size };
      const out = Buffer.allocUnsafe(lengthBytes);
      if (await preadFully(fh.fd, out, offsetBytes) < out.length) {
        throw new BdsnapError(range ? 'EINVAL' : 'EIO', `object ${name} ends before ${offsetBytes + lengthBytes}`);
      }
      return out;
    } catch (err) {
      throw toBdsnapError(err);
    } finally {
      await fh.close();
    }
  }

  async stat(name: string): Promise<ObjectInfo | undefined> {
    const at = this.#place(name, false);
    if (!at) return undefined;
    try {
      const st = await fs.promises.lstat(ConfinedTree.at(at.dirFd, at.base));
      return st.isFile() ? { name, sizeBytes: st.size, modifiedMs: st.mtimeMs } : undefined;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw toBdsnapError(err);
    }
  }

  list(prefix: string): Promise<ObjectInfo[]> {
    return this.#list(prefix, true);
  }

  async names(prefix: string): Promise<string[]> {
    return (await this.#list(prefix, false)).map((o) => o.name);
  }

  async #list(prefix: string, stat: boolean): Promise<ObjectInfo[]> {
    // Walk from the deepest directory the prefix names completely, then filter by the prefix.
    const cut = prefix.lastIndexOf('/');
    const dirName = cut >= 0 ? prefix.slice(0, cut) : '';
    if (dirName !== '') checkObjectName(dirName);
    const out: ObjectInfo[] = [];
    await this.#walk(dirName, prefix, out, false, stat);
    return out;
  }

  /**
   * `stat`: fill in sizes and times (else 0). Links are neither files nor directories here, so
   * they are never listed nor walked into; a directory is opened with ConfinedTree's checks.
   */
  async #walk(dirName: string, prefix: string, out: ObjectInfo[], temps: boolean, stat = true): Promise<void> {
    const dirFd = this.#open(false)?.dir(dirName, false);
    if (dirFd === undefined) return;
    let entries: fs.Dirent[];
    try {
      entries = await fs.promises.readdir(ConfinedTree.at(dirFd, '.'), { withFileTypes: true });
    } catch (err) {
      throw toBdsnapError(err);
    }
    await Promise.all(entries.map(async (e) => {
      const name = dirName === '' ? e.name : `${dirName}/${e.name}`;
      if (temps ? !e.name.startsWith(TEMP_PREFIX) && !e.isDirectory() : !SEGMENT.test(e.name)) return;
      if (e.isDirectory()) {
        // Only descend where the prefix can still match.
        if (name.startsWith(prefix) || prefix.startsWith(`${name}/`)) await this.#walk(name, prefix, out, temps, stat);
        return;
      }
      if (!e.isFile() || !name.startsWith(prefix)) return;
      if (!stat) {
        out.push({ name, sizeBytes: 0, modifiedMs: 0 });
        return;
      }
      const st = await fs.promises.lstat(ConfinedTree.at(dirFd, e.name)).catch(() => undefined);
      if (st?.isFile()) out.push({ name, sizeBytes: st.size, modifiedMs: st.mtimeMs });
    }));
  }

  async delete(name: string): Promise<void> {
    const at = this.#place(name, false);
    if (!at) return;
    try {
      // unlink removes a link itself, never what it points to.
      await unlinkPath(ConfinedTree.at(at.dirFd, at.base));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw toBdsnapError(err);
    }
    // Durable before it returns: a forgotten manifest must not come back after a power loss
    // once prune has deleted the pieces it names.
    await fsyncFd(at.dirFd).catch((err: unknown) => {
      throw toBdsnapError(err);
    });
  }

  async removeIncomplete(olderThanMs: number): Promise<number> {
    const temps: ObjectInfo[] = [];
    await this.#walk('', '', temps, true);
    let removed = 0;
    for (const t of temps) {
      if (t.modifiedMs > olderThanMs) continue;
      const cut = t.name.lastIndexOf('/');
      const dirFd = this.#open(false)?.dir(cut >= 0 ? t.name.slice(0, cut) : '', false);
      if (dirFd === undefined) continue;
      await unlinkPath(ConfinedTree.at(dirFd, t.name.slice(cut + 1))).catch((err: unknown) => {
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw toBdsnapError(err);
      });
      removed++;
    }
    return removed;
  }

  /** Close the directories the store holds open; the store and its local paths are unusable after. */
  close(): void {
    this.#tree?.close();
  }
}
