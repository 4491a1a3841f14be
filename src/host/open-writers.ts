/**
 * Which other processes hold a file or a block device open for writing, from /proc: each
 * process's descriptors (`/proc/PID/fd/N`) with their open flags and inode number
 * (`/proc/PID/fdinfo/N`); a candidate is stat'ed through the link, so a file is matched by
 * identity whatever name opened it. A writer that bdsnap does not know about writes around
 * copy-before-write, the change map and a restore.
 *
 * Only what may be inspected is seen: another user sees their own processes, and even root is
 * refused the descriptors of some (EACCES: a process the kernel guards from ptrace, such as a
 * container's init). Those are passed over; anything else /proc will not answer is a "cannot
 * tell" (EIO). Descriptors are read from /proc alone, and stat'ed only when open for writing
 * (and, for a file, of its inode number), so a hung filesystem elsewhere cannot hang the check.
 */

import fs from 'node:fs';
import path from 'node:path';
import { BdsnapError } from '../errors.js';
import { formatDevT } from './dev-t.js';
import { runLimited } from '../run-limited.js';

export const PROC_PATH = '/proc';

/** What is looked for: a regular file by (st_dev, st_ino), or block devices by major:minor. */
export type OpenTarget = { kind: 'file'; dev: bigint; ino: bigint } | { kind: 'block'; majorMinors: ReadonlySet<string> };

export interface OpenWriter {
  pid: number;
  /** The process's name (`/proc/PID/comm`), '' if it is gone. */
  command: string;
  fd: number;
}

const O_ACCMODE = 0o3;
const O_RDONLY = 0;

/** Errors that mean the process or its descriptor went away while it was read. */
const GONE = new Set(['ENOENT', 'ESRCH']);
/** Processes read at once. */
const SCAN_SLOTS = 8;

/** What /proc/PID/fdinfo/N says of a descriptor: its open flags, and its inode number where the kernel gives it. */
interface FdInfo {
  flags: number;
  ino: bigint | undefined;
}

/** The fdinfo of descriptor `fd` of `pid`, or undefined when it has closed. */
async function fdInfo(proc: string, pid: string, fd: string): Promise<FdInfo | undefined> {
  const file = path.join(proc, pid, 'fdinfo', fd);
  const text = await fs.promises.readFile(file, 'utf8').catch((err: NodeJS.ErrnoException) => {
    if (GONE.has(err.code ?? '')) return undefined;
    throw err;
  });
  if (text === undefined) return undefined;
  const flags = /^flags:\s+([0-7]+)$/m.exec(text);
  if (flags === null) throw new Error(`${file} has no flags line`);
  const ino = /^ino:\s+(\d+)$/m.exec(text);
  return { flags: parseInt(flags[1]!, 8), ino: ino === null ? undefined : BigInt(ino[1]!) };
}

/**
 * Other processes (not this one) with `target` open for writing, of those that may be inspected
 * (`only`: of these pids; one that has exited has nothing open).
 * Errors: EIO when /proc cannot be listed or answers a descriptor with anything but "gone" or
 * "not yours".
 */
export async function openWriters(target: OpenTarget, proc = PROC_PATH, only?: readonly string[]): Promise<OpenWriter[]> {
  const cannotTell = (what: string, err: unknown): never => {
    throw new BdsnapError('EIO', `cannot tell which processes have it open: ${what}: ${(err as Error).message}`, { cause: err });
  };
  const listed = only ?? await fs.promises.readdir(proc).catch((err: unknown) => cannotTell(`${proc} cannot be listed`, err));
  const pids = listed.filter((n) => /^\d+$/.test(n) && Number(n) !== process.pid);
  // Read side by side, a process at a time per slot: a host with thousands of descriptors is
  // read in tens of milliseconds.
  const out: OpenWriter[] = [];
  await runLimited(pids, SCAN_SLOTS, async (pid) => {
    const fdDir = path.join(proc, pid, 'fd');
    let fds: string[];
    try {
      fds = await fs.promises.readdir(fdDir);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code ?? '';
      if (GONE.has(code) || code === 'EACCES') return;
      return cannotTell(`${fdDir} cannot be read`, err);
    }
    await Promise.all(fds.map(async (fd) => {
      // /proc alone first: a stat through the descriptor reaches its filesystem, and one that
      // hangs (a dead NFS server) would hang this check. Only descriptors open for writing, and
      // for a file only those with its inode number, are stat'ed.
      const info = await fdInfo(proc, pid, fd).catch((err: unknown) => {
        if ((err as NodeJS.ErrnoException).code === 'EACCES') return undefined;
        return cannotTell(`${path.join(proc, pid, 'fdinfo', fd)} cannot be read`, err);
      });
      if (info === undefined || (info.flags & O_ACCMODE) === O_RDONLY) return;
      if (target.kind === 'file' && info.ino !== undefined && info.ino !== target.ino) return;
      const st = await fs.promises.stat(path.join(fdDir, fd), { bigint: true }).catch(() => undefined);
      if (st === undefined) return; // closed meanwhile, or a descriptor of nothing stat can reach
      const same = target.kind === 'file' ? st.isFile() && st.dev === target.dev && st.ino === target.ino : st.isBlockDevice() && target.majorMinors.has(formatDevT(st.rdev));
      if (!same) return;
      const command = await fs.promises.readFile(path.join(proc, pid, 'comm'), 'utf8').then((t) => t.trim(), () => '');
      out.push({ pid: Number(pid), command, fd: Number(fd) });
    }));
  });
  out.sort((a, b) => a.pid - b.pid || a.fd - b.fd);
  return out;
}

/** "pid 123 (qemu-system-x86), pid 456 (dd)": each process once. */
export function describeWriters(writers: readonly OpenWriter[]): string {
  const seen = new Map<number, string>();
  for (const w of writers) seen.set(w.pid, w.command);
  return [...seen].map(([pid, command]) => `pid ${pid}${command === '' ? '' : ` (${command})`}`).join(', ');
}

/** How many processes `writers` are (a process may hold the file on several descriptors). */
export function processCount(writers: readonly OpenWriter[]): number {
  return new Set(writers.map((w) => w.pid)).size;
}
