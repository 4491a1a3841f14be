/**
 * Exclusive locks that die with their holder: flock(2) on a file, through src/host/libc.ts.
 * The kernel drops the lock when the holder's last descriptor of it closes, at exit included
 * (SIGKILL too, and before the process is a zombie), so there is no stale lock to judge and no
 * pid to trust: whoever holds the lock runs.
 *
 * The file records its holder (a line of text the holder writes once it has the lock), for the
 * message that names who is in the way. The file is never removed: a process that removed it
 * while another was opening it would leave two processes each locking a file of its own.
 *
 * The file is opened with O_NOFOLLOW and must be a regular file of this user with one link, so
 * a link planted where the lock goes cannot make root write through it.
 */

import fs from 'node:fs';
import { BdsnapError } from '../errors.js';
import { pwriteFullySync } from './fd-io.js';
import { libcUnavailableReason, loadLibc, type Libc } from './libc.js';

export interface HeldLockFile {
  readonly path: string;
  /** Drop the lock (closing the descriptor); the file stays. */
  release(): void;
}

/** The lock, or the text its holder recorded (possibly '' if read as the holder was writing it). */
export type LockAttempt = { held: HeldLockFile } | { holder: string };

const LOCK_FILE_MODE = 0o600;
const MAX_RECORD_BYTES = 4096;

/**
 * Take the exclusive lock of `file` (created if missing) without waiting, and record `record`
 * in it. Errors: ENOTSUP when flock cannot be called here (no libc binding), EPERM when `file`
 * is a link, not a regular file or not ours, EIO when it cannot be opened or locked.
 */
export function tryLockFile(file: string, record: string, libc: Libc | undefined = loadLibc()): LockAttempt {
  if (libc === undefined) {
    throw new BdsnapError('ENOTSUP', `cannot lock ${file}: ${libcUnavailableReason() ?? 'libc is not available'} (install the optional koffi package)`);
  }
  let fd: number;
  try {
    fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_NOFOLLOW, LOCK_FILE_MODE);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ELOOP') throw new BdsnapError('EPERM', `${file} is a symbolic link; remove it (bdsnap creates its lock file itself)`, { cause: err });
    throw new BdsnapError('EIO', `cannot open the lock file ${file}: ${(err as Error).message}`, { cause: err });
  }
  try {
    const st = fs.fstatSync(fd);
    const euid = process.geteuid?.() ?? st.uid;
    if (!st.isFile() || st.nlink !== 1 || st.uid !== euid) {
      throw new BdsnapError('EPERM', `${file} is not a lock file of this user (a regular file with one link, owned by uid ${euid}); remove it`);
    }
    let locked: boolean;
    try {
      locked = libc.tryLockExclusive(fd);
    } catch (err) {
      throw new BdsnapError('EIO', `cannot lock ${file}: ${(err as Error).message}`, { cause: err });
    }
    if (!locked) {
      const buf = Buffer.alloc(MAX_RECORD_BYTES);
      const n = fs.readSync(fd, buf, 0, buf.length, 0);
      fs.closeSync(fd);
      return { holder: buf.subarray(0, n).toString('utf8') };
    }
    fs.ftruncateSync(fd, 0);
    const bytes = Buffer.from(record);
    pwriteFullySync(fd, bytes, 0);
  } catch (err) {
    fs.closeSync(fd);
    throw err;
  }
  let open = true;
  return {
    held: {
      path: file,
      release: () => {
        if (!open) return;
        open = false;
        fs.closeSync(fd);
      },
    },
  };
}

/**
 * Whether a process holds the lock of the open file `fd`: takes it if nobody does (it is then
 * held through `fd` until `fd` closes). Errors: ENOTSUP without a libc binding (cannot tell),
 * EIO when flock fails.
 */
export function lockOpenFile(fd: number, what: string, libc: Libc | undefined = loadLibc()): 'locked' | 'held-elsewhere' {
  if (libc === undefined) {
    throw new BdsnapError('ENOTSUP', `cannot tell whether another process has ${what} open: ${libcUnavailableReason() ?? 'libc is not available'} (install the optional koffi package)`);
  }
  try {
    return libc.tryLockExclusive(fd) ? 'locked' : 'held-elsewhere';
  } catch (err) {
    throw new BdsnapError('EIO', `cannot lock ${what}: ${(err as Error).message}`, { cause: err });
  }
}
