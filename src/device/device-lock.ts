/**
 * One opener per image across processes. Node has no flock(2), so the lock is a file named
 * after the image's identity in a lock directory, holding the owner's pid and start time.
 *
 * Atomicity: the owner writes its whole lock into a temporary file and then link(2)s it into
 * place; link fails with EEXIST if a lock is there, so a lock file is never seen half written
 * and at most one process creates it.
 *
 * The directory is private to the process's user (root's for the daemon), so no other user can
 * plant a lock, remove one, or read the device paths the locks record.
 *
 * Stale locks (owner killed with SIGKILL, or its pid since reused: the start time differs) are
 * taken over without ever removing a live lock. Only a lock judged stale is replaced, and only
 * by the one process that wins the exclusive link of a marker named after that exact lock
 * (its inode, pid and start time); the winner rename(2)s its own lock over the stale one. Two
 * processes that both judged the same lock stale race for the marker, and the loser starts
 * over: it finds the winner's live lock. A winner killed before its rename leaves its marker;
 * that marker is stale in turn (its content is the winner's lock) and is taken over the same
 * way, one level down. A live lock is removed only by its owner.
 */

import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BdsnapError, toBdsnapError } from '../errors.js';
import { ensurePrivateDir } from '../host/private-dir.js';
import { processStartTimeSync } from '../host/processes.js';
import type { DeviceIdentity } from './block-device.js';

export interface DeviceLock {
  release(): Promise<void>;
}

/** Takeover markers older than this are removed (nobody still racing for that lock can be this slow). */
const MARKER_MAX_AGE_MS = 10 * 60 * 1000;
const MAX_ATTEMPTS = 20;

/**
 * The lock directory: $BDSNAP_LOCK_DIR; for root /run/bdsnap-locks (in /run, which only root
 * may write: in a world-writable /run/lock another user could make the directory first and
 * plant or remove locks); for anyone else a directory of their own. Whichever it is, it must
 * be a private directory of this user (see host/private-dir.ts), or no lock is taken.
 */
export function lockDirectory(): string {
  if (process.env.BDSNAP_LOCK_DIR) return process.env.BDSNAP_LOCK_DIR;
  const euid = process.geteuid?.() ?? 0;
  if (euid === 0) return '/run/bdsnap-locks';
  if (process.env.XDG_RUNTIME_DIR) return path.join(process.env.XDG_RUNTIME_DIR, 'bdsnap-locks');
  return path.join(os.tmpdir(), `bdsnap-locks-${euid}`);
}

function lockName(identity: DeviceIdentity): string {
  return identity.kind === 'block' ? `block-${identity.rdev}.lock` : `file-${identity.dev}-${identity.ino}.lock`;
}

interface Owner {
  pid: number;
  /** null in a lock written without one (older versions): then liveness is the pid's alone. */
  startTime: string | null;
}

function parseOwner(content: string): Owner | undefined {
  const [pidText, second] = content.split('\n');
  const pid = Number(pidText);
  if (!Number.isInteger(pid) || pid <= 0) return undefined;
  return { pid, startTime: second !== undefined && /^\d+$/.test(second) ? second : null };
}

/** Whether the lock's owner still runs. A zombie owner has exited: its lock is stale (see host/processes.ts). */
function ownerAlive(owner: Owner): boolean {
  if (owner.startTime === null) {
    try {
      process.kill(owner.pid, 0);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EPERM') return false;
    }
    return processStartTimeSync(owner.pid) !== null;
  }
  return processStartTimeSync(owner.pid) === owner.startTime;
}

