/**
 * The few libc calls Node does not expose, through the `koffi` FFI package. koffi is an
 * optional dependency: it ships prebuilt binaries in per-platform packages from the registry
 * (nothing is downloaded or compiled at install), and where it is absent or does not load,
 * `loadLibc()` returns undefined and each caller decides how to do without (the control
 * server then fails closed; see src/service/peer-cred.ts).
 *
 * Loading is lazy and happens once: the first call pays for `dlopen` (a few milliseconds),
 * later calls reuse the bound functions.
 *
 * This module imports nothing of ours, so every layer may use it.
 */

import fs from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import { fsTrace } from './fs-trace.js';

/** Credentials of the process on the other end of a unix socket, as the kernel recorded them at connect(). */
export interface PeerCred {
  pid: number;
  uid: number;
  gid: number;
}

export interface Libc {
  /**
   * getsockopt(fd, SOL_SOCKET, SO_PEERCRED): the peer's pid, uid and gid, from the kernel.
   * Throws an Error with `errno` set when the call fails (EBADF, ENOTSOCK, ENOTCONN...).
   */
  peerCred(fd: number): PeerCred;
  /**
   * lseek(fd, offset, SEEK_DATA or SEEK_HOLE): the first offset at or after `offset` that is
   * data (or a hole; the end of the file counts as one), or null when there is none (ENXIO:
   * `offset` is at or past the end, or only holes follow it for SEEK_DATA). Throws an Error
   * with `errno` set for any other failure (EINVAL where the filesystem cannot tell).
   */
  seek(fd: number, offset: number, whence: 'data' | 'hole'): number | null;
  /**
   * ioctl(dstFd, FICLONERANGE): make `lengthBytes` at `dstOffsetBytes` of the file `dstFd` share
   * the extents of `srcFd` at `srcOffsetBytes` (a reflink; the filesystem copies on a later
   * write to either side). Offsets and length must be multiples of the filesystem block size,
   * except a length that reaches the end of the source. 'unsupported' when the pair cannot be
   * cloned (EOPNOTSUPP: no reflink; EXDEV: two filesystems; EINVAL: not regular files or not
   * aligned; ENOTTY: no such ioctl); other failures reject with an Error with `errno` and
   * `code` (ENOSPC, EIO...). Runs on a worker thread: a clone waits for the inode locks held by
   * writes in flight and writes back the source range's dirty pages first.
   */
  cloneRange(srcFd: number, srcOffsetBytes: number, dstFd: number, dstOffsetBytes: number, lengthBytes: number): Promise<CloneResult>;
  /**
   * cloneRange on the calling thread: no thread hand-off, but the call blocks while the
   * filesystem waits for the inode locks and writes back dirty pages of the source range.
   */
  cloneRangeSync(srcFd: number, srcOffsetBytes: number, dstFd: number, dstOffsetBytes: number, lengthBytes: number): CloneResult;
  /**
   * sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE): start writing back the dirty
   * pages of the range without waiting for them, so that a later fdatasync finds less to do.
   * A hint only: it makes nothing durable (no metadata, no disk cache flush), and a failure is
   * ignored (false), since the fdatasync that follows reports any real error. Runs on a worker
   * thread: the call itself blocks while the disk's request queue is full (about 1 ms per
   * 8 MiB during a restore here, 0.1 s of a 1 GiB restore's main thread).
   */
  startWriteback(fd: number, offsetBytes: number, lengthBytes: number): Promise<boolean>;
  /**
   * setsockopt(fd, SOL_SOCKET, SO_SNDBUF, bytes): ask for a larger send buffer (the kernel
   * caps it at net.core.wmem_max). False when the call fails; the socket keeps its default.
   */
  setSendBuffer(fd: number, bytes: number): boolean;
  /**
   * ioctl(fd, FIONREAD) on a socket: how many received bytes wait to be read, or undefined when
   * the call fails. One system call on the calling thread.
   */
  pendingBytes(fd: number): number | undefined;
  /**
   * fcntl(fd, F_DUPFD_CLOEXEC): a second descriptor of the same open file (a socket handed to
   * another thread, which then owns it while the first is closed). Throws an Error with `errno`.
   */
  duplicate(fd: number): number;
  /**
   * ioctl(fd, LOOP_GET_STATUS64) on an open loop device: the identity of the file it is bound
   * to, as the kernel holds it (the file itself, not a name: a renamed, deleted or hard-linked
   * backing file is still recognised). Rejects with an Error with `errno` and `code` (ENXIO:
   * not bound; ENOTTY: not a loop device). Runs on a worker thread: the kernel stats the
   * backing file, which may sit on a FUSE filesystem whose server is slow.
   */
  loopBacking(fd: number): Promise<LoopBacking>;
  /**
   * flock(fd, LOCK_EX | LOCK_NB): an exclusive lock on the open file, held until every
   * descriptor of that open is closed, which the kernel does when the process exits, however it
   * ends (before it is a zombie). false when another open of the file holds a lock
   * (EWOULDBLOCK); throws an Error with `errno` for any other failure.
   */
  tryLockExclusive(fd: number): boolean;
  /**
   * setrlimit(RLIMIT_CORE, 0) and prctl(PR_SET_DUMPABLE, 0): this process never leaves a core
   * dump (which would hold the service password as typed, key material and device content),
   * not even through a core_pattern pipe, which ignores RLIMIT_CORE. Throws an Error with
   * `errno` when a call fails.
   */
  disableCoreDumps(): void;
  /**
   * malloc_trim(0): give the pages of free malloc memory back to the kernel, anywhere in the
   * heap, not only at its top. False where the C library has no malloc_trim (not glibc).
   */
  trimHeap(): boolean;
  /**
   * A non-blocking fanotify descriptor reporting each open of the file open as `fd`, and each
   * close of a descriptor of it opened for writing (FAN_OPEN, FAN_CLOSE_WRITE), by any process,
   * each event naming its pid. Throws with `errno` and `code` (EPERM without CAP_SYS_ADMIN,
   * ENOSYS where the kernel has no fanotify).
   */
  watchWriters(fd: number): number;
}

