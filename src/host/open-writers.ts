/**
 * Which other processes hold a file or a block device open for writing, from /proc: each
 * process's descriptors (`/proc/PID/fd/N`, stat'ed through the link, so a file is matched by
 * identity whatever name opened it) and their open flags (`/proc/PID/fdinfo/N`). A writer that
 * bdsnap does not know about writes around copy-before-write, the change map and a restore.
 *
 * Root sees every process; a process that cannot be read then is a "cannot tell" (EIO). Another
 * user sees only their own processes: those of others are passed over (they can have the file
 * open for writing only if it let them, or they are root).
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

/** The open flags of descriptor `fd` of `pid`, or undefined when it has closed. */
async function openFlags(proc: string, pid: string, fd: string): Promise<number | undefined> {
  const text = await fs.promises.readFile(path.join(proc, pid, 'fdinfo', fd), 'utf8').catch((err: NodeJS.ErrnoException) => {
    if (GONE.has(err.code ?? '')) return undefined;
    throw err;
  });
  const m = text === undefined ? null : /^flags:\s+([0-7]+)$/m.exec(text);
  if (text !== undefined && m === null) throw new Error(`${path.join(proc, pid, 'fdinfo', fd)} has no flags line`);
  return m === null ? undefined : parseInt(m[1]!, 8);
}

/**
 * Other processes (not this one) with `target` open for writing. Errors: EIO when /proc cannot be
 * listed, or (for root) a process's descriptors cannot be read.
 */
export async function openWriters(target: OpenTarget, proc = PROC_PATH): Promise<OpenWriter[]> {
  const root = (process.geteuid?.() ?? 0) === 0;
  const cannotTell = (what: string, err: unknown): never => {
    throw new BdsnapError('EIO', `cannot tell which processes have it open: ${what}: ${(err as Error).message}`, { cause: err });
  };
  const pids = (await fs.promises.readdir(proc).catch((err: unknown) => cannotTell(`${proc} cannot be listed`, err))).filter((n) => /^\d+$/.test(n) && Number(n) !== process.pid);
  // Read side by side (each stat through /proc costs tens of microseconds), a process at a time
  // per slot: a host with thousands of descriptors is read in tens of milliseconds.
  const out: OpenWriter[] = [];
  await runLimited(pids, SCAN_SLOTS, async (pid) => {
    const fdDir = path.join(proc, pid, 'fd');
    let fds: string[];
    try {
      fds = await fs.promises.readdir(fdDir);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code ?? '';
      if (GONE.has(code) || (code === 'EACCES' && !root)) return;
      return cannotTell(`${fdDir} cannot be read`, err);
    }
    await Promise.all(fds.map(async (fd) => {
      const st = await fs.promises.stat(path.join(fdDir, fd), { bigint: true }).catch(() => undefined);
      if (st === undefined) return; // closed meanwhile, or a descriptor of nothing stat can reach
      const same = target.kind === 'file' ? st.isFile() && st.dev === target.dev && st.ino === target.ino : st.isBlockDevice() && target.majorMinors.has(formatDevT(st.rdev));
      if (!same) return;
      const flags = await openFlags(proc, pid, fd).catch((err: unknown) => cannotTell(`the flags of ${path.join(fdDir, fd)} cannot be read`, err));
      if (flags === undefined || (flags & O_ACCMODE) === O_RDONLY) return;
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