/** Read the lock at `file` with the inode the bytes came from, or undefined if there is none. */
function readLock(file: string): { content: string; ino: number } | undefined {
  let fd: number;
  try {
    fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
  try {
    return { ino: fs.fstatSync(fd).ino, content: fs.readFileSync(fd, 'utf8') };
  } finally {
    fs.closeSync(fd);
  }
}

function removeOldMarkers(dir: string, base: string): void {
  for (const name of fs.readdirSync(dir)) {
    if (!name.startsWith(`${base}.stale-`)) continue;
    const st = fs.statSync(path.join(dir, name), { throwIfNoEntry: false });
    if (st && Date.now() - st.mtimeMs > MARKER_MAX_AGE_MS) fs.rmSync(path.join(dir, name), { force: true });
  }
}

/** How deep markers of dead takers-over are taken over in turn (each level is one more kill at one exact step). */
const MAX_MARKER_DEPTH = 4;

/**
 * Win the right to replace the entry `name` (inode `ino`, written by `owner`): link `tmp` as
 * its marker, exclusively. A marker that is there already belongs to a taker-over: while it
 * runs, it goes on (false); if it died between winning and replacing, its marker is taken over
 * the same way, so a kill at that step does not lock the device out until the marker ages.
 */
function winMarker(dir: string, tmp: string, name: string, ino: number, owner: Owner | undefined, depth: number): boolean {
  const marker = `${name}.stale-${ino}-${owner?.pid ?? 0}-${owner?.startTime ?? 'x'}`;
  try {
    fs.linkSync(tmp, path.join(dir, marker));
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') {
      throw new BdsnapError('EIO', `cannot take over the stale lock ${path.join(dir, name)}: ${(err as Error).message}`, { cause: err });
    }
  }
  if (depth >= MAX_MARKER_DEPTH) return false;
  const taker = readLock(path.join(dir, marker));
  if (taker === undefined) return false;
  const takerOwner = parseOwner(taker.content);
  if (takerOwner !== undefined && ownerAlive(takerOwner)) return false;
  return winMarker(dir, tmp, marker, taker.ino, takerOwner, depth + 1);
}

export async function acquireDeviceLock(devicePath: string, identity: DeviceIdentity): Promise<DeviceLock> {
  const dir = lockDirectory();
  try {
    await ensurePrivateDir(dir, 0o700);
  } catch (err) {
    const e = toBdsnapError(err);
    throw new BdsnapError(e.code, `cannot lock ${devicePath}: the lock directory is not safe: ${e.message} (or remove it: bdsnap makes it again, private)`, { cause: err });
  }
  const base = lockName(identity);
  const file = path.join(dir, base);
  const startTime = processStartTimeSync(process.pid);
  const tmp = path.join(dir, `.${base}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`);
  // The lock is complete before it can be seen: written whole, then linked into place.
  try {
    await fs.promises.writeFile(tmp, `${process.pid}\n${startTime ?? ''}\n${devicePath}\n`, { flag: 'wx', mode: 0o600 });
  } catch (err) {
    throw new BdsnapError('EIO', `cannot create a lock file in ${dir}: ${(err as Error).message}`, { cause: err });
  }
  try {
    // The checks and steps below are synchronous on purpose: no other request of this process
    // runs between reading a lock and acting on what was read.
    for (let attempt = 0; attempt < MAX_ATTEMPTS; attempt++) {
      try {
        fs.linkSync(tmp, file);
        return held(file, fs.lstatSync(file).ino);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') {
          throw new BdsnapError('EIO', `cannot create lock file ${file}: ${(err as Error).message}`, { cause: err });
        }
      }
      const current = readLock(file);
      if (current === undefined) continue; // released meanwhile: try again
      const owner = parseOwner(current.content);
      if (owner !== undefined && ownerAlive(owner)) {
        const who = owner.pid === process.pid ? 'this process' : `process ${owner.pid}`;
        throw new BdsnapError('EBUSY', `${devicePath} is already open by ${who}: if that is the bdsnap daemon, bdsnap status shows what holds it (bdsnap umount MOUNTPOINT or bdsnap snapshot destroy ID frees it); else stop that process`);
      }
      // Stale (or unreadable garbage). Only the winner of this exact lock's marker may replace it.
      if (!winMarker(dir, tmp, base, current.ino, owner, 0)) continue; // another process is taking it over
      removeOldMarkers(dir, base);
      // Nobody else replaces this stale lock (they lost the marker, or a marker of it), and its
      // dead owner cannot remove it; a taker-over that died before us may have replaced it,
      // though: then it is looked at afresh.
      if (readLock(file)?.ino !== current.ino) continue;
      fs.renameSync(tmp, file);
      return held(file, fs.lstatSync(file).ino);
    }
    throw new BdsnapError('EBUSY', `${devicePath}: could not take its lock after ${MAX_ATTEMPTS} tries (other processes keep opening it); try again`);
  } finally {
    fs.rmSync(tmp, { force: true });
  }
}

function held(file: string, ino: number): DeviceLock {
  let released = false;
  return {
    release: async () => {
      if (released) return;
      released = true;
      // Only our own lock: nobody replaces a live one, but check rather than assume.
      const st = fs.lstatSync(file, { throwIfNoEntry: false });
      if (st?.ino === ino) fs.rmSync(file, { force: true });
    },
  };
}