export type CloneResult = 'cloned' | 'unsupported';

/** The file behind a loop device: its st_dev and st_ino, and st_rdev when it is a device node. */
export interface LoopBacking {
  /** dev_t of the filesystem holding the backing file (see host/dev-t.ts). */
  dev: bigint;
  ino: bigint;
  /** dev_t of the backing file when it is a block device node; 0 for a regular file. */
  rdev: bigint;
}

const SOL_SOCKET = 1;
/** Which numbering of the socket options an architecture uses (x86, arm, riscv...: the generic one). */
type SocketAbi = 'generic' | 'powerpc' | 'mips';
const SOCKET_ABI_BY_ARCH: Partial<Record<NodeJS.Architecture, SocketAbi>> = {
  x64: 'generic', ia32: 'generic', arm: 'generic', arm64: 'generic', riscv64: 'generic', loong64: 'generic', s390x: 'generic',
  ppc: 'powerpc', ppc64: 'powerpc', mips: 'mips', mipsel: 'mips',
};
const SO_PEERCRED: Record<SocketAbi, number> = { generic: 17, powerpc: 21, mips: 18 };
const SO_SNDBUF: Record<SocketAbi, number> = { generic: 7, powerpc: 7, mips: 0x1001 };
const FIONREAD: Record<SocketAbi, number> = { generic: 0x541b, powerpc: 0x4004667f, mips: 0x467f };
const SEEK_DATA = 3;
const SEEK_HOLE = 4;
const SYNC_FILE_RANGE_WRITE = 2;
const RLIMIT_CORE = 4;
const PR_SET_DUMPABLE = 4;
const LOCK_EX = 2;
/** fcntl(2): duplicate onto the lowest free number, close-on-exec set. */
const F_DUPFD_CLOEXEC = 1030;
const LOCK_NB = 4;
const FAN_CLOEXEC = 0x1;
const FAN_NONBLOCK = 0x2;
const FAN_CLASS_NOTIF = 0x0;
const FAN_MARK_ADD = 0x1;
const FAN_OPEN = 0x20n;
const FAN_CLOSE_WRITE = 0x8n;
const O_LARGEFILE = 0o100000;
const ENXIO = 6;
/** struct ucred { pid_t pid; uid_t uid; gid_t gid; }: three 32-bit fields. */
const UCRED_BYTES = 12;

