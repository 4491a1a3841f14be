/**
 * Output files that root writes where other users may have a say (`restore --output
 * /tmp/before.img`, `cbt map --svg`): never through a symlink, never into a file another user
 * owns or reaches through a second name. The file is opened with O_NOFOLLOW (a planted symlink
 * fails with ELOOP), created with O_EXCL when it is new, and the descriptor is checked with
 * fstat: a regular file of this user with one link. An existing file is truncated through the
 * descriptor, not reopened by name. Everything after the open goes through the descriptor, or
 * through `/proc/self/fd/N`, which names the opened file itself whatever happens to the path.
 */

import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { BdsnapError, toBdsnapError } from '../errors.js';
import { fsyncDirectory } from './atomic-file.js';
import { fdatasyncFd } from './fd-io.js';

export interface OutputFile {
  fd: number;
  /** The mode it was opened for (an existing file keeps its own until someone fchmods it). */
  mode: number;
  /** The file did not exist before: remove it if what was to be written there fails. */
  created: boolean;
  /** A name of the opened file itself, for APIs that take a path. */
  procPath: string;
  /** Remove a file this call created (if the path still names it); then close. */
  discard(): Promise<void>;
  close(): Promise<void>;
}

/**
 * What makes an opened output file safe to write (`st` from fstat of the descriptor): a regular
 * file of this user with one name. Errors: EINVAL, EPERM.
 */
export function checkOutputFile(st: fs.Stats, filePath: string): void {
  const euid = process.geteuid?.() ?? st.uid;
  if (!st.isFile()) throw new BdsnapError('EINVAL', `${filePath} is not a regular file`);
  if (st.uid !== euid) throw new BdsnapError('EPERM', `${filePath} belongs to uid ${st.uid}, not to this user (${euid}); it is not overwritten: remove it or choose another name`);
  if (st.nlink !== 1) throw new BdsnapError('EPERM', `${filePath} has ${st.nlink} names (hard links); it is not overwritten: remove it or choose another name`);
}

/**
 * Open `filePath` for writing as described above. `existing`: 'truncate' empties a file already
 * there; 'refuse' leaves it untouched and fails. Errors: EPERM (unsafe), EINVAL (not
 * a regular file, or a file there with 'refuse'), as BdsnapError.
 */
export async function openOutputFile(filePath: string, mode = 0o600, existing: 'truncate' | 'refuse' = 'truncate'): Promise<OutputFile> {
  const { O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW, O_NONBLOCK } = fs.constants;
  let fd: number;
  let created = true;
  try {
    fd = fs.openSync(filePath, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, mode);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ELOOP') throw symlinkRefused(filePath, { cause: err });
    if (code !== 'EEXIST') throw toBdsnapError(err);
    if (existing === 'refuse') throw new BdsnapError('EINVAL', `${filePath} exists; only a new file is made here, and that one was left as it was (remove it or choose another name)`, { cause: err });
    created = false;
    try {
      // O_NONBLOCK: a FIFO planted there fails (ENXIO) instead of hanging the open for a reader.
      fd = fs.openSync(filePath, O_WRONLY | O_NOFOLLOW | O_NONBLOCK);
    } catch (err2) {
      if ((err2 as NodeJS.ErrnoException).code === 'ELOOP') throw symlinkRefused(filePath, { cause: err2 });
      if ((err2 as NodeJS.ErrnoException).code === 'ENXIO') throw new BdsnapError('EINVAL', `${filePath} is not a regular file`, { cause: err2 });
      throw toBdsnapError(err2);
    }
  }
  try {
    checkOutputFile(fs.fstatSync(fd), filePath);
    if (!created) fs.ftruncateSync(fd, 0);
    else fs.fchmodSync(fd, mode); // open()'s mode is filtered by the umask
  } catch (err) {
    fs.closeSync(fd);
    throw toBdsnapError(err);
  }
  const opened = fs.fstatSync(fd);
  const close = closeOnce(fd);
  return {
    fd,
    mode,
    created,
    procPath: `/proc/self/fd/${fd}`,
    close,
    async discard(): Promise<void> {
      if (created) {
        // Only the file this call made: the name may have been taken over since.
        if (await holds(filePath, opened)) await fs.promises.unlink(filePath).catch(() => undefined);
      }
      await close();
    },
  };
}

