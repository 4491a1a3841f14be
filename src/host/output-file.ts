/**
 * Output files that root writes where other users may have a say (`restore --output
 * /tmp/before.img`, `cbt map --svg`): never through a symlink, never into a file another user
 * owns or reaches through a second name. The file is opened with O_NOFOLLOW (a planted symlink
 * fails with ELOOP), created with O_EXCL when it is new, and the descriptor is checked with
 * fstat: a regular file of this user with one link. An existing file is truncated through the
 * descriptor, not reopened by name. Everything after the open goes through the descriptor, or
 * through `/proc/self/fd/N`, which names the opened file itself whatever happens to the path.
 */

import fs from 'node:fs';
import { BdsnapError, toBdsnapError } from '../errors.js';

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

/** Open `filePath` for writing as described above. Errors: EPERM (unsafe), EINVAL (not a regular file), as BdsnapError. */
export async function openOutputFile(filePath: string, mode = 0o600): Promise<OutputFile> {
  const { O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW } = fs.constants;
  let fd: number;
  let created = true;
  try {
    fd = fs.openSync(filePath, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, mode);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ELOOP') throw new BdsnapError('EPERM', `${filePath} is a symbolic link; it is not written through: give the real path`, { cause: err });
    if (code !== 'EEXIST') throw toBdsnapError(err);
    created = false;
    try {
      fd = fs.openSync(filePath, O_WRONLY | O_NOFOLLOW);
    } catch (err2) {
      if ((err2 as NodeJS.ErrnoException).code === 'ELOOP') throw new BdsnapError('EPERM', `${filePath} is a symbolic link; it is not written through: give the real path`, { cause: err2 });
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
  let open = true;
  const close = async (): Promise<void> => {
    if (!open) return;
    open = false;
    fs.closeSync(fd);
  };
  return {
    fd,
    mode,
    created,
    procPath: `/proc/self/fd/${fd}`,
    close,
    async discard(): Promise<void> {
      if (created) {
        // Only the file this call made: the name may have been taken over since.
        const now = await fs.promises.lstat(filePath).catch(() => undefined);
        if (now !== undefined && now.dev === opened.dev && now.ino === opened.ino) await fs.promises.unlink(filePath).catch(() => undefined);
      }
      await close();
    },
  };
}