let koffiLoaded: { koffi: typeof import('koffi') } | { reason: string } | undefined;

/**
 * The optional koffi package, loaded once, or why it cannot be used (not installed, or its
 * binary does not load): a reason, not a crash. Other native libraries (libzstd) are bound
 * through it too.
 */
export function loadKoffi(): { koffi: typeof import('koffi') } | { reason: string } {
  if (koffiLoaded === undefined) {
    try {
      koffiLoaded = { koffi: createRequire(import.meta.url)('koffi') as typeof import('koffi') };
    } catch (err) {
      koffiLoaded = { reason: `the koffi package is not usable: ${(err as Error).message.split('\n')[0]}` };
    }
  }
  return koffiLoaded;
}

let loaded: { libc: Libc | undefined; reason: string } | undefined;

/** Why loadLibc() returned undefined, for a log line; undefined when it loaded. */
export function libcUnavailableReason(): string | undefined {
  loadLibc();
  return loaded?.libc ? undefined : loaded?.reason;
}

let heapTrimTimer: NodeJS.Timeout | undefined;

/**
 * Give free malloc memory back to the kernel `delayMs` from now (one trim for a burst of
 * calls): memory freed in a burst (request buffers, scrypt's 32 MiB blocks on the thread
 * pool's arenas) otherwise stays resident for good. Nothing where malloc_trim is missing.
 */
export function trimHeapSoon(delayMs: number): void {
  heapTrimTimer ??= setTimeout(() => {
    heapTrimTimer = undefined;
    loadLibc()?.trimHeap();
  }, delayMs).unref();
}

/** The bound libc functions, or undefined where they cannot be had (not Linux, koffi missing or broken). */
export function loadLibc(): Libc | undefined {
  loaded ??= bind();
  return loaded.libc;
}

