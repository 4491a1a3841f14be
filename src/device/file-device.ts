/**
 * FileDevice: a regular image file or a block device node as a BlockDevice.
 *
 * - Every read and write loops until the whole range is done (short transfers happen on
 *   block devices and under signals).
 * - The name is looked up once, by open(2) with O_NOFOLLOW; kind, identity and size come from
 *   that descriptor. Whoever can write the image's directory may swap the name for a link to
 *   a root-only file or disk between two lookups, so there is no second one.
 * - A block device's size comes from sysfs, not from stat (stat says 0 for a device node).
 * - One process opens one image at a time: an exclusive lock keyed by the file's identity
 *   (dev:ino, or rdev for device nodes) is taken at open, so a second server of the same
 *   image fails with EBUSY instead of corrupting it. Block devices are also opened O_EXCL,
 *   which the kernel refuses while the device is mounted or claimed elsewhere.
 * - close() refuses new requests at once (ESHUTDOWN) and closes the descriptor only after every
 *   request in flight has settled: a late write can never land on a descriptor number that the
 *   process has meanwhile reused for another file.
 * - Node has no fallocate, so trim is advisory (accepted, nothing punched) and write-zeroes
 *   writes zeroes.
 * - Extents (base:allocation): the holes of a sparse image file, found with SEEK_DATA and
 *   SEEK_HOLE through libc (src/host/libc.ts), report as holes that read as zeroes, so a
 *   copy or a backup need not read them. Where that cannot be had (koffi missing, a block
 *   device, a filesystem that refuses the call) everything reports as allocated data, which
 *   is always true enough: a reader then reads zeroes.
 */

import fs from 'node:fs';
import { BdsnapError, toBdsnapError } from '../errors.js';
import { blockDeviceSizeBytes, fileStampOfFd, readDeviceStamp, type DeviceStamp } from '../host/device-stamp.js';
import { closeFd, fdatasyncFd, openFd, preadFully, preadFullySync, pwriteFully, pwriteFullySync } from '../host/fd-io.js';
import { WriteWatch } from '../host/write-watch.js';
import { formatDevT } from '../host/dev-t.js';
import { loadLibc, type Libc } from '../host/libc.js';
import {
  EXTENT_HOLE, EXTENT_ZERO, checkRange, type BlockDevice, type BlockSizes, type CloneResult, type DeviceIdentity, type Extent, type WriteOptions,
  type ZeroOptions,
} from './block-device.js';
import { acquireDeviceLock, type DeviceLock } from './device-lock.js';
import { SyncIoPolicy } from './sync-io-policy.js';

/** Largest buffer of zeroes written at once by zero(). */
const ZERO_BUFFER_BYTES = 1 << 20;
let zeroBuffer: Buffer | undefined;

export interface FileDeviceOptions {
  readOnly?: boolean;
  /** Skip the one-opener lock (for a second handle inside the same process). Default false. */
  shared?: boolean;
  /**
   * Follow a symbolic link at the end of `path`. Only for names no other user can change, such
   * as /proc/self/fd/N: by default a link there is refused, since whoever can write the image's
   * directory could otherwise point it at any file or disk.
   */
  followSymlinks?: boolean;
  /** Refuse to open anything but this file (the identity recorded when the name was registered). */
  expectIdentity?: DeviceIdentity;
  /** Which transfers run synchronously (default: sizes from the environment; see sync-io-policy.ts). */
  syncIo?: SyncIoPolicy;
}

function sameIdentity(a: DeviceIdentity, b: DeviceIdentity): boolean {
  return a.kind === b.kind && (a.kind === 'block' ? a.rdev === b.rdev : a.dev === b.dev && a.ino === b.ino);
}

function describeIdentity(identity: DeviceIdentity): string {
  return identity.kind === 'block' ? `block device ${formatDevT(identity.rdev)}` : `file ${formatDevT(identity.dev)}:${identity.ino}`;
}

function openError(path: string, err: unknown): BdsnapError {
  const e = toBdsnapError(err);
  const code = (err as NodeJS.ErrnoException).code;
  if (code === 'ELOOP') {
    return new BdsnapError('EPERM', `${path} is a symbolic link; bdsnap opens an image only by its real path, so that a link planted there cannot point it at another file: give the path of the image itself`, { cause: err });
  }
  if (code === 'ENOENT') return new BdsnapError('ENOENT', `cannot open ${path}: ${e.message}`, { cause: err });
  if (code === 'EISDIR') return new BdsnapError('EINVAL', `${path} is neither a regular image file nor a block device`, { cause: err });
  if (e.code === 'EBUSY') return new BdsnapError('EBUSY', `${path} is busy: mounted or claimed by another program`, { cause: err });
  return new BdsnapError(e.code, `cannot open ${path}: ${e.message}`, { cause: err });
}

