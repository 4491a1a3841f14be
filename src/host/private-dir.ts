/**
 * Private directories (the daemon's run and state directories): created with an exact mode, or
 * accepted only if they already are ours and closed to others.
 */

import fs from 'node:fs';
import path from 'node:path';
import { BdsnapError, toBdsnapError } from '../errors.js';
import { makeDirectoryDurable } from './atomic-file.js';

/**
 * Make sure `dir` is a private directory of ours: create it with `mode` (durably), or accept an existing
 * one only if it is a real directory owned by this user and closed to others. An existing
 * directory is never chmod'ed, so a mistaken `--run-dir /tmp` is refused, not locked down.
 */
export async function ensurePrivateDir(dir: string, mode = 0o700): Promise<void> {
  let created: string | undefined;
  try {
    // Durable: what is created in it (a snapshot's record and storage) must not vanish with
    // its name after a power loss.
    created = await makeDirectoryDurable(dir, { recursive: true, mode });
  } catch (err) {
    throw toBdsnapError(err);
  }
  if (created !== undefined) {
    // mkdir's mode is filtered by the umask.
    await fs.promises.chmod(dir, mode).catch((err: unknown) => { throw toBdsnapError(err); });
  } else {
    await checkPrivateDir(dir);
  }
  await refuseChangeablePath(dir);
}

/**
 * Refuse (EPERM) a directory whose path another user could change: a directory above it of
 * theirs, or open to them, could have it renamed away and a link or a directory of theirs put
 * in its place, and what is written there next (sessions, sockets, journals) would go where
 * they choose. Links on the way are accepted where only root or this user can replace them.
 */
async function refuseChangeablePath(dir: string): Promise<void> {
  const real = await fs.promises.realpath(dir).catch((err: unknown) => { throw toBdsnapError(err); });
  await followedSafely(dir, real);
  const why = await whyOthersCanRename(real);
  if (why !== undefined) {
    throw new BdsnapError('EPERM', `${dir} is private, but another user could move it and put a directory of theirs in its place (${why}); use a directory whose path only root${(process.geteuid?.() ?? 0) === 0 ? '' : ' and this user'} can change`);
  }
}

/**
 * Accept `dir` only if it is a real directory (not a link to one) owned by this user and
 * closed to others: none of the `openBits` set (0o077: others may not even read it; 0o022:
 * others may not change it). Errors: ENOENT, EINVAL (not a directory), EPERM (someone else's, or open).
 */
export async function checkPrivateDir(dir: string, openBits = 0o077): Promise<void> {
  let st: fs.Stats;
  try {
    st = await fs.promises.lstat(dir);
  } catch (err) {
    throw toBdsnapError(err);
  }
  if (!st.isDirectory()) throw new BdsnapError('EINVAL', `${dir} is not a directory`);
  const euid = process.geteuid?.() ?? 0;
  if (st.uid !== euid) throw new BdsnapError('EPERM', `${dir} is owned by uid ${st.uid}, not by this user (${euid}); use a directory of its own`);
  if ((st.mode & openBits) !== 0) {
    throw new BdsnapError('EPERM', `${dir} is open to other users (mode ${(st.mode & 0o777).toString(8)}); use a private directory or chmod 700 it`);
  }
}

/**
 * Why another user could make `filePath` name a different file, or undefined if only root
 * and this user can: a directory on the way that someone else owns, or that others may write
 * without the sticky bit, or a sticky one in which the next name belongs to someone else (who
 * may rename it). Read once, for a warning: a name is never trusted because of this check.
 */
export async function whyOthersCanRename(filePath: string): Promise<string | undefined> {
  const euid = process.geteuid?.() ?? 0;
  const trusted = (uid: number): boolean => uid === 0 || uid === euid;
  let child = path.resolve(filePath);
  for (let dir = path.dirname(child); ; child = dir, dir = path.dirname(dir)) {
    const st = await fs.promises.lstat(dir).catch(() => undefined);
    if (st === undefined) return `${dir} cannot be examined`;
    if (!trusted(st.uid)) return `${dir} belongs to uid ${st.uid}`;
    if ((st.mode & 0o022) !== 0) {
      if ((st.mode & 0o1000) === 0) return `${dir} is writable by other users (mode ${(st.mode & 0o7777).toString(8)})`;
      const entry = await fs.promises.lstat(child).catch(() => undefined);
      if (entry !== undefined && !trusted(entry.uid)) return `${child} belongs to uid ${entry.uid}, who may rename it in ${dir}`;
    }
    if (dir === path.dirname(dir)) return undefined;
  }
}

/**
 * `canonical`, the real path of `given`: refused (EPERM) when a symbolic link on the way could
 * be replaced by another user, since root writes wherever the name leads (a whole backup, a filesystem). Each
 * link is judged where it is found (by whyOthersCanRename, from a directory with no link above
 * it), then followed; a walk that does not end at `canonical` cannot be vouched for.
 */
export async function followedSafely(given: string, canonical: string): Promise<string> {
  let rest = path.resolve(given).split('/').filter((part) => part !== '');
  let at = '/';
  for (let links = 0; rest.length > 0;) {
    const next = path.join(at, rest[0]!);
    const st = await fs.promises.lstat(next).catch(() => undefined);
    if (!st?.isSymbolicLink()) {
      at = next;
      rest = rest.slice(1);
      continue;
    }
    const why = await whyOthersCanRename(next);
    if (why !== undefined) throw new BdsnapError('EPERM', `${given} leads to ${canonical} through ${next}, a link another user can replace (${why}); give the real path`);
    if (++links > 40) break;
    const to = path.resolve(at, await fs.promises.readlink(next));
    rest = [...to.split('/').filter((part) => part !== ''), ...rest.slice(1)];
    at = '/';
  }
  // The final name of a new --output file does not exist yet: its directory is what was walked.
  if (at !== canonical) throw new BdsnapError('EPERM', `${given} leads to ${canonical} by a way bdsnap cannot retrace; give the real path`);
  return canonical;
}