function bind(): { libc: Libc | undefined; reason: string } {
  if (process.platform !== 'linux') return { libc: undefined, reason: `SO_PEERCRED is read only on Linux (this is ${process.platform})` };
  const abi = SOCKET_ABI_BY_ARCH[process.arch];
  if (abi === undefined) return { libc: undefined, reason: `SO_PEERCRED is not known for ${process.arch}` };
  const soPeerCred = SO_PEERCRED[abi];
  const soSndBuf = SO_SNDBUF[abi];
  const fionread = FIONREAD[abi];
  const ffi = loadKoffi();
  if (!('koffi' in ffi)) return { libc: undefined, reason: ffi.reason };
  const { koffi } = ffi;
  try {
    // `null` is the running program's own symbol table: libc is already in it, whichever libc it is.
    const lib = koffi.load(null);
    const getsockopt = lib.func('int getsockopt(int fd, int level, int optname, _Out_ uint8_t *optval, _Inout_ uint32_t *optlen)');
    const lseek = lib.func('int64_t lseek(int fd, int64_t offset, int whence)');
    const setsockopt = lib.func('int setsockopt(int fd, int level, int optname, _In_ uint8_t *optval, uint32_t optlen)');
    const syncFileRange = lib.func('int sync_file_range(int fd, int64_t offset, int64_t nbytes, unsigned int flags)');
    const flock = lib.func('int flock(int fd, int operation)');
    const setrlimit = lib.func('int setrlimit(int resource, _In_ uint8_t *rlim)');
    const prctl = lib.func('int prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4, unsigned long arg5)');
    const mallocTrim = optionalFunc(lib, 'int malloc_trim(size_t pad)');
    const fcntl = lib.func('int fcntl(int fd, int cmd, ...)');
    const ioctlInt = lib.func('ioctl', 'int', ['int', 'unsigned long', '_Out_ int *']);
    const fanotifyInit = optionalFunc(lib, 'int fanotify_init(unsigned int flags, unsigned int event_f_flags)');
    const fanotifyMark = optionalFunc(lib, 'int fanotify_mark(int fd, unsigned int flags, uint64_t mask, int dirfd, const char *path)');
    const pending = [0];
    const libc: Libc = {
      peerCred(fd: number): PeerCred {
        const ucred = Buffer.alloc(UCRED_BYTES);
        const optlen = new Uint32Array([UCRED_BYTES]);
        const rc = getsockopt(fd, SOL_SOCKET, soPeerCred, ucred, optlen) as number;
        if (rc !== 0) {
          const errno = koffi.errno();
          throw Object.assign(new Error(`getsockopt(SO_PEERCRED) on descriptor ${fd} failed (errno ${errno})`), { errno });
        }
        if (optlen[0] !== UCRED_BYTES) throw new Error(`getsockopt(SO_PEERCRED) returned ${optlen[0]} bytes, expected ${UCRED_BYTES}`);
        return { pid: ucred.readInt32LE(0), uid: ucred.readUInt32LE(4), gid: ucred.readUInt32LE(8) };
      },
      seek(fd: number, offset: number, whence: 'data' | 'hole'): number | null {
        const at = Number(lseek(fd, offset, whence === 'data' ? SEEK_DATA : SEEK_HOLE) as number | bigint);
        if (at >= 0) return at;
        const errno = koffi.errno();
        if (errno === ENXIO) return null;
        throw Object.assign(new Error(`lseek(SEEK_${whence.toUpperCase()}) on descriptor ${fd} at ${offset} failed (errno ${errno})`), { errno });
      },
      ...bindCloneRange(koffi, lib),
      ...bindLoopBacking(koffi, lib),
      setSendBuffer(fd: number, bytes: number): boolean {
        const value = Buffer.alloc(4);
        value.writeInt32LE(bytes);
        return (setsockopt(fd, SOL_SOCKET, soSndBuf, value, 4) as number) === 0;
      },
      pendingBytes(fd: number): number | undefined {
        return (ioctlInt(fd, fionread, pending) as number) === 0 ? pending[0] : undefined;
      },
      duplicate(fd: number): number {
        const copy = fcntl(fd, F_DUPFD_CLOEXEC, 'int', 0) as number;
        if (copy >= 0) return copy;
        const errno = koffi.errno();
        throw Object.assign(new Error(`cannot duplicate descriptor ${fd}: ${errnoName(errno) ?? `errno ${errno}`}`), { errno, code: errnoName(errno) });
      },
      tryLockExclusive(fd: number): boolean {
        if ((flock(fd, LOCK_EX | LOCK_NB) as number) === 0) return true;
        const errno = koffi.errno();
        if (errno === os.constants.errno.EWOULDBLOCK) return false;
        throw Object.assign(new Error(`flock on descriptor ${fd} failed: ${errnoName(errno) ?? `errno ${errno}`}`), { errno, code: errnoName(errno) });
      },
      disableCoreDumps(): void {
        // struct rlimit { rlim_t cur, max; }, both 0; 16 bytes cover a 64-bit rlim_t.
        if ((setrlimit(RLIMIT_CORE, Buffer.alloc(16)) as number) !== 0 || (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) as number) !== 0) {
          const errno = koffi.errno();
          throw Object.assign(new Error(`cannot disable core dumps: ${errnoName(errno) ?? `errno ${errno}`}`), { errno });
        }
      },
      watchWriters(fd: number): number {
        const failed = (call: string, errno: number): Error =>
          Object.assign(new Error(`${call} for descriptor ${fd} failed: ${errnoName(errno) ?? `errno ${errno}`}`), { errno, code: errnoName(errno) });
        if (fanotifyInit === undefined || fanotifyMark === undefined) throw failed('fanotify', os.constants.errno.ENOSYS);
        const group = fanotifyInit(FAN_CLOEXEC | FAN_NONBLOCK | FAN_CLASS_NOTIF, fs.constants.O_RDONLY | O_LARGEFILE) as number;
        if (group < 0) throw failed('fanotify_init', koffi.errno());
        // No path: the mark is on the file `fd` is open on, whatever name it has now.
        if ((fanotifyMark(group, FAN_MARK_ADD, FAN_OPEN | FAN_CLOSE_WRITE, fd, null) as number) < 0) {
          const errno = koffi.errno();
          fs.closeSync(group);
          throw failed('fanotify_mark', errno);
        }
        return group;
      },
      trimHeap(): boolean {
        if (mallocTrim === undefined) return false;
        mallocTrim(0);
        return true;
      },
      startWriteback(fd: number, offsetBytes: number, lengthBytes: number): Promise<boolean> {
        if (!(lengthBytes > 0)) return Promise.resolve(false);
        return new Promise((resolve) => {
          syncFileRange.async(fd, offsetBytes, lengthBytes, SYNC_FILE_RANGE_WRITE, (err: unknown, rc: number) => resolve(!err && rc === 0));
        });
      },
    };
    return { libc, reason: '' };
  } catch (err) {
    return { libc: undefined, reason: `libc could not be bound through koffi: ${(err as Error).message}` };
  }
}

