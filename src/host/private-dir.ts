/**
 * Private directories (the daemon's run and state directories): created with an exact mode, or
 * accepted only if they already are ours and closed to others.
 */

import fs from 'node:fs';
import { BdsnapError, toBdsnapError } from '../errors.js';

/**
 * Make sure `dir` is a private directory of ours: create it with `mode`, or accept an existing
 * one only if it is a real directory owned by this user and closed to others. An existing
 * directory is never chmod'ed, so a mistaken `--run-dir /tmp` is refused, not locked down.
 */
export async function ensurePrivateDir(dir: string, mode = 0o700): Promise<void> {
  let created: string | undefined;
  try {
    created = await fs.promises.mkdir(dir, { recursive: true, mode });
  } catch (err) {
    throw toBdsnapError(err);
  }
  if (created !== undefined) {
    // mkdir's mode is filtered by the umask.
    await fs.promises.chmod(dir, mode).catch((err: unknown) => { throw toBdsnapError(err); });
    return;
  }
  const st = await fs.promises.lstat(dir);
  if (!st.isDirectory()) throw new BdsnapError('EINVAL', `${dir} is not a directory`);
  const euid = process.geteuid?.() ?? 0;
  if (st.uid !== euid) throw new BdsnapError('EPERM', `${dir} is owned by uid ${st.uid}, not by this user (${euid}); use a directory of its own`);
  if ((st.mode & 0o077) !== 0) {
    throw new BdsnapError('EPERM', `${dir} is open to other users (mode ${(st.mode & 0o777).toString(8)}); use a private directory or chmod 700 it`);
  }
}
