/**
 * Positional I/O on raw descriptors that loops until the whole range is done (short transfers
 * happen on block devices and under signals), and the other descriptor calls as promises. Thin
 * callback wrappers: cheaper on the hot path than FileHandle or promisify's result objects, and
 * each looks `fs.<call>` up when it runs, so a test can watch the order of syncs and writes.
 */

import fs from 'node:fs';
import { fsTrace } from './fs-trace.js';

function settle<T>(resolve: (value: T) => void, reject: (err: Error) => void): (err: Error | null, value: T) => void {
  return (err, value) => (err ? reject(err) : resolve(value));
}

/** open(2) on the thread pool; resolves with the descriptor. */
export function openFd(file: fs.PathLike, flags: fs.OpenMode, mode?: fs.Mode): Promise<number> {
  const existed = fsTrace !== undefined && createsFile(flags) && fs.existsSync(file);
  return new Promise<number>((resolve, reject) => fs.open(file, flags, mode, settle(resolve, reject))).then((fd) => {
    if (fsTrace !== undefined) fsTrace.record({ op: 'open', fd, path: String(file), created: createsFile(flags) && !existed });
    return fd;
  });
}

/** Synchronous openFd. */
export function openFdSync(file: fs.PathLike, flags: fs.OpenMode, mode?: fs.Mode): number {
  const existed = fsTrace !== undefined && createsFile(flags) && fs.existsSync(file);
  const fd = fs.openSync(file, flags, mode);
  if (fsTrace !== undefined) fsTrace.record({ op: 'open', fd, path: String(file), created: createsFile(flags) && !existed });
  return fd;
}

/** Whether open(2) with `flags` may create the file. */
function createsFile(flags: fs.OpenMode): boolean {
  if (typeof flags === 'number') return (flags & fs.constants.O_CREAT) !== 0;
  return /[wax]/.test(flags);
}

/** close(2). */
export function closeFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.close(fd, (err) => (err ? reject(err) : resolve())));
}

/** fsync(2): data and metadata (for a directory, the names in it). */
export function fsyncFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.fsync(fd, (err) => (err ? reject(err) : resolve(traceSync(fd)))));
}

/** Synchronous fsyncFd. */
export function fsyncFdSync(fd: number): void {
  fs.fsyncSync(fd);
  traceSync(fd);
}

function traceSync(fd: number): void {
  if (fsTrace !== undefined) fsTrace.record({ op: 'sync', fd });
}

/** fdatasync(2): the data, and the metadata needed to read it back. */
export function fdatasyncFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.fdatasync(fd, (err) => (err ? reject(err) : resolve(traceSync(fd)))));
}

/** Synchronous fdatasyncFd. */
export function fdatasyncFdSync(fd: number): void {
  fs.fdatasyncSync(fd);
  traceSync(fd);
}

/** ftruncate(2). */
export function ftruncateFd(fd: number, lengthBytes: number): Promise<void> {
  return new Promise((resolve, reject) => fs.ftruncate(fd, lengthBytes, (err) => (err ? reject(err) : resolve(traceTruncate(fd, lengthBytes)))));
}

/** Synchronous ftruncateFd. */
export function ftruncateFdSync(fd: number, lengthBytes: number): void {
  fs.ftruncateSync(fd, lengthBytes);
  traceTruncate(fd, lengthBytes);
}

function traceTruncate(fd: number, lengthBytes: number): void {
  if (fsTrace !== undefined) fsTrace.record({ op: 'truncate', fd, lengthBytes });
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
  return new Promise((resolve, reject) => fs.write(fd, buf, offset, length, position, (err, n) => {
    if (err) return reject(err);
    if (fsTrace !== undefined) traceWrite(fd, [buf.subarray(offset, offset + length)], position, n);
    resolve(n);
  }));
}

/** Report `written` bytes of `buffers` at `position` (a copy: the caller may reuse its buffers). */
function traceWrite(fd: number, buffers: readonly Buffer[], position: number, written: number): void {
  if (written > 0) fsTrace?.record({ op: 'write', fd, position, buffers: [Buffer.concat(buffers as Buffer[]).subarray(0, written)], bytes: written });
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
  while (done < buf.length) {
    const n = fs.writeSync(fd, buf, done, buf.length - done, position + done);
    if (fsTrace !== undefined) traceWrite(fd, [buf.subarray(done)], position + done, n);
    done += n;
  }
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
  return new Promise((resolve, reject) => fs.writev(fd, buffers as Buffer[], position, (err, n) => {
    if (err) return reject(err);
    if (fsTrace !== undefined) traceWrite(fd, buffers, position, n);
    resolve(n);
  }));
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
    if (fsTrace !== undefined) traceWrite(fd, pending, position, n);
    position += n;
    pending = unwritten(pending, n);
  }
}

/**
 * mkdir(2), with `recursive` its parents too; resolves with the first directory created
 * (undefined if none was: with `recursive`, an existing directory is not an error).
 */
export async function makeDirectory(dir: string, options: { recursive?: boolean; mode?: fs.Mode } = {}): Promise<string | undefined> {
  const first = options.recursive === true ? await fs.promises.mkdir(dir, { recursive: true, mode: options.mode }) : (await fs.promises.mkdir(dir, { mode: options.mode }), dir);
  if (fsTrace !== undefined && first !== undefined) fsTrace.record({ op: 'mkdir', path: dir, first });
  return first;
}

/** Synchronous makeDirectory. */
export function makeDirectorySync(dir: string, options: { recursive?: boolean; mode?: fs.Mode } = {}): string | undefined {
  const first = options.recursive === true ? fs.mkdirSync(dir, { recursive: true, mode: options.mode }) : (fs.mkdirSync(dir, { mode: options.mode }), dir);
  if (fsTrace !== undefined && first !== undefined) fsTrace.record({ op: 'mkdir', path: dir, first });
  return first;
}

/** rename(2). */
export async function renamePath(from: string, to: string): Promise<void> {
  await fs.promises.rename(from, to);
  if (fsTrace !== undefined) fsTrace.record({ op: 'rename', from, to });
}

/** Synchronous renamePath. */
export function renamePathSync(from: string, to: string): void {
  fs.renameSync(from, to);
  if (fsTrace !== undefined) fsTrace.record({ op: 'rename', from, to });
}

/** unlink(2). */
export async function unlinkPath(file: string): Promise<void> {
  await fs.promises.unlink(file);
  if (fsTrace !== undefined) fsTrace.record({ op: 'unlink', path: file });
}

/**
 * Remove `target` (a file, or with `recursive` a whole tree) if it is there; like
 * fs.rm(target, { force: true }).
 */
export async function removePath(target: string, options: { recursive?: boolean } = {}): Promise<void> {
  const there = fsTrace !== undefined && fs.existsSync(target);
  await fs.promises.rm(target, { force: true, recursive: options.recursive === true });
  if (fsTrace !== undefined && there) fsTrace.record(options.recursive === true ? { op: 'rmtree', path: target } : { op: 'unlink', path: target });
}

/** Synchronous removePath. */
export function removePathSync(target: string, options: { recursive?: boolean } = {}): void {
  const there = fsTrace !== undefined && fs.existsSync(target);
  fs.rmSync(target, { force: true, recursive: options.recursive === true });
  if (fsTrace !== undefined && there) fsTrace.record(options.recursive === true ? { op: 'rmtree', path: target } : { op: 'unlink', path: target });
}
