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
import { closeFd, fsyncFd, fsyncFdSync, makeDirectory, makeDirectorySync, openFd, openFdSync, removePath, removePathSync, renamePath, renamePathSync, writevFully, writevFullySync } from './fd-io.js';

/** fsync a directory, making a rename or a file creation in it durable. */
export async function fsyncDirectory(dir: string): Promise<void> {
  const fd = await openFd(dir, 'r');
  try {
    await fsyncFd(fd);
  } finally {
    await closeFd(fd);
  }
}

/** Synchronous fsyncDirectory. */
export function fsyncDirectorySync(dir: string): void {
  const fd = openFdSync(dir, 'r');
  try {
    fsyncFdSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * mkdir (with `recursive`, the missing parents too), and make each directory it created
 * durable: a new directory's name is in its parent, which only the parent's fsync makes
 * survive a power loss (and with it everything that will be written below). Resolves with the
 * first directory created, undefined when there was nothing to create.
 */
export async function makeDirectoryDurable(dir: string, options: { recursive?: boolean; mode?: number } = {}): Promise<string | undefined> {
  const first = await makeDirectory(dir, options);
  if (first === undefined) return undefined;
  const top = path.resolve(first);
  for (let made = path.resolve(dir); ; made = path.dirname(made)) {
    await fsyncDirectory(path.dirname(made));
    if (made === top || made === path.dirname(made)) break;
  }
  return first;
}

/** Synchronous makeDirectoryDurable. */
export function makeDirectoryDurableSync(dir: string, options: { recursive?: boolean; mode?: number } = {}): string | undefined {
  const first = makeDirectorySync(dir, options);
  if (first === undefined) return undefined;
  const top = path.resolve(first);
  for (let made = path.resolve(dir); ; made = path.dirname(made)) {
    fsyncDirectorySync(path.dirname(made));
    if (made === top || made === path.dirname(made)) break;
  }
  return first;
}

/** A temporary name beside `filePath` that no other writer uses. */
function temporaryName(filePath: string): string {
  return path.join(path.dirname(filePath), `.${path.basename(filePath)}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`);
}

/** Replace `filePath` with `data` atomically and durably, with exactly `mode`. Errors: as BdsnapError. */
export async function writeFileAtomic(filePath: string, data: string | Buffer, mode = 0o600): Promise<void> {
  const dir = path.dirname(filePath);
  const tmp = temporaryName(filePath);
  let renamed = false;
  try {
    const fd = await openFd(tmp, 'wx', mode);
    try {
      await writevFully(fd, [typeof data === 'string' ? Buffer.from(data) : data], 0);
      // The mode argument of open() is filtered by the umask; chmod makes it exact.
      await new Promise<void>((resolve, reject) => fs.fchmod(fd, mode, (e) => (e ? reject(e) : resolve())));
      await fsyncFd(fd);
    } finally {
      await closeFd(fd);
    }
    await renamePath(tmp, filePath);
    renamed = true;
    await fsyncDirectory(dir);
  } catch (err) {
    if (!renamed) await removePath(tmp).catch(() => undefined);
    throw toBdsnapError(err);
  }
}

/**
 * Synchronous writeFileAtomic, for a caller that must not yield while it replaces the file (a
 * difference storage's failure state). The temporary file is created O_EXCL, so nothing planted
 * under its name is written through, and rename(2) replaces whatever has the target's name (a
 * symbolic link included) without following it. `data` may come in parts, written one after
 * the other. Errors: as BdsnapError.
 */
export function writeFileAtomicSync(filePath: string, data: string | Buffer | readonly Buffer[], mode = 0o600): void {
  const dir = path.dirname(filePath);
  const tmp = temporaryName(filePath);
  const parts = typeof data === 'string' ? [Buffer.from(data)] : Buffer.isBuffer(data) ? [data] : data;
  let renamed = false;
  try {
    const fd = openFdSync(tmp, 'wx', mode);
    try {
      writevFullySync(fd, parts, 0);
      fs.fchmodSync(fd, mode);
      fsyncFdSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    renamePathSync(tmp, filePath);
    renamed = true;
    fsyncDirectorySync(dir);
  } catch (err) {
    if (!renamed) {
      try {
        removePathSync(tmp);
      } catch {
        // The failure to report is the first one.
      }
    }
    throw toBdsnapError(err);
  }
}
