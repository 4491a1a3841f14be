/**
 * Atomic small-file replacement for the daemon's state: write a temp file in the same
 * directory, fsync it, rename it over the target, fsync the directory. A crash at any point
 * leaves either the old content or the new one, never a torn file.
 */

import fs from 'node:fs';
import path from 'node:path';
import { toBdsnapError } from '../errors.js';

export async function writeFileAtomic(filePath: string, data: string | Buffer, mode = 0o600): Promise<void> {
  const dir = path.dirname(filePath);
  const tmp = path.join(dir, `.${path.basename(filePath)}.${process.pid}.${Date.now()}.tmp`);
  try {
    const fh = await fs.promises.open(tmp, 'w', mode);
    try {
      await fh.writeFile(data);
      // The mode argument of open() is filtered by the umask; chmod makes it exact.
      await fh.chmod(mode);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await fs.promises.rename(tmp, filePath);
    const dh = await fs.promises.open(dir, 'r');
    try {
      await dh.sync();
    } finally {
      await dh.close();
    }
  } catch (err) {
    await fs.promises.rm(tmp, { force: true });
    throw toBdsnapError(err);
  }
}

/** Create `dir` (and parents) and force its mode, whatever the umask or an earlier run left. */
export async function ensurePrivateDir(dir: string, mode = 0o700): Promise<void> {
  try {
    await fs.promises.mkdir(dir, { recursive: true, mode });
    await fs.promises.chmod(dir, mode);
  } catch (err) {
    throw toBdsnapError(err);
  }
}
