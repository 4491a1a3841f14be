/**
 * Loop devices as sysfs shows them: `/sys/block/loopN/loop/backing_file` exists while loopN is
 * attached. Listing fails loudly (EIO) when sysfs cannot be read, so an "is this file behind a
 * loop device?" check can refuse instead of guessing.
 */

import fs from 'node:fs';
import path from 'node:path';
import { BdsnapError } from '../errors.js';

export const SYS_BLOCK_PATH = '/sys/block';

export interface LoopDevice {
  /** `loopN`. */
  name: string;
  /** `/dev/loopN`. */
  devicePath: string;
  /** The attached file, without the kernel's ` (deleted)` suffix. */
  backingFile: string;
}

/**
 * The backing file of a loop device (`/dev/loopN` or `loopN`), or null when it is not attached
 * (or is not a loop device). Errors: EIO when sysfs answers with anything but "no such file".
 */
export async function loopBackingFile(blockDevice: string, sysBlock = SYS_BLOCK_PATH): Promise<string | null> {
  const file = path.join(sysBlock, path.basename(blockDevice), 'loop', 'backing_file');
  try {
    return (await fs.promises.readFile(file, 'utf8')).replace(/\n$/, '').replace(/ \(deleted\)$/, '');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') return null;
    throw new BdsnapError('EIO', `cannot read ${file}: ${(err as Error).message}`, { cause: err });
  }
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
    const backingFile = await loopBackingFile(name, sysBlock);
    if (backingFile !== null) out.push({ name, devicePath: `/dev/${name}`, backingFile });
  }
  return out;
}