/** A function the C library may lack (musl has no malloc_trim), or undefined. */
function optionalFunc(lib: ReturnType<typeof import('koffi').load>, signature: string): ReturnType<ReturnType<typeof import('koffi').load>['func']> | undefined {
  try {
    return lib.func(signature);
  } catch {
    return undefined;
  }
}

/** _IOW(0x94, 13, struct file_clone_range): the direction bits differ on powerpc and mips. */
const FICLONERANGE_BY_ARCH: Partial<Record<NodeJS.Architecture, number>> = {
  x64: 0x4020940d, ia32: 0x4020940d, arm: 0x4020940d, arm64: 0x4020940d, riscv64: 0x4020940d, loong64: 0x4020940d, s390x: 0x4020940d,
  ppc: 0x8020940d, ppc64: 0x8020940d, mips: 0x8020940d, mipsel: 0x8020940d,
};
/** The errno values that mean "this pair cannot be cloned", not "something broke". */
const CLONE_UNSUPPORTED_ERRNO = new Set([95 /* EOPNOTSUPP */, 18 /* EXDEV */, 22 /* EINVAL */, 25 /* ENOTTY */]);

function bindCloneRange(koffi: typeof import('koffi'), lib: ReturnType<typeof import('koffi').load>): Pick<Libc, 'cloneRange' | 'cloneRangeSync'> {
  const request = FICLONERANGE_BY_ARCH[process.arch];
  if (request === undefined) return { cloneRange: () => Promise.resolve('unsupported'), cloneRangeSync: () => 'unsupported' };
  // struct file_clone_range { s64 src_fd; u64 src_offset; u64 src_length; u64 dest_offset; }, passed
  // as a koffi struct: koffi copies it into the call's own memory, which lives until the worker
  // thread is done. (A Buffer passed as `void *` is not kept alive by an asynchronous call: once
  // collected, the worker read freed memory and cloned with whatever it found there.)
  const fileCloneRange = koffi.struct({ src_fd: 'int64_t', src_offset: 'uint64_t', src_length: 'uint64_t', dest_offset: 'uint64_t' });
  // Declared with a pointer third argument: ioctl's variadic argument is passed the same way on Linux ABIs.
  const ioctl = lib.func('ioctl', 'int', ['int', 'unsigned long', koffi.pointer(fileCloneRange)]);
  const argument = (srcFd: number, srcOffsetBytes: number, dstOffsetBytes: number, lengthBytes: number): Record<string, number> => {
    // A length of 0 would mean "to the end of the source": never ask for that by accident.
    if (!(lengthBytes > 0)) throw new Error(`cloneRange: length must be positive, got ${lengthBytes}`);
    return { src_fd: srcFd, src_offset: srcOffsetBytes, src_length: lengthBytes, dest_offset: dstOffsetBytes };
  };
  // The ioctl is issued on the destination, naming the source inside the argument.
  const outcome = (rc: number, lengthBytes: number, traced?: () => void): CloneResult => {
    if (rc === 0) {
      traced?.();
      return 'cloned';
    }
    const errno = koffi.errno();
    if (CLONE_UNSUPPORTED_ERRNO.has(errno)) return 'unsupported';
    const code = errnoName(errno);
    throw Object.assign(new Error(`ioctl(FICLONERANGE) of ${lengthBytes} bytes failed: ${code ?? `errno ${errno}`}`), { errno, code });
  };
  return {
    cloneRange: (srcFd, srcOffsetBytes, dstFd, dstOffsetBytes, lengthBytes) => new Promise((resolve, reject) => {
      const arg = argument(srcFd, srcOffsetBytes, dstOffsetBytes, lengthBytes);
      // koffi hands the worker thread's errno of a failed asynchronous call back with its callback.
      ioctl.async(dstFd, request, arg, (err: unknown, rc: number) => {
        if (err) {
          reject(err instanceof Error ? err : new Error(String(err)));
          return;
        }
        try {
          resolve(outcome(rc, lengthBytes, fsTrace && (() => fsTrace?.record({ op: 'clone', srcFd, srcPosition: srcOffsetBytes, fd: dstFd, position: dstOffsetBytes, lengthBytes }))));
        } catch (e) {
          reject(e as Error);
        }
      });
    }),
    cloneRangeSync: (srcFd, srcOffsetBytes, dstFd, dstOffsetBytes, lengthBytes) =>
      outcome(ioctl(dstFd, request, argument(srcFd, srcOffsetBytes, dstOffsetBytes, lengthBytes)) as number, lengthBytes, fsTrace && (() => fsTrace?.record({ op: 'clone', srcFd, srcPosition: srcOffsetBytes, fd: dstFd, position: dstOffsetBytes, lengthBytes }))),
  };
}

