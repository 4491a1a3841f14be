/**
 * The stamp of an image file: what tells one state of its content from another without
 * reading it. Any write moves mtime and ctime; ctime cannot be set back by a user (utimes
 * moves it too), and the inode tells a replaced file from the same one. Taken with fstat of an
 * open descriptor where there is one. Since Linux 6.13 ext4, XFS and tmpfs give a changed file a
 * fine-grained ctime once its ctime has been read, so a write just after a stamp was taken still
 * yields a new stamp; on older kernels two writes within one clock tick can share one.
 * Block devices have no such stamp here (undefined): callers say they cannot tell.
 */

import fs from 'node:fs';

/** Numbers as decimal strings: nanosecond times do not fit a double, and this is stored as JSON. */
export interface FileStamp {
  ino: string;
  size: string;
  mtimeNs: string;
  ctimeNs: string;
}

const FIELDS: Array<keyof FileStamp> = ['ino', 'size', 'mtimeNs', 'ctimeNs'];

function fromStats(st: fs.BigIntStats): FileStamp | undefined {
  if (!st.isFile()) return undefined;
  return { ino: String(st.ino), size: String(st.size), mtimeNs: String(st.mtimeNs), ctimeNs: String(st.ctimeNs) };
}

/** The stamp of an open file, or undefined for anything but a regular file. */
export async function stampOfFd(fd: number): Promise<FileStamp | undefined> {
  return fromStats(await new Promise<fs.BigIntStats>((resolve, reject) => fs.fstat(fd, { bigint: true }, (err, st) => (err ? reject(err) : resolve(st)))));
}

/** The stamp of the file at `filePath` (not following a final symlink), undefined if it is not a regular file. */
export async function stampOfPath(filePath: string): Promise<FileStamp | undefined> {
  return fromStats(await fs.promises.lstat(filePath, { bigint: true }));
}

/** A key equal for equal stamps. */
export function stampKey(s: FileStamp): string {
  return FIELDS.map((k) => s[k]).join(':');
}

function describeNs(ns: string): string {
  const n = BigInt(ns);
  return `${new Date(Number(n / 1_000_000n)).toISOString().replace('Z', '')}${String(n % 1_000_000n).padStart(6, '0')}Z`;
}

/** What differs between two stamps, for a message: "mtime 2026-…Z then, 2026-…Z now". */
export function describeStampChange(then: FileStamp, now: FileStamp): string {
  const parts: string[] = [];
  if (then.ino !== now.ino) parts.push(`inode ${then.ino} then, ${now.ino} now (another file)`);
  if (then.size !== now.size) parts.push(`size ${then.size} then, ${now.size} now`);
  if (then.mtimeNs !== now.mtimeNs) parts.push(`modified ${describeNs(then.mtimeNs)} then, ${describeNs(now.mtimeNs)} now`);
  else if (then.ctimeNs !== now.ctimeNs) parts.push(`changed ${describeNs(then.ctimeNs)} then, ${describeNs(now.ctimeNs)} now`);
  return parts.join(', ');
}