export class FileDevice implements BlockDevice {
  readonly path: string;
  readonly size: number;
  readonly readOnly: boolean;
  readonly blockSizes: BlockSizes;
  readonly canTrim = false;
  readonly canFastZero = false;
  readonly canMultiConn = true;
  readonly identity: DeviceIdentity;
  #fd: number;
  #lock: DeviceLock | undefined;
  #closed = false;
  /** Set once SEEK_DATA failed on this file: extents are then all data. */
  #noHoles = false;
  #inFlight = 0;
  /** Resolved when #inFlight drops to 0 after close() began. */
  #drained: (() => void) | undefined;
  readonly #syncIo: SyncIoPolicy;

  private constructor(
    path: string, fd: number, size: number, readOnly: boolean, identity: DeviceIdentity, lock: DeviceLock | undefined, syncIo: SyncIoPolicy,
  ) {
    this.path = path;
    this.#syncIo = syncIo;
    this.#fd = fd;
    this.size = size;
    this.readOnly = readOnly;
    this.identity = identity;
    this.#lock = lock;
    this.blockSizes = { minimum: 512, preferred: 4096, maximum: 32 * 1024 * 1024 };
  }

  /**
   * Open an image file or block device node. The name is looked up once, without following a
   * symbolic link at its end, and everything else (kind, identity, size, the lock) comes from
   * the descriptor: a name swapped between a check and the open cannot make this device another
   * file. Errors: ENOENT, EPERM (a symbolic link, or not `expectIdentity`), EBUSY, EINVAL (not a
   * file or device).
   */
  static async open(path: string, options: FileDeviceOptions = {}): Promise<FileDevice> {
    const readOnly = options.readOnly ?? false;
    const accessFlags = readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR;
    // O_NONBLOCK: a FIFO planted under the name must not hang the open (it changes nothing
    // for regular files and block devices); O_NOCTTY: nor may a terminal become ours.
    const { O_NOFOLLOW, O_NONBLOCK, O_NOCTTY, O_RDONLY, O_EXCL } = fs.constants;
    let fd: number;
    try {
      // Read-only until the lock is held: an open refused for the lock (another bdsnap process
      // holds the device) then never had the device open for writing, which the holder would
      // count as a writer around it (src/host/write-watch.ts).
      fd = await openFd(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | (options.followSymlinks ? 0 : O_NOFOLLOW));
    } catch (err) {
      throw openError(path, err);
    }
    let lock: DeviceLock | undefined;
    try {
      const st = fs.fstatSync(fd);
      const kind = st.isBlockDevice() ? 'block' : st.isFile() ? 'file' : undefined;
      if (!kind) throw new BdsnapError('EINVAL', `${path} is neither a regular image file nor a block device`);
      const identity: DeviceIdentity = { kind, dev: st.dev, ino: st.ino, rdev: st.rdev };
      if (options.expectIdentity !== undefined && !sameIdentity(identity, options.expectIdentity)) {
        throw new BdsnapError('EPERM', `${path} is no longer the ${describeIdentity(options.expectIdentity)} registered under that name ` +
          `(it is now ${describeIdentity(identity)}); it is not opened: put the image back, or deactivate it and register it again`);
      }
      lock = options.shared ? undefined : await acquireDeviceLock(path, identity);
      // O_EXCL claims a disk itself (whatever node names it) and fails while it is mounted.
      const exclusive = kind === 'block' && !options.shared;
      if (!readOnly || exclusive) {
        // Reopening the descriptor's own /proc name keeps it the file or node checked above.
        const reopened = await openFd(`/proc/self/fd/${fd}`, accessFlags | (exclusive ? O_EXCL : O_NONBLOCK | O_NOCTTY)).catch((err: unknown) => {
          throw openError(path, err);
        });
        fs.closeSync(fd);
        fd = reopened;
      }
      const size = kind === 'block' ? await blockDeviceSizeBytes(path, st.rdev) : st.size;
      return new FileDevice(path, fd, size, readOnly, identity, lock, options.syncIo ?? new SyncIoPolicy());
    } catch (err) {
      fs.closeSync(fd);
      await lock?.release();
      throw err;
    }
  }