/** _IO('L', 0x05): no direction or size bits, the same number on every architecture. */
const LOOP_GET_STATUS64 = 0x4c05;
/**
 * struct loop_info64: lo_device, lo_inode, lo_rdevice (u64 each) lead; the rest (offsets,
 * flags, names, 232 bytes in all) is not read. Kept larger than the struct on purpose.
 */
const LOOP_INFO64_BYTES = 256;

function bindLoopBacking(koffi: typeof import('koffi'), lib: ReturnType<typeof import('koffi').load>): Pick<Libc, 'loopBacking'> {
  const ioctl = lib.func('ioctl', 'int', ['int', 'unsigned long', '_Out_ uint8_t *']);
  const little = os.endianness() === 'LE';
  const u64 = (b: Buffer, at: number): bigint => (little ? b.readBigUInt64LE(at) : b.readBigUInt64BE(at));
  return {
    loopBacking: (fd) => new Promise((resolve, reject) => {
      // `info` is referenced by the callback, so it outlives the worker thread's call.
      const info = Buffer.alloc(LOOP_INFO64_BYTES);
      ioctl.async(fd, LOOP_GET_STATUS64, info, (err: unknown, rc: number) => {
        if (err) {
          reject(err instanceof Error ? err : new Error(String(err)));
          return;
        }
        if (rc !== 0) {
          const errno = koffi.errno();
          const code = errnoName(errno);
          reject(Object.assign(new Error(`ioctl(LOOP_GET_STATUS64) on descriptor ${fd} failed: ${code ?? `errno ${errno}`}`), { errno, code }));
          return;
        }
        resolve({ dev: u64(info, 0), ino: u64(info, 8), rdev: u64(info, 16) });
      });
    }),
  };
}

/** 'ENOSPC' for 28...: the `code` Node gives its own system errors, so callers branch alike. */
function errnoName(errno: number): string | undefined {
  return Object.entries(os.constants.errno).find(([, value]) => value === errno)?.[0];
}
