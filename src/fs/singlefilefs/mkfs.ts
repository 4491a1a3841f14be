/**
 * The singlefilefs formatter: superblock, inode, and the initial body, as the course's
 * formatter writes them, with the fields it leaves uninitialised written as zero.
 * Only blocks 0 to 2 are written; the rest of the device is left as it is.
 */

import fs from 'node:fs';
import type { BlockDevice } from '../../device/block-device.js';
import { FileDevice } from '../../device/file-device.js';
import { BdsnapError, toBdsnapError } from '../../errors.js';
import { ftruncateFd } from '../../host/fd-io.js';
import { openOutputFile, type OutputFile } from '../../host/output-file.js';
import {
  DEFAULT_IMAGE_BLOCKS, FIRST_DATA_BLOCK, INITIAL_CONTENT, INODE_BLOCK, MIN_IMAGE_BLOCKS, SFFS_BLOCK_SIZE, SUPERBLOCK_BLOCK,
  encodeInode, encodeSuperblock, fileInode, superblockFor,
} from './layout.js';

export { DEFAULT_IMAGE_BLOCKS } from './layout.js';

/** Format `device`. Errors: EINVAL when it is not a whole number of blocks or smaller than 3 blocks. */
export async function mkfs(device: BlockDevice): Promise<void> {
  checkDeviceSize(device.size);
  const body = Buffer.alloc(SFFS_BLOCK_SIZE);
  const bodyLength = body.write(INITIAL_CONTENT, 'latin1');
  await device.write(encodeSuperblock(superblockFor(device.size)), SUPERBLOCK_BLOCK * SFFS_BLOCK_SIZE);
  await device.write(encodeInode(fileInode(bodyLength)), INODE_BLOCK * SFFS_BLOCK_SIZE);
  await device.write(body, FIRST_DATA_BLOCK * SFFS_BLOCK_SIZE);
  await device.flush();
}

/**
 * Create (or overwrite) an image file of `blocks` zeroed blocks and format it. The file is
 * opened as an output file (see host/output-file.ts): never through a symbolic link, and an
 * existing one only if it is a regular file of this user with one name, so root formatting a
 * name in a directory another user can write cannot truncate a file the name was made to point
 * at. Everything after the open goes through that descriptor.
 */
export async function mkfsImage(path: string, blocks: number = DEFAULT_IMAGE_BLOCKS): Promise<void> {
  if (!Number.isSafeInteger(blocks) || blocks < MIN_IMAGE_BLOCKS || blocks > Number.MAX_SAFE_INTEGER / SFFS_BLOCK_SIZE) {
    throw new BdsnapError('EINVAL', `a singlefilefs image needs a whole number of blocks, at least ${MIN_IMAGE_BLOCKS}; got ${blocks}`);
  }
  let out: OutputFile;
  try {
    const st = await fs.promises.lstat(path).catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return undefined;
      throw err;
    });
    if (st && !st.isFile() && !st.isSymbolicLink()) {
      throw new BdsnapError('EINVAL', `${path} exists and is not a regular file; mkfsImage only creates image files`);
    }
    // Truncated to zero on open, so every block past the body reads as zeroes.
    out = await openOutputFile(path, 0o644);
  } catch (err) {
    const e = toBdsnapError(err);
    throw e === err ? e : new BdsnapError(e.code, `cannot create ${path}: ${e.message}`, { cause: err });
  }
  try {
    await ftruncateFd(out.fd, blocks * SFFS_BLOCK_SIZE).catch((err: unknown) => { throw toBdsnapError(err); });
    const device = await FileDevice.open(out.procPath, { followSymlinks: true });
    try {
      await mkfs(device);
    } finally {
      await device.close();
    }
  } finally {
    await out.close();
  }
}

function checkDeviceSize(sizeBytes: number): void {
  if (sizeBytes % SFFS_BLOCK_SIZE !== 0) {
    throw new BdsnapError('EINVAL', `device size ${sizeBytes} is not a whole number of ${SFFS_BLOCK_SIZE}-byte blocks`);
  }
  if (sizeBytes < MIN_IMAGE_BLOCKS * SFFS_BLOCK_SIZE) {
    throw new BdsnapError('EINVAL', `device size ${sizeBytes} is too small: singlefilefs needs at least ${MIN_IMAGE_BLOCKS} blocks of ${SFFS_BLOCK_SIZE} bytes`);
  }
}
