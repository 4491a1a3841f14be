/**
 * The BlockDevice interface: what every device and every layer offers, in the way nbdkit
 * filters wrap plugins. The NBD server only ever sees this interface, so it cannot tell a
 * bare file from a device under copy-before-write or a point-in-time view.
 *
 * Offsets and lengths are plain numbers of bytes (safe up to 2^53); callers have already
 * checked ranges against `size`, but implementations still refuse out-of-range requests
 * with a BdsnapError('EINVAL' or 'ENOSPC').
 */

import { BdsnapError } from '../errors.js';
import type { CloneResult } from '../host/libc.js';
import type { DeviceStamp } from '../host/device-stamp.js';

export interface BlockSizes {
  /** Smallest I/O the device can do without read-modify-write (bytes, power of two). */
  minimum: number;
  /** I/O size that performs best (bytes, power of two). */
  preferred: number;
  /** Largest single request accepted (bytes). */
  maximum: number;
}

/** Extent flags, with the values of NBD's base:allocation context. */
export const EXTENT_HOLE = 1;
export const EXTENT_ZERO = 2;

export interface Extent {
  /** Bytes; the extents of one answer are contiguous from the requested offset. */
  length: number;
  /** EXTENT_HOLE | EXTENT_ZERO, or 0 for allocated data. */
  flags: number;
}

export interface WriteOptions {
  /** Force unit access: durable before the promise resolves. */
  fua?: boolean;
  /**
   * Asks whether more requests of the same client already wait behind this write, so that the
   * device may overlap writing it with taking them in (FileDevice: see SyncIoPolicy.syncWrite).
   * A device calls it only where its answer changes what the device does.
   */
  queued?: () => boolean;
}

export interface ZeroOptions extends WriteOptions {
  /** The range must end up allocated (no hole punched). */
  noHole?: boolean;
  /** Fail with ENOTSUP at once if zeroing would be slow (no metadata-only path). */
  fastZero?: boolean;
}

/**
 * What names a device across opens: the identity recorded in a session's manifest, checked by
 * restore, and the key of the one-opener lock. Device numbers (dev, rdev) may change across
 * reboots; kind and inode of an image file do not.
 */
// A type, not an interface: it is stored in manifests as a plain JSON record.
export type DeviceIdentity = {
  /** 'file' for a regular image, 'block' for a block device node. */
  kind: 'file' | 'block';
  dev: number;
  ino: number;
  rdev: number;
};

export interface BlockDevice {
  /** Size in bytes. */
  readonly size: number;
  readonly readOnly: boolean;
  readonly blockSizes: BlockSizes;
  /** Trim may punch holes (otherwise trim is accepted and ignored). */
  readonly canTrim: boolean;
  /** Write-zeroes has a fast (metadata-only) path. */
  readonly canFastZero: boolean;
  /**
   * A flush on any handle of this device covers writes done through every handle,
   * which lets the NBD server advertise CAN_MULTI_CONN.
   */
  readonly canMultiConn: boolean;

  /** Read `target.length` bytes at `offsetBytes` into `target` (reads land in the reply buffer). */
  read(target: Buffer, offsetBytes: number): Promise<void>;
  /**
   * Write `data` at `offsetBytes`. The caller may reuse `data` as soon as the promise settles
   * (the NBD server recycles its payload buffers), so an implementation that defers work on
   * the bytes must copy them.
   */
  write(data: Buffer, offsetBytes: number, options?: WriteOptions): Promise<void>;
  /** Make every write already completed durable. */
  flush(): Promise<void>;
  trim(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void>;
  zero(offsetBytes: number, lengthBytes: number, options?: ZeroOptions): Promise<void>;
  /** Hint: bring the range into cache. */
  cache(offsetBytes: number, lengthBytes: number): Promise<void>;
  /**
   * Allocation status from `offsetBytes`: at least one extent, contiguous, covering at
   * most `lengthBytes`. Must be cheap: qemu asks for it before nearly every read.
   */
  extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]>;
  /** Release resources; waits for requests in flight. */
  close(): Promise<void>;
  /**
   * Optional: make `lengthBytes` of the file `dstFd` at `dstOffsetBytes` share
   * the device's current content at `offsetBytes` (a reflink, FICLONERANGE), so that it reads
   * as that content whatever is written to the device later. 'unsupported' when the device
   * cannot (not an image file, another filesystem, no reflink, unaligned); the caller copies
   * instead. A layer offers it only where its reads are the reads of the device below.
   */
  cloneRangeTo?(offsetBytes: number, lengthBytes: number, dstFd: number, dstOffsetBytes: number): Promise<CloneResult>;
  /**
   * Optional hint: start writing back what was written to the range, without waiting, so that
   * the next flush has less left to do. A long sequential writer (a restore) calls it behind
   * its writes; it promises nothing about durability.
   */
  startWriteback?(offsetBytes: number, lengthBytes: number): void;
  /**
   * Optional: the stamp of the device's current content (`host/device-stamp.ts`), which any
   * write moves. A session records it at its start and end, a restore after it wrote, so that
   * a later restore can tell whether anything outside bdsnap wrote the device in between.
   */
  stamp?(): Promise<DeviceStamp | undefined>;
  /**
   * Optional, for a device whose reads happen on another thread: read `buf.length - atBytes`
   * bytes at `offsetBytes` into `buf` from `atBytes` on, by moving `buf` (which must own its
   * memory) there and back instead of copying into it. `buf` is unusable once called; the same
   * memory comes back as the Buffer returned. The NBD server reads into its reply buffer this
   * way when a device offers it, and with `read` otherwise.
   */
  readInto?(buf: Buffer, atBytes: number, offsetBytes: number): Promise<Buffer>;
  /**
   * Optional: write `data` at `offsetBytes` on the calling thread, before returning, where this
   * device's write() would have done it that way too; false (and nothing done) where it would
   * not, and the caller uses write(). Throws what write() would reject with. The NBD server
   * answers a WRITE this way without a promise; FUA writes always go through write().
   */
  writeNow?(data: Buffer, offsetBytes: number, queued?: () => boolean): boolean;
}

export type { CloneResult, DeviceStamp };

/** Throw EINVAL/ENOSPC for a range that does not fit the device. Shared by implementations. */
export function checkRange(device: Pick<BlockDevice, 'size'>, offsetBytes: number, lengthBytes: number, writing: boolean): void {
  if (!Number.isSafeInteger(offsetBytes) || !Number.isSafeInteger(lengthBytes) || offsetBytes < 0 || lengthBytes < 0) {
    throw new BdsnapError('EINVAL', `bad range: offset ${offsetBytes}, length ${lengthBytes}`);
  }
  if (offsetBytes + lengthBytes > device.size) {
    throw new BdsnapError(writing ? 'ENOSPC' : 'EINVAL',
      `range ${offsetBytes}+${lengthBytes} is past the end of the device (${device.size} bytes)`);
  }
}
