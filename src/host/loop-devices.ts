/**
 * Loop devices as sysfs shows them: `/sys/block/loopN/loop/backing_file` exists while loopN is
 * attached. Listing fails loudly (EIO) when sysfs cannot be read, so an "is this file behind a
 * loop device?" check can refuse instead of guessing.
 *
 * The backing file's name in sysfs is only a name (the kernel prints the path of the file it
 * holds: renamed, it shows the new name; unlinked, the old one with ` (deleted)`, although a
 * hard link may keep the very same file alive). Which file a loop device holds is asked of the
 * kernel (LOOP_GET_STATUS64: st_dev and st_ino); the name is used only where that ioctl cannot
 * be had, and then a name that no longer leads to the file is a "cannot tell", never a "no".
 */

import fs from 'node:fs';
import path from 'node:path';
import { BdsnapError } from '../errors.js';
import { libcUnavailableReason, loadLibc, type LoopBacking } from './libc.js';

export const SYS_BLOCK_PATH = '/sys/block';
export const DEV_PATH = '/dev';

const DELETED_SUFFIX = ' (deleted)';

export interface LoopDevice {
  /** `loopN`. */
  name: string;
  /** `/dev/loopN`. */
  devicePath: string;
  /** The attached file, without the kernel's ` (deleted)` suffix. */
  backingFile: string;
  /** The kernel marked the name ` (deleted)`: the name no longer leads to the file. */
  backingFileDeleted: boolean;
  /** `major:minor` of the loop device itself (to find where it is mounted), null if sysfs lacks it. */
  majorMinor: string | null;
}

/** Reads of a loop device caught between states (ENODEV: being attached or detached) before it counts as unreadable. */
const TRANSIENT_TRIES = 10;
const TRANSIENT_WAIT_MS = 10;

/**
 * What sysfs says backs a loop device: the name and whether the kernel marked it deleted. A
 * loop device being attached or detached at that instant answers ENODEV: asked again shortly,
 * it has either a backing file or no `loop` directory; one that stays so is unreadable.
 */
async function readBackingFile(name: string, sysBlock: string): Promise<{ file: string; deleted: boolean } | null> {
  const file = path.join(sysBlock, name, 'loop', 'backing_file');
  for (let attempt = 1; ; attempt++) {
    try {
      const text = (await fs.promises.readFile(file, 'utf8')).replace(/\n$/, '');
      const deleted = text.endsWith(DELETED_SUFFIX);
      return { file: deleted ? text.slice(0, -DELETED_SUFFIX.length) : text, deleted };
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT' || code === 'ENOTDIR') return null;
      if (code === 'ENODEV' && attempt < TRANSIENT_TRIES) {
        await new Promise((resolve) => setTimeout(resolve, TRANSIENT_WAIT_MS));
        continue;
      }
      throw new BdsnapError('EIO', `cannot read ${file}: ${(err as Error).message}`, { cause: err });
    }
  }
}

/**
 * The backing file of a loop device (`/dev/loopN` or `loopN`), or null when it is not attached
 * (or is not a loop device). Errors: EIO when sysfs answers with anything but "no such file".
 */
export async function loopBackingFile(blockDevice: string, sysBlock = SYS_BLOCK_PATH): Promise<string | null> {
  return (await readBackingFile(path.basename(blockDevice), sysBlock))?.file ?? null;
}

/** Every attached loop device. Errors: EIO when `sysBlock` or a device's entry cannot be read. */
export async function listLoopDevices(sysBlock = SYS_BLOCK_PATH): Promise<LoopDevice[]> {
  let names: string[];
  try {
    names = await fs.promises.readdir(sysBlock);
  } catch (err) {
    throw new BdsnapError('EIO', `cannot list block devices in ${sysBlock}: ${(err as Error).message}`, { cause: err });
  }
  const out: LoopDevice[] = [];
  for (const name of names.filter((n) => /^loop\d+$/.test(n))) {
    const backing = await readBackingFile(name, sysBlock);
    if (backing === null) continue;
    const majorMinor = await fs.promises.readFile(path.join(sysBlock, name, 'dev'), 'utf8').then((t) => t.trim(), () => null);
    out.push({ name, devicePath: `/dev/${name}`, backingFile: backing.file, backingFileDeleted: backing.deleted, majorMinor });
  }
  return out;
}

/**
 * The kernel could not say which file backs a loop device because that file's filesystem has
 * lost its connection for good (ENOTCONN: the FUSE server behind it is gone, as when nbdfuse
 * dies under a loop device). Any file there now fails stat the same way, so a file that stat
 * reaches after this answer is not the one (see checkNotInUse).
 */
export class DisconnectedLoopError extends BdsnapError {}

/** What to do about a loop device whose file cannot be told, in a clause. */
function leftOverAdvice(loop: LoopDevice): string {
  return `if ${loop.devicePath} is left over (the filesystem of its file gone), detach it: umount it where it is mounted, then losetup -d ${loop.devicePath}`;
}

/**
 * Which file `loop` is bound to, by identity: from the kernel (LOOP_GET_STATUS64 on
 * `<devDir>/loopN`), else from stat of the name sysfs shows. Null when the device was detached
 * meanwhile. Errors: EIO when neither way answers (a deleted or unreachable name without the
 * ioctl): the caller must treat that as "cannot tell"; DisconnectedLoopError (EIO too) when the
 * kernel answered that the file's filesystem is disconnected.
 */
export async function loopBackingIdentity(loop: LoopDevice, devDir = DEV_PATH): Promise<LoopBacking | null> {
  let whyNotKernel: string;
  let disconnected = false;
  const libc = loadLibc();
  if (libc === undefined) {
    whyNotKernel = libcUnavailableReason() ?? 'libc is not bound';
  } else {
    const node = path.join(devDir, loop.name);
    const handle = await fs.promises.open(node, fs.constants.O_RDONLY).catch((err: unknown) => err as Error);
    if (handle instanceof Error) {
      whyNotKernel = `cannot open ${node}: ${handle.message}`;
    } else {
      try {
        return await libc.loopBacking(handle.fd);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENXIO') return null;
        disconnected = (err as NodeJS.ErrnoException).code === 'ENOTCONN';
        whyNotKernel = (err as Error).message;
      } finally {
        await handle.close();
      }
    }
  }
  const Refusal = disconnected ? DisconnectedLoopError : BdsnapError;
  if (loop.backingFileDeleted) {
    throw new Refusal('EIO', `the backing file of ${loop.devicePath} (${loop.backingFile}) was deleted, so its name does not tell which file it is, and the kernel could not be asked (${whyNotKernel}); ${leftOverAdvice(loop)}`);
  }
  try {
    const st = await fs.promises.stat(loop.backingFile, { bigint: true });
    return { dev: st.dev, ino: st.ino, rdev: st.rdev };
  } catch (err) {
    throw new Refusal('EIO', `cannot tell which file backs ${loop.devicePath}: the kernel could not be asked (${whyNotKernel}) and ${loop.backingFile} cannot be read: ${(err as Error).message}; ${leftOverAdvice(loop)}`, { cause: err });
  }
}
