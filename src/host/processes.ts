/**
 * Process identity from /proc. A pid alone does not name a process: after it exits, the number
 * is reused. The pair (pid, start time) does: the start time (field 22 of /proc/<pid>/stat, in
 * clock ticks since boot) of a reused pid differs. Every check before signalling a process, or
 * before calling a lock stale, compares both.
 */

import fs from 'node:fs';
import { BdsnapError } from '../errors.js';

export const PROC_PATH = '/proc';

/**
 * The start time of `pid` as the kernel prints it, or null if no such process exists.
 * Errors: EIO when /proc answers with anything else.
 */
export async function processStartTime(pid: number, proc = PROC_PATH): Promise<string | null> {
  return parseStartTime(await readProcFile(`${proc}/${pid}/stat`));
}

/** Synchronous processStartTime, for code that may not yield between check and act. */
export function processStartTimeSync(pid: number, proc = PROC_PATH): string | null {
  const file = `${proc}/${pid}/stat`;
  try {
    return parseStartTime(fs.readFileSync(file, 'utf8'));
  } catch (err) {
    if (isGone(err)) return null;
    throw new BdsnapError('EIO', `cannot read ${file}: ${(err as Error).message}`, { cause: err });
  }
}

/** The command line of `pid` (argv), or null if no such process exists. Errors: EIO. */
export async function processCommandLine(pid: number, proc = PROC_PATH): Promise<string[] | null> {
  const text = await readProcFile(`${proc}/${pid}/cmdline`);
  if (text === null) return null;
  return text.split('\0').filter((arg, i, all) => i < all.length - 1 || arg !== '');
}

function parseStartTime(stat: string | null): string | null {
  if (stat === null) return null;
  // The command name (field 2) is in parentheses and may hold spaces or ')': split after the last ')'.
  const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  // rest[0] is field 3 (state), so field 22 is rest[19].
  const start = rest[19];
  if (start === undefined || !/^\d+$/.test(start)) throw new BdsnapError('EIO', `unexpected /proc stat line: ${stat.slice(0, 80)}`);
  return start;
}

async function readProcFile(file: string): Promise<string | null> {
  try {
    return await fs.promises.readFile(file, 'utf8');
  } catch (err) {
    if (isGone(err)) return null;
    throw new BdsnapError('EIO', `cannot read ${file}: ${(err as Error).message}`, { cause: err });
  }
}

function isGone(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException).code;
  return code === 'ENOENT' || code === 'ESRCH';
}
