/**
 * When a FileDevice transfer runs synchronously on the calling thread instead of on libuv's
 * thread pool.
 *
 * A page-cache hit is a memory copy: about 0.1-0.3 ms per MiB here, less than the thread-pool
 * round trip around it (two thread hand-offs, each a context switch, which cost several
 * microseconds on bare metal and far more in a virtual machine). So:
 * - transfers up to `smallMaxBytes` (64 KiB) are always synchronous: a cache miss blocks the
 *   event loop for one small I/O;
 * - larger ones, up to `largeMaxBytes` (4 MiB), are synchronous while they stay fast. One that
 *   takes longer than SLOW_FLOOR_MS plus SLOW_MS_PER_MIB per MiB (the data was not in the page
 *   cache, or the kernel throttled a writer with too many dirty pages, which sleeps for
 *   milliseconds at a time) sends large transfers back to the thread pool for BACKOFF_MS, where
 *   a slow disk delays only the request that waits for it. The floor is there because a page-
 *   cache copy of 256 KiB took up to 1.3 ms here when the thread lost its core for a moment:
 *   without it, large transfers spent most of an `nbdcopy` on the thread pool.
 *
 * Reflink clones of a range (FileDevice.cloneRangeTo) follow the same policy, each counted as
 * one transfer of at most `largeMaxBytes` (cloneBytes).
 *
 * Large writes have a limit of their own, `largeWriteMaxBytes` (by default the same 4 MiB), so
 * they can be sent to the thread pool while large reads and clones stay synchronous: a client
 * keeps several writes in flight on one connection, and a synchronous 1 MiB pwrite holds the
 * connection's thread while the next requests wait in its socket. Measured both ways on a quiet
 * machine (load 1.5-1.9), alternating, BDSNAP_SYNC_IO_LARGE_WRITE_MAX_BYTES=0 (large writes on
 * the thread pool) against the default:
 * - `node dist/bench/run.js --rows seq-write,nbdcopy-write,first-seq --repeat 3 --quick`, two
 *   runs each: seq-write 1.04x and 1.05x of nbdkit on the pool against 1.23x and 1.29x
 *   synchronous; nbdcopy-write 0.53x and 0.56x against 0.69x and 0.66x; first-seq 0.88x and
 *   1.13x against 0.96x and 0.98x;
 * - `bash bench/by-hand.sh seq-write 4` (a fresh server and one 1 GiB fio pass per run), two runs
 *   each: bdsnap / nbdkit median 0.73 on the pool against 0.69 synchronous.
 * The default stays synchronous: the pool's small gain on a single short pass does not pay
 * for what it loses on the rows.
 *
 * One case goes to the pool all the same (`queuedWritesOnPool`, which `bdsnap serve`'s workers
 * set to "the server has one connection"): a large write with more requests of its client
 * already waiting behind it (the NBD connection's `queued` probe: others in flight, or bytes in
 * the socket unread). Then the pool overlaps writing one with taking in the next, which one
 * thread cannot; with several connections the others keep the thread busy and the hand-offs
 * cost more than they give (nbdcopy's four connections: 0.52x of nbdkit on the pool against
 * 1.0x synchronous), and a client at depth one has nothing to overlap (it waits for each reply).
 * Measured by hand, this code against the code before in turns (`bash bench/by-hand.sh
 * seq-write 3`, fifteen runs each, load 1.2-1.9): depth 4 0.82 (0.54-1.05) of nbdkit against
 * 0.72 (0.61-0.92); with `FIO_OPTIONS=--iodepth=1` 0.95 (0.73-1.02) against 0.90 (0.75-1.13).
 * An older measurement, of all large transfers at once (fio's 1 MiB writes at depth 4 against
 * nbdkit): 0.90x on the thread pool, 1.04x synchronous. A session's first
 * 1 MiB writes on XFS, cloned: 954-1,041 MB/s with clones on koffi's worker thread, 1,114-1,128
 * MB/s synchronous (two of three runs).
 * BDSNAP_SYNC_IO_MAX_BYTES, BDSNAP_SYNC_IO_LARGE_MAX_BYTES and BDSNAP_SYNC_IO_LARGE_WRITE_MAX_BYTES
 * override the three sizes (0 turns any off).
 */

