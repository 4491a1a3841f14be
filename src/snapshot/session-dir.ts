/**
 * Making a session's directory and its data file, and the facts about where it lives that a
 * session needs at its start (the lock of its store, the alignment of cloned payloads).
 */

import fs from 'node:fs';
import path from 'node:path';
import { BdsnapError } from '../errors.js';
import { makeDirectory, openFdSync } from '../host/fd-io.js';
import { lockOpenFile } from '../host/lock-file.js';
import type { BlockDevice } from '../device/block-device.js';
import { DATA_FILE, MAX_RECORD_ALIGN_BYTES, isPowerOfTwo, sessionDirName } from './format.js';

/** Cloned payloads sit on 4 KiB boundaries at least, whatever a filesystem reports. */
const MIN_CLONE_ALIGN_BYTES = 4096;

/**
 * Create the directory of a session of `devicePath` mounted at `mountTime` under `root` (which
 * exists): two mounts in the same millisecond get a `-2`, `-3`... suffix, as mkdir refuses a
 * name that exists.
 */
export async function makeSessionDir(root: string, devicePath: string, mountTime: Date): Promise<string> {
  const base = path.join(root, sessionDirName(devicePath, mountTime));
  for (let attempt = 1; ; attempt++) {
    const candidate = attempt === 1 ? base : `${base}-${attempt}`;
    try {
      await makeDirectory(candidate, { mode: 0o700 });
      return candidate;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST' || attempt >= 1000) throw err;
    }
  }
}

/** Create the session's data file, locked (see lockStore); returns its descriptor. */
export function createDataFile(dir: string): number {
  const dataPath = path.join(dir, DATA_FILE);
  const fd = openFdSync(dataPath, 'wx+', 0o600);
  try {
    lockStore(fd, dataPath);
  } catch (err) {
    fs.closeSync(fd);
    throw err;
  }
  return fd;
}

/**
 * Hold the session store's lock while the session is open: recovery by any other process (a
 * daemon sharing the snapshot root, an offline restore) refuses a session whose lock is held.
 * Where flock cannot be called the session goes on unlocked; recovery there refuses every
 * session marked active, since it cannot tell.
 */
function lockStore(fd: number, dataPath: string): void {
  let outcome;
  try {
    outcome = lockOpenFile(fd, dataPath);
  } catch (err) {
    if (err instanceof BdsnapError && err.code === 'ENOTSUP') return;
    throw err;
  }
  if (outcome === 'held-elsewhere') throw new BdsnapError('EBUSY', `${dataPath} was locked by another process as soon as it was created`);
}

/**
 * The block size cloned payloads are aligned to in the store under `dir`, or undefined when
 * nothing will be cloned: a device that cannot clone, a block size the record format cannot
 * pad to, or a filesystem that does not say (copying is always right).
 */
export async function cloneAlignment(base: BlockDevice, dir: string): Promise<number | undefined> {
  if (base.cloneRangeTo === undefined) return undefined;
  const blockBytes = await fs.promises.statfs(dir).then((s) => s.bsize, () => undefined);
  if (blockBytes === undefined || !isPowerOfTwo(blockBytes) || blockBytes > MAX_RECORD_ALIGN_BYTES) return undefined;
  return Math.max(MIN_CLONE_ALIGN_BYTES, blockBytes);
}
