/**
 * The page-cache state a timed cell starts from, the same for both sides of a row.
 */

import fs from 'node:fs';
import path from 'node:path';

/**
 * Write back the file's dirty pages and read all of it, so that it sits clean in the page
 * cache (some machines page out file pages idle for a minute; the previous cell's write-back
 * must not run during this one).
 */
export function settleFile(filePath: string): void {
  const fd = readFile(filePath);
  try {
    fs.fdatasyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Read all of the file, so that it sits in the page cache, and leave its dirty pages alone: a
 * file written a moment ago (the last cell's writes, or the image just made) stays as a user
 * who runs fio twice finds it.
 */
export function cacheFile(filePath: string): void {
  fs.closeSync(readFile(filePath));
}

/** Read all of the file; the caller gets the open descriptor and closes it. */
function readFile(filePath: string): number {
  const fd = fs.openSync(filePath, 'r');
  try {
    const buf = Buffer.allocUnsafe(8 * 1024 * 1024);
    for (let pos = 0; ; pos += buf.length) if (fs.readSync(fd, buf, 0, buf.length, pos) === 0) break;
    return fd;
  } catch (err) {
    fs.closeSync(fd);
    throw err;
  }
}

/**
 * Write `bytes` to a scratch file in `dir`, make it durable and delete it, outside the clock.
 * This virtual machine hands free memory back to its host, and the first step that fills that
 * much new page cache pays to get it back: in the backup bench each restore took two to three
 * times as long as alone, and whichever tool restored second took about twice as long as the
 * first. Memory freed goes back to the host within seconds (a fill made before a write-back of
 * 1 GiB was lost by its end), so a cell that writes new data (a restore, a session's store)
 * starts right after this, with no write-back in between.
 */
export function fillPageCache(dir: string, bytes: number): void {
  const scratch = path.join(dir, 'page-cache-fill');
  const fd = fs.openSync(scratch, 'w');
  try {
    const buf = Buffer.alloc(8 * 1024 * 1024, 0x5a);
    for (let at = 0; at < bytes; at += buf.length) fs.writeSync(fd, buf, 0, Math.min(buf.length, bytes - at), at);
    fs.fdatasyncSync(fd);
  } finally {
    fs.closeSync(fd);
    fs.rmSync(scratch, { force: true });
  }
}