/** An output file written under a temporary name beside its own, named by `publish` once whole. */
export interface StagedOutputFile {
  /** Open for reading and writing. */
  readonly fd: number;
  readonly mode: number;
  /** A name of the opened file itself, for APIs that take a path. */
  readonly procPath: string;
  /** The temporary name it is written under. */
  readonly tempPath: string;
  /**
   * The content is complete: make it durable and give it its name (see nameStagedFile). Before
   * this the name shows nothing new: a file that was there keeps its content, and a crash or a
   * kill leaves only the temporary file.
   */
  publish(): Promise<void>;
  /** After a failure: close, and remove the temporary file if it is still the one made here; returns what was done, as a clause for the error. */
  discard(): Promise<string>;
  close(): Promise<void>;
}

/** The start of the temporary names an output `filePath` is written under (a random suffix follows). */
function stagedPrefix(filePath: string): string {
  return `.${path.basename(filePath).slice(0, 200)}.bdsnap-restore-`;
}

/**
 * Open a new file to stand for `filePath` once written: created exclusively (O_EXCL,
 * O_NOFOLLOW, `mode`, opened for reading and writing) under a temporary name in the same
 * directory. A file already at `filePath` is refused (EBUSY) unless `replace`; then it must be
 * one `openOutputFile` would overwrite (no symlink, a regular file of this user with one
 * name), and `publish` replaces it, only if the name still holds it.
 * Errors: EPERM, EINVAL, EBUSY, as BdsnapError.
 */
export async function openStagedOutputFile(filePath: string, options: { mode?: number; replace?: boolean } = {}): Promise<StagedOutputFile> {
  const mode = options.mode ?? 0o600;
  const existing = await fs.promises.lstat(filePath).catch((err: unknown) => {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw toBdsnapError(err);
  });
  if (existing && !options.replace) throw new BdsnapError('EBUSY', `${filePath} appeared while it was being written; refusing to replace it`);
  if (existing?.isSymbolicLink()) throw symlinkRefused(filePath);
  if (existing) checkOutputFile(existing, filePath);
  const tempPath = path.join(path.dirname(filePath), `${stagedPrefix(filePath)}${randomBytes(4).toString('hex')}`);
  let fd: number;
  try {
    fd = fs.openSync(tempPath, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_NOFOLLOW, mode);
  } catch (err) {
    const e = toBdsnapError(err);
    throw new BdsnapError(e.code, `cannot create a file in ${path.dirname(filePath)} to write ${filePath} into: ${e.message}`, { cause: err });
  }
  const made = fs.fstatSync(fd);
  fs.fchmodSync(fd, mode); // open()'s mode is filtered by the umask
  const close = closeOnce(fd);
  return {
    fd, mode, procPath: `/proc/self/fd/${fd}`, tempPath, close,
    async publish(): Promise<void> {
      await fdatasyncFd(fd);
      await nameStagedFile(tempPath, filePath, made, existing);
    },
    async discard(): Promise<string> {
      await close();
      // Only the file this call made: the name may have been taken over since.
      if (!await holds(tempPath, made)) return `${tempPath} no longer names the file written there, and was left alone`;
      // Named already, and a later step failed: the temporary name is a second one of it.
      if (await holds(filePath, made)) return `${tempPath} is left, holding the whole file`;
      try {
        await fs.promises.unlink(tempPath);
      } catch (err) {
        return `removing the partly written ${tempPath} failed too (${toBdsnapError(err).message}); remove it`;
      }
      return `the partly written ${tempPath} was removed`;
    },
  };
}

/** Files that staged writes of `filePath` left beside it (killed before `publish`), but `except`: whole paths, sorted. */
export async function stagedLeftovers(filePath: string, except?: string): Promise<string[]> {
  const dir = path.dirname(filePath);
  const names = await fs.promises.readdir(dir).catch(() => []);
  return names.filter((n) => n.startsWith(stagedPrefix(filePath))).map((n) => path.join(dir, n)).filter((p) => p !== except).sort();
}

