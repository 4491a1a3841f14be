/**
 * SingleFileFs: the course driver's read and write of `the-file`, in user space, over any
 * BlockDevice (an image file, or an NBD export through the NBD client).
 *
 * Write semantics are the driver's, because snapshot tests compare what reaches the device:
 * - an offset past the max file size is refused (EINVAL);
 * - an offset past the file size writes nothing and returns 0 (the filesystem has no holes),
 *   and so does a write at the max file size (the file is full);
 * - one call changes at most one data block, up to that block's end (callers loop);
 * - when the file grows, block 1 (the inode) is rewritten; block 0 is only ever read.
 * Data goes to the device as the bytes written, widened to the device's minimum block size
 * (so inside the data block for any minimum up to 4096); the inode as its whole block. Writes through one instance are serialised, as the inode size is shared
 * state. Instances on separate connections may write disjoint ranges at once; two of them
 * growing the file at once can leave the smaller size on disk, as each writes its own.
 */

import type { BlockDevice } from '../../device/block-device.js';
import { BdsnapError } from '../../errors.js';
import { SerialQueue } from '../../serial-queue.js';
import {
  FIRST_DATA_BLOCK, INODE_BLOCK, SFFS_BLOCK_SIZE, SUPERBLOCK_BLOCK,
  decodeInode, decodeSuperblock, deviceOffsetOf, patchFileSize, type Inode, type Superblock,
} from './layout.js';

export class SingleFileFs {
  readonly device: BlockDevice;
  readonly superblock: Superblock;
  #inode: Inode;
  #inodeBlock: Buffer;
  readonly #writes = new SerialQueue();

  private constructor(device: BlockDevice, superblock: Superblock, inodeBlock: Buffer) {
    this.device = device;
    this.superblock = superblock;
    this.#inodeBlock = inodeBlock;
    this.#inode = decodeInode(inodeBlock);
  }

  /**
   * Read and check the superblock and inode, as mount does. Errors: EINVAL when the device
   * is not a singlefilefs image, ECORRUPT when its metadata cannot be right.
   */
  static async open(device: BlockDevice): Promise<SingleFileFs> {
    if (device.size < (FIRST_DATA_BLOCK + 1) * SFFS_BLOCK_SIZE) {
      throw new BdsnapError('EINVAL', `not a singlefilefs image: the device has ${device.size} bytes, fewer than 3 blocks`);
    }
    const sbBlock = Buffer.alloc(SFFS_BLOCK_SIZE);
    await device.read(sbBlock, SUPERBLOCK_BLOCK * SFFS_BLOCK_SIZE);
    const superblock = decodeSuperblock(sbBlock);
    const room = device.size - FIRST_DATA_BLOCK * SFFS_BLOCK_SIZE;
    if (superblock.maxFileSizeBytes > room) {
      throw new BdsnapError('ECORRUPT',
        `singlefilefs max file size ${superblock.maxFileSizeBytes} does not fit the device (${room} bytes after the metadata blocks)`);
    }
    const inodeBlock = Buffer.alloc(SFFS_BLOCK_SIZE);
    await device.read(inodeBlock, INODE_BLOCK * SFFS_BLOCK_SIZE);
    const fs = new SingleFileFs(device, superblock, inodeBlock);
    if (fs.size > superblock.maxFileSizeBytes) {
      throw new BdsnapError('ECORRUPT', `singlefilefs file size ${fs.size} is larger than the max file size ${superblock.maxFileSizeBytes}`);
    }
    return fs;
  }

  /** Current file size in bytes. */
  get size(): number {
    return this.#inode.fileSizeBytes;
  }

  get maxFileSize(): number {
    return this.superblock.maxFileSizeBytes;
  }

