/**
 * Process identity from /proc. A pid alone does not name a process: after it exits, the number
 * is reused. The pair (pid, start time) does: the start time (field 22 of /proc/<pid>/stat, in
 * clock ticks since boot) of a reused pid differs. Every check before signalling a process, or
 * before calling a lock stale, compares both.
 *
 * A zombie (state Z, or X while it is being reaped) has exited: it holds no file, no lock and no
 * socket, and its pid waits only for its parent to reap it. It keeps its start time, so a check
 * of the start time alone would call it alive for as long as its parent does not wait for it
 * (a restart right after a SIGKILL): here it counts as gone. "Gone" (null) and "cannot tell"
 * (an EIO error) stay distinct; a caller never takes the second for the first.
 */

import fs from 'node:fs';
import { BdsnapError } from '../errors.js';

export const PROC_PATH = '/proc';

/**
 * The start time of `pid` as the kernel prints it, or null if no such process exists or it has
 * exited and only its zombie is left. Errors: EIO when /proc answers with anything else.
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

/** Process states (field 3 of /proc/<pid>/stat) of a process that has exited: zombie, dead. */
const EXITED_STATES = new Set(['Z', 'X', 'x']);

function parseStartTime(stat: string | null): string | null {
  if (stat === null) return null;
  // The command name (field 2) is in parentheses and may hold spaces or ')': split after the last ')'.
  const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  // rest[0] is field 3 (state), so field 22 is rest[19].
  const state = rest[0];
  const start = rest[19];
  if (state === undefined || !/^[A-Za-z]$/.test(state) || start === undefined || !/^\d+$/.test(start)) {
    throw new BdsnapError('EIO', `unexpected /proc stat line: ${stat.slice(0, 80)}`);
  }
  return EXITED_STATES.has(state) ? null : start;
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