  async read(target: Buffer, offsetBytes: number): Promise<void> {
    this.#checkOpen();
    checkRange(this, offsetBytes, target.length, false);
    if (this.#syncIo.sync(target.length)) {
      this.#syncIo.run(target.length, () => this.#readSync(target, offsetBytes));
      return;
    }
    await this.#tracked(async () => {
      const done = await preadFully(this.#fd, target, offsetBytes);
      // The file shrank under us; what is past its end reads as zeroes.
      if (done < target.length) target.fill(0, done);
    });
  }

  async write(data: Buffer, offsetBytes: number, options?: WriteOptions): Promise<void> {
    if (!this.writeNow(data, offsetBytes, options?.queued)) await this.#tracked(() => pwriteFully(this.#fd, data, offsetBytes));
    if (options?.fua) await this.flush();
  }

  writeNow(data: Buffer, offsetBytes: number, queued?: () => boolean): boolean {
    this.#checkOpen();
    this.#checkWritable();
    checkRange(this, offsetBytes, data.length, true);
    if (!this.#syncIo.syncWrite(data.length, queued)) return false;
    this.#syncIo.run(data.length, () => this.#writeSync(data, offsetBytes));
    return true;
  }

  /** Watch writes by other processes to what this device has open (see host/write-watch.ts), or why that cannot be done here. */
  watchWrites(): WriteWatch | { reason: string } {
    this.#checkOpen();
    const { kind, dev, ino, rdev } = this.identity;
    return WriteWatch.start(this.#fd, kind === 'file'
      ? { kind, dev: BigInt(dev), ino: BigInt(ino) }
      : { kind, majorMinors: new Set([formatDevT(BigInt(rdev))]) });
  }

  /**
   * The device's stamp: an image file's from the descriptor this device writes through; a
   * block device's from sysfs, refused if the node now names another device.
   */
  async stamp(): Promise<DeviceStamp | undefined> {
    this.#checkOpen();
    if (this.identity.kind === 'file') return fileStampOfFd(this.#fd);
    const stamp = await readDeviceStamp(this.path);
    if (stamp.kind !== 'block' || stamp.majorMinor !== formatDevT(this.identity.rdev)) {
      throw new BdsnapError('EIO', `${this.path} no longer names the block device ${formatDevT(this.identity.rdev)} this device opened`);
    }
    return stamp;
  }

  async flush(): Promise<void> {
    this.#checkOpen();
    if (this.readOnly) return;
    await this.#tracked(() => fdatasyncFd(this.#fd));
  }

  async trim(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    this.#checkOpen();
    this.#checkWritable();
    checkRange(this, offsetBytes, lengthBytes, true);
    // Advisory: nothing is discarded, so the data stays as it was (allowed by NBD).
    if (options?.fua) await this.flush();
  }

  async zero(offsetBytes: number, lengthBytes: number, options?: ZeroOptions): Promise<void> {
    this.#checkOpen();
    this.#checkWritable();
    checkRange(this, offsetBytes, lengthBytes, true);
    if (options?.fastZero) throw new BdsnapError('ENOTSUP', 'fast zero is not supported by this device');
    zeroBuffer ??= Buffer.alloc(ZERO_BUFFER_BYTES);
    const zeroes = zeroBuffer;
    // One tracked request from the first piece to the last, so close() cannot cut it in half.
    await this.#tracked(async () => {
      let done = 0;
      while (done < lengthBytes) {
        const n = Math.min(ZERO_BUFFER_BYTES, lengthBytes - done);
        const piece = zeroes.subarray(0, n);
        if (this.#syncIo.sync(n)) this.#syncIo.run(n, () => this.#writeSync(piece, offsetBytes + done));
        else await pwriteFully(this.#fd, piece, offsetBytes + done);
        done += n;
      }
      if (options?.fua) await fdatasyncFd(this.#fd);
    });
  }

  async cache(offsetBytes: number, lengthBytes: number): Promise<void> {
    this.#checkOpen();
    checkRange(this, offsetBytes, lengthBytes, false);
  }

  async extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    this.#checkOpen();
    checkRange(this, offsetBytes, lengthBytes, false);
    const libc = this.identity.kind === 'file' && !this.#noHoles ? loadLibc() : undefined;
    if (!libc || lengthBytes === 0) return [{ length: lengthBytes, flags: 0 }];
    try {
      return holeMap(libc, this.#fd, offsetBytes, offsetBytes + lengthBytes);
    } catch {
      // The filesystem cannot tell (EINVAL and the like): say data, and stop asking.
      this.#noHoles = true;
      return [{ length: lengthBytes, flags: 0 }];
    }
  }

  /** Refuse new requests, wait for those in flight, then close the descriptor and drop the lock. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#inFlight > 0) await new Promise<void>((resolve) => { this.#drained = resolve; });
    try {
      await closeFd(this.#fd);
    } finally {
      await this.#lock?.release();
    }
  }

  /** Requests started so far and not yet settled (for tests and diagnostics). */
  get requestsInFlight(): number {
    return this.#inFlight;
  }

  /**
   * Reflink the range into `dstFd` (see BlockDevice.cloneRangeTo): an image file on a
   * filesystem with reflink (XFS, btrfs) and a destination on the same filesystem. A block
   * device node, or a process without the libc binding, answers 'unsupported'.
   * Errors: ENOSPC, EIO (the clone was possible but failed).
   */
  async cloneRangeTo(offsetBytes: number, lengthBytes: number, dstFd: number, dstOffsetBytes: number): Promise<CloneResult> {
    this.#checkOpen();
    checkRange(this, offsetBytes, lengthBytes, false);
    const libc = this.identity.kind === 'file' ? loadLibc() : undefined;
    if (libc === undefined || lengthBytes === 0) return 'unsupported';
    // A clone of a clean range is a few tens of microseconds (on XFS, 9 MiB in about 0.1 ms):
    // on this thread while clones stay fast (the same policy as large transfers), else on
    // koffi's worker thread.
    const asBytes = this.#syncIo.cloneBytes(lengthBytes);
    if (this.#syncIo.sync(asBytes)) {
      try {
        return this.#syncIo.run(asBytes, () => libc.cloneRangeSync(this.#fd, offsetBytes, dstFd, dstOffsetBytes, lengthBytes));
      } catch (err) {
        throw toBdsnapError(err);
      }
    }
    return this.#tracked(() => libc.cloneRange(this.#fd, offsetBytes, dstFd, dstOffsetBytes, lengthBytes));
  }

  /**
   * See BlockDevice.startWriteback: sync_file_range(SYNC_FILE_RANGE_WRITE) through libc, for an
   * image file and a block device alike; nothing where the libc binding is missing.
   */
  startWriteback(offsetBytes: number, lengthBytes: number): void {
    const libc = loadLibc();
    if (this.#closed || this.readOnly || !libc) return;
    // Counted like any request, so that close() waits and the descriptor cannot be reused under it.
    void this.#tracked(() => libc.startWriteback(this.#fd, offsetBytes, lengthBytes));
  }

  /**
   * Run `write` with this device's descriptor, for a writer on another thread (a piece worker
   * writing a piece straight into the target); counted like a request, so that close() waits
   * for it and the descriptor cannot be reused under it.
   */
  writeThroughDescriptor<T>(write: (fd: number) => Promise<T>): Promise<T> {
    this.#checkOpen();
    this.#checkWritable();
    return this.#tracked(() => write(this.#fd));
  }

  // Small transfers are done synchronously, and large ones while they stay fast (see
  // sync-io-policy.ts): a page-cache hit costs less than the thread-pool round trip (measured:
  // 4 KiB random I/O through the NBD server went from about 0.5x to about 0.9x of nbdkit).
  #readSync(target: Buffer, offsetBytes: number): void {
    let done: number;
    try {
      done = preadFullySync(this.#fd, target, offsetBytes);
    } catch (err) {
      throw toBdsnapError(err);
    }
    // The file shrank under us; what is past its end reads as zeroes.
    if (done < target.length) target.fill(0, done);
  }

  #writeSync(data: Buffer, offsetBytes: number): void {
    try {
      pwriteFullySync(this.#fd, data, offsetBytes);
    } catch (err) {
      throw toBdsnapError(err);
    }
  }

  #checkOpen(): void {
    if (this.#closed) throw new BdsnapError('ESHUTDOWN', `${this.path} is closed`);
  }

  #checkWritable(): void {
    if (this.readOnly) throw new BdsnapError('EPERM', `${this.path} is open read-only`);
  }

  /** Run an asynchronous request on the descriptor, counted so that close() waits for it. */
  async #tracked<T>(fn: () => Promise<T>): Promise<T> {
    this.#inFlight++;
    try {
      return await fn();
    } catch (err) {
      throw toBdsnapError(err);
    } finally {
      if (--this.#inFlight === 0) this.#drained?.();
    }
  }
}

/** Most extents in one answer; the protocol lets an answer stop short of the range asked. */
const MAX_EXTENTS = 1024;

/**
 * Data and holes of [from, to) by SEEK_DATA / SEEK_HOLE. Page-cache data not yet written back
 * is data to both calls, so the map is exact for the file's current content.
 */
function holeMap(libc: Libc, fd: number, from: number, to: number): Extent[] {
  const out: Extent[] = [];
  let at = from;
  while (at < to && out.length < MAX_EXTENTS) {
    const data = libc.seek(fd, at, 'data');
    const holeEnd = data === null ? to : Math.min(data, to);
    if (holeEnd > at) {
      out.push({ length: holeEnd - at, flags: EXTENT_HOLE | EXTENT_ZERO });
      at = holeEnd;
      if (at >= to) break;
    }
    const hole = libc.seek(fd, at, 'hole');
    const dataEnd = hole === null ? to : Math.min(hole, to);
    if (dataEnd <= at) throw new Error(`SEEK_HOLE at ${at} went backwards`);
    out.push({ length: dataEnd - at, flags: 0 });
    at = dataEnd;
  }
  return out;
}