  get inode(): Readonly<Inode> {
    return { ...this.#inode };
  }

  /** Read up to `lengthBytes` from `offsetBytes`; nothing past the end of the file. Reads are widened like writes. */
  async read(offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    checkOffset(offsetBytes);
    if (!Number.isSafeInteger(lengthBytes) || lengthBytes < 0) throw new BdsnapError('EINVAL', `bad length ${lengthBytes}`);
    const available = Math.max(0, Math.min(lengthBytes, this.size - offsetBytes));
    if (available === 0) return Buffer.alloc(0);
    const { startBytes, endBytes } = this.#aligned(deviceOffsetOf(offsetBytes), available);
    const span = Buffer.alloc(endBytes - startBytes);
    await this.device.read(span, startBytes);
    const from = deviceOffsetOf(offsetBytes) - startBytes;
    return span.subarray(from, from + available);
  }

  /** The whole file. */
  async readAll(): Promise<Buffer> {
    return this.read(0, this.size);
  }

  /**
   * One call of the driver's write: at most the rest of one data block. Returns the bytes
   * written: 0 at an offset past the end of the file or at the max file size. Error: EINVAL
   * past the max file size (the driver answers ENOMEM there; EINVAL is our code for it).
   */
  writeOnce(offsetBytes: number, data: Buffer): Promise<number> {
    return this.#writes.run(() => this.#writeOnce(offsetBytes, data));
  }

  /**
   * Write all of `data` as a user-space caller does: call writeOnce until everything is
   * written or a call writes nothing. Returns the bytes written, which is short when the
   * offset is past the end of the file (0) or the file reached its max size.
   */
  async write(offsetBytes: number, data: Buffer): Promise<number> {
    let doneBytes = 0;
    while (doneBytes < data.length) {
      const n = await this.writeOnce(offsetBytes + doneBytes, data.subarray(doneBytes));
      if (n === 0) break;
      doneBytes += n;
    }
    return doneBytes;
  }

  /** Make every completed write durable on the device. */
  async flush(): Promise<void> {
    await this.#writes.idle();
    await this.device.flush();
  }

  async #writeOnce(offsetBytes: number, data: Buffer): Promise<number> {
    checkOffset(offsetBytes);
    if (offsetBytes > this.maxFileSize) {
      throw new BdsnapError('EINVAL', `offset ${offsetBytes} is past the max file size (${this.maxFileSize} bytes)`);
    }
    if (offsetBytes > this.size) return 0;
    const inBlockBytes = offsetBytes % SFFS_BLOCK_SIZE;
    const lengthBytes = Math.min(data.length, SFFS_BLOCK_SIZE - inBlockBytes, this.maxFileSize - offsetBytes);
    if (lengthBytes === 0) return 0;
    await this.#writeAligned(data.subarray(0, lengthBytes), deviceOffsetOf(offsetBytes));
    const endBytes = offsetBytes + lengthBytes;
    if (endBytes > this.size) {
      const inodeBlock = Buffer.from(this.#inodeBlock);
      patchFileSize(inodeBlock, endBytes);
      await this.#writeAligned(inodeBlock, INODE_BLOCK * SFFS_BLOCK_SIZE);
      this.#inodeBlock = inodeBlock;
      this.#inode = { ...this.#inode, fileSizeBytes: endBytes };
    }
    return lengthBytes;
  }

  /**
   * Write `data` at `deviceOffsetBytes`, widened by read-modify-write to the device's
   * minimum block size: NBD servers may refuse smaller or misaligned requests (bdsnap's own
   * advertises 512). Going no wider than that minimum keeps writers on separate connections
   * that share a 4096-byte block from undoing each other's bytes.
   */
  async #writeAligned(data: Buffer, deviceOffsetBytes: number): Promise<void> {
    const { startBytes, endBytes } = this.#aligned(deviceOffsetBytes, data.length);
    if (startBytes === deviceOffsetBytes && endBytes === deviceOffsetBytes + data.length) {
      await this.device.write(data, deviceOffsetBytes);
      return;
    }
    const span = Buffer.alloc(endBytes - startBytes);
    await this.device.read(span, startBytes);
    data.copy(span, deviceOffsetBytes - startBytes);
    await this.device.write(span, startBytes);
  }

  /** The range widened to the device's minimum block size (4096 if it advertises nonsense). */
  #aligned(deviceOffsetBytes: number, lengthBytes: number): { startBytes: number; endBytes: number } {
    const minimum = this.device.blockSizes.minimum;
    const alignBytes = Number.isSafeInteger(minimum) && minimum > 0 && (minimum & (minimum - 1)) === 0 ? minimum : SFFS_BLOCK_SIZE;
    const startBytes = deviceOffsetBytes - (deviceOffsetBytes % alignBytes);
    const endBytes = Math.min(this.device.size, Math.ceil((deviceOffsetBytes + lengthBytes) / alignBytes) * alignBytes);
    return { startBytes, endBytes };
  }
}

function checkOffset(offsetBytes: number): void {
  if (!Number.isSafeInteger(offsetBytes) || offsetBytes < 0) {
    throw new BdsnapError('EINVAL', `bad offset ${offsetBytes}: it must be a non-negative integer`);
  }
}