/**
 * Give `tempPath` (the file `made`, written and synced) the name `filePath`, and make that
 * durable. With no `replacing`, by a hard link, which fails rather than replace a file that
 * appeared meanwhile (a checked rename where the filesystem has no hard links); else by a
 * rename over `replacing`, only if the name still holds it. Errors: EBUSY, as BdsnapError.
 */
async function nameStagedFile(tempPath: string, filePath: string, made: fs.Stats, replacing?: fs.Stats): Promise<void> {
  const nameFree = async (): Promise<void> => {
    if (await fs.promises.lstat(filePath).then(() => true, () => false)) {
      throw new BdsnapError('EBUSY', `${filePath} appeared while it was being written; refusing to replace it`);
    }
  };
  if (!await holds(tempPath, made)) throw new BdsnapError('EBUSY', `${tempPath} no longer names the file written there; refusing to name it ${filePath}`);
  if (replacing) {
    if (!await holds(filePath, replacing)) throw new BdsnapError('EBUSY', `${filePath} was replaced while it was being written; refusing to replace it`);
    await fs.promises.rename(tempPath, filePath).catch((err: unknown) => { throw toBdsnapError(err); });
  } else {
    try {
      await fs.promises.link(tempPath, filePath);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'EEXIST') throw new BdsnapError('EBUSY', `${filePath} appeared while it was being written; refusing to replace it`, { cause: err });
      if (code !== 'EPERM' && code !== 'EOPNOTSUPP' && code !== 'ENOTSUP') throw toBdsnapError(err);
      // A filesystem without hard links: the name is checked, then taken by a rename.
      await nameFree();
      await fs.promises.rename(tempPath, filePath).catch((e: unknown) => { throw toBdsnapError(e); });
    }
  }
  if (!await holds(filePath, made)) throw new BdsnapError('EBUSY', `${filePath} was replaced as it was being given the written file; that file is at ${tempPath}`);
  await fs.promises.unlink(tempPath).catch((err: unknown) => {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw toBdsnapError(err);
  });
  await fsyncDirectory(path.dirname(filePath));
}

/**
 * The refusal of a symbolic link where a file is to be written: named as the user gave it
 * (`given`, when that is not `filePath`: a relative name, one through a linked directory) and
 * with where it points, so that the user knows both what was refused and what they may mean.
 */
export function symlinkRefused(filePath: string, options: { given?: string; cause?: unknown } = {}): BdsnapError {
  const shown = options.given !== undefined && options.given !== filePath ? `${options.given} (${filePath})` : filePath;
  let to: string | undefined;
  let real: string | undefined;
  try {
    to = path.resolve(path.dirname(filePath), fs.readlinkSync(filePath));
    real = fs.realpathSync(filePath);
  } catch {
    // Gone or dangling since: said with what is known.
  }
  const points = to === undefined ? '' : real === undefined ? `it points to ${to}, which does not exist; ` : `it points to ${to}${real !== to ? `, which leads to ${real}` : ''}; `;
  const instead = real !== undefined ? `give the path of the file itself (${real}) if that is the one meant`
    : to !== undefined ? `give the path the file is to have (${to}) if that is the one meant` : 'give the path of the file itself';
  return new BdsnapError('EPERM', `${shown} is a symbolic link; it is not written through, since whoever can change a link can point it at another file: ${points}${instead}, or remove the link`, options.cause === undefined ? undefined : { cause: options.cause });
}

/** A close of `fd` that closes it the first time only. */
function closeOnce(fd: number): () => Promise<void> {
  let open = true;
  return async () => {
    if (!open) return;
    open = false;
    fs.closeSync(fd);
  };
}

/** `p` names the file `st` describes (not followed if a link). */
async function holds(p: string, st: fs.Stats): Promise<boolean> {
  const now = await fs.promises.lstat(p).catch(() => undefined);
  return now !== undefined && now.dev === st.dev && now.ino === st.ino;
}
