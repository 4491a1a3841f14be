/**
 * Atomic small-file replacement, for every metadata file bdsnap writes (session manifests,
 * indexes, digests, the daemon's registry and password file, journals): write a temporary file
 * in the same directory, fsync it, rename it over the target, fsync the directory. A crash at
 * any point leaves either the old content or the new one, never a torn file. The temporary name
 * carries the pid and random bytes, so two writers (two processes, or two calls in one) never
 * share one, and it is removed whenever the replacement does not happen.
 */

import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { toBdsnapError } from '../errors.js';

/** fsync a directory, making a rename or a file creation in it durable. */
export async function fsyncDirectory(dir: string): Promise<void> {
  const dh = await fs.promises.open(dir, 'r');
  try {
    await dh.sync();
  } finally {
    await dh.close();
  }
}

/** Replace `filePath` with `data` atomically and durably, with exactly `mode`. Errors: as BdsnapError. */
export async function writeFileAtomic(filePath: string, data: string | Buffer, mode = 0o600): Promise<void> {
  const dir = path.dirname(filePath);
  const tmp = path.join(dir, `.${path.basename(filePath)}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`);
  let renamed = false;
  try {
    const fh = await fs.promises.open(tmp, 'wx', mode);
    try {
      await fh.writeFile(data);
      // The mode argument of open() is filtered by the umask; chmod makes it exact.
      await fh.chmod(mode);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await fs.promises.rename(tmp, filePath);
    renamed = true;
    await fsyncDirectory(dir);
  } catch (err) {
    if (!renamed) await fs.promises.rm(tmp, { force: true }).catch(() => undefined);
    throw toBdsnapError(err);
  }
}

/**
 * writeFileAtomic, synchronously, for a record that must be on disk before the caller goes on
 * (a difference storage's failure state). The temporary file is created O_EXCL, so nothing
 * planted under its name is written through, and rename(2) replaces whatever has the target's
 * name (a symbolic link included) without following it.
 */
export function writeFileAtomicSync(filePath: string, data: string | Buffer, mode = 0o600): void {
  const dir = path.dirname(filePath);
  const tmp = path.join(dir, `.${path.basename(filePath)}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`);
  let renamed = false;
  try {
    const fd = fs.openSync(tmp, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_NOFOLLOW, mode);
    try {
      const bytes = Buffer.isBuffer(data) ? data : Buffer.from(data);
      for (let done = 0; done < bytes.length;) done += fs.writeSync(fd, bytes, done, bytes.length - done, done);
      fs.fchmodSync(fd, mode);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, filePath);
    renamed = true;
    const dh = fs.openSync(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
    try {
      fs.fsyncSync(dh);
    } finally {
      fs.closeSync(dh);
    }
  } catch (err) {
    if (!renamed) fs.rmSync(tmp, { force: true });
    throw toBdsnapError(err);
  }
}