import { performance } from 'node:perf_hooks';

/** A large transfer slower than this, plus SLOW_MS_PER_MIB per MiB, did not come from (or go to) the page cache alone. */
export const SLOW_FLOOR_MS = 4;
export const SLOW_MS_PER_MIB = 2;
/** How long large transfers stay on the thread pool after a slow one. */
export const BACKOFF_MS = 250;

const MiB = 1024 * 1024;

export class SyncIoPolicy {
  #largeOffUntilMs = -Infinity;

  constructor(
    readonly smallMaxBytes = sizeFromEnv('BDSNAP_SYNC_IO_MAX_BYTES', 64 * 1024),
    readonly largeMaxBytes = sizeFromEnv('BDSNAP_SYNC_IO_LARGE_MAX_BYTES', 4 * MiB),
    readonly largeWriteMaxBytes = sizeFromEnv('BDSNAP_SYNC_IO_LARGE_WRITE_MAX_BYTES', 4 * MiB),
    /**
     * Whether a large write that has requests queued behind it goes to the thread pool: true
     * while the server serves one connection alone (see the module's comment).
     */
    readonly queuedWritesOnPool: () => boolean = () => false,
  ) {}

  /** Whether a transfer of `bytes` should run synchronously (now, or at `nowMs`). */
  sync(bytes: number, nowMs?: number): boolean {
    if (bytes <= this.smallMaxBytes) return true;
    return bytes <= this.largeMaxBytes && (nowMs ?? performance.now()) >= this.#largeOffUntilMs;
  }

  /**
   * Whether a write of `bytes` should run synchronously: as sync(), a large one only up to
   * `largeWriteMaxBytes`, and not when `queuedWritesOnPool()` and then `queued()` (other
   * requests wait behind it) say so; neither is asked about a small write.
   */
  syncWrite(bytes: number, queued?: () => boolean, nowMs?: number): boolean {
    if (bytes <= this.smallMaxBytes) return true;
    return bytes <= this.largeWriteMaxBytes && !(this.queuedWritesOnPool() && queued?.() === true) && this.sync(bytes, nowMs);
  }

  /** A synchronous transfer of `bytes` took `elapsedMs`, ending at `nowMs`. */
  record(bytes: number, elapsedMs: number, nowMs: number): void {
    if (bytes > this.smallMaxBytes && elapsedMs > SLOW_FLOOR_MS + (SLOW_MS_PER_MIB * bytes) / MiB) this.#largeOffUntilMs = nowMs + BACKOFF_MS;
  }

  /**
   * Run `transfer` (of `bytes`, which sync() allowed) on this thread and return its result; a
   * large one is timed and recorded. Small ones are not timed: they never back anything off.
   */
  run<T>(bytes: number, transfer: () => T): T {
    if (bytes <= this.smallMaxBytes) return transfer();
    const startedMs = performance.now();
    try {
      return transfer();
    } finally {
      const endMs = performance.now();
      this.record(bytes, endMs - startedMs, endMs);
    }
  }

  /**
   * The size a reflink clone of `bytes` counts as: it copies no byte, so however long the range,
   * it costs at most what one large transfer may (and is one, unless it is small).
   */
  cloneBytes(bytes: number): number {
    return bytes <= this.smallMaxBytes ? bytes : Math.max(this.smallMaxBytes + 1, Math.min(bytes, this.largeMaxBytes));
  }
}

function sizeFromEnv(name: string, fallback: number): number {
  const text = process.env[name];
  const value = text === undefined ? fallback : Number(text);
  return Number.isSafeInteger(value) && value >= 0 ? value : fallback;
}
