/**
 * Positional I/O on raw descriptors that loops until the whole range is done (short transfers
 * happen on block devices and under signals), and the other descriptor calls as promises. Thin
 * callback wrappers: cheaper on the hot path than FileHandle or promisify's result objects, and
 * each looks `fs.<call>` up when it runs, so a test can watch the order of syncs and writes.
 */

import fs from 'node:fs';

function settle<T>(resolve: (value: T) => void, reject: (err: Error) => void): (err: Error | null, value: T) => void {
  return (err, value) => (err ? reject(err) : resolve(value));
}

/** open(2) on the thread pool; resolves with the descriptor. */
export function openFd(file: fs.PathLike, flags: fs.OpenMode, mode?: fs.Mode): Promise<number> {
  return new Promise((resolve, reject) => fs.open(file, flags, mode, settle(resolve, reject)));
}

/** close(2). */
export function closeFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.close(fd, (err) => (err ? reject(err) : resolve())));
}

/** fsync(2): data and metadata (for a directory, the names in it). */
export function fsyncFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.fsync(fd, (err) => (err ? reject(err) : resolve())));
}

/** fdatasync(2): the data, and the metadata needed to read it back. */
export function fdatasyncFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.fdatasync(fd, (err) => (err ? reject(err) : resolve())));
}

/** ftruncate(2). */
export function ftruncateFd(fd: number, lengthBytes: number): Promise<void> {
  return new Promise((resolve, reject) => fs.ftruncate(fd, lengthBytes, (err) => (err ? reject(err) : resolve())));
}

/** fstat(2). */
export function fstatFd(fd: number): Promise<fs.Stats> {
  return new Promise((resolve, reject) => fs.fstat(fd, settle(resolve, reject)));
}

/** One pread(2); resolves with the count read (0 at end of file). */
export function preadOnce(fd: number, buf: Buffer, offset: number, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => fs.read(fd, buf, offset, length, position, (err, n) => (err ? reject(err) : resolve(n))));
}

/** One pwrite(2); resolves with the count written. */
export function pwriteOnce(fd: number, buf: Buffer, offset: number, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => fs.write(fd, buf, offset, length, position, (err, n) => (err ? reject(err) : resolve(n))));
}

/** Read exactly `buf.length` bytes at `position`, or fewer if the file ends; returns the count. */
export async function preadFully(fd: number, buf: Buffer, position: number): Promise<number> {
  let done = 0;
  while (done < buf.length) {
    const n = await preadOnce(fd, buf, done, buf.length - done, position + done);
    if (n === 0) break;
    done += n;
  }
  return done;
}

/** Write all of `buf` at `position`. */
export async function pwriteFully(fd: number, buf: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    done += await pwriteOnce(fd, buf, done, buf.length - done, position + done);
  }
}

/**
 * Synchronous preadFully, for small page-cache transfers where a thread-pool round trip costs
 * more than the copy, and for worker threads.
 */
export function preadFullySync(fd: number, buf: Buffer, position: number, length = buf.length): number {
  let done = 0;
  while (done < length) {
    const n = fs.readSync(fd, buf, done, length - done, position + done);
    if (n === 0) break;
    done += n;
  }
  return done;
}

/** Synchronous pwriteFully. */
export function pwriteFullySync(fd: number, buf: Buffer, position: number): void {
  let done = 0;
  while (done < buf.length) done += fs.writeSync(fd, buf, done, buf.length - done, position + done);
}

/** What is left of `buffers` once the first `written` bytes are out (a short write). */
function unwritten(buffers: readonly Buffer[], written: number): Buffer[] {
  const rest: Buffer[] = [];
  for (const b of buffers) {
    if (written >= b.length) written -= b.length;
    else {
      rest.push(b.subarray(written));
      written = 0;
    }
  }
  return rest;
}

/** One writev(2) at `position`; resolves with the count written. */
function writevOnce(fd: number, buffers: readonly Buffer[], position: number): Promise<number> {
  return new Promise((resolve, reject) => fs.writev(fd, buffers as Buffer[], position, (err, n) => (err ? reject(err) : resolve(n))));
}

/** Write all of `buffers`, one after the other, from `position`: writev(2) until none is left. */
export async function writevFully(fd: number, buffers: readonly Buffer[], position: number): Promise<void> {
  for (let pending = buffers.filter((b) => b.length > 0); pending.length > 0;) {
    const n = await writevOnce(fd, pending, position);
    position += n;
    pending = unwritten(pending, n);
  }
}

/** Synchronous writevFully. */
export function writevFullySync(fd: number, buffers: readonly Buffer[], position: number): void {
  for (let pending = buffers.filter((b) => b.length > 0); pending.length > 0;) {
    const n = fs.writevSync(fd, pending, position);
    position += n;
    pending = unwritten(pending, n);
  }
}
