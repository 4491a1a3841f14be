/**
 * One daemon per state directory and per run directory, settled before the daemon touches
 * anything: cleaning "stale" mounts, recovering "left open" sessions and bringing snapshots
 * back are each right only when no other daemon owns them, and each would wreck a running one's.
 *
 * Each directory has a lock file (see host/lock-file.ts: the kernel drops the lock when its
 * holder exits, so a daemon killed with SIGKILL never blocks the next one) recording who holds
 * it, for a refusal that names the holder. The run directory's sockets are probed as well: a
 * server that answers there (a daemon of an older version, or `bdsnap serve`) is just as much
 * in the way.
 */

import path from 'node:path';
import { BdsnapError } from '../errors.js';
import { tryLockFile, type HeldLockFile } from '../host/lock-file.js';
import { processStartTimeSync } from '../host/processes.js';
import { unixSocketAccepts } from '../unix-socket.js';

export const DAEMON_LOCK_FILE = 'daemon.lock';

export interface DaemonDirs {
  runDir: string;
  stateDir: string;
  snapshotRoot: string;
}

/** What a daemon writes into the lock files it holds. */
interface HolderRecord extends DaemonDirs {
  pid: number;
  startTime: string | null;
}

export interface DaemonClaim {
  release(): void;
}

/**
 * Lock the state and run directories (private directories, already made) and check that no
 * server answers on `sockets` (paths in the run directory). Errors: EBUSY naming the holder and
 * what to do; ENOTSUP, EPERM or EIO when the locks cannot be taken (see tryLockFile).
 */
export async function claimDaemonDirs(dirs: DaemonDirs, sockets: string[]): Promise<DaemonClaim> {
  const record: HolderRecord = { pid: process.pid, startTime: processStartTimeSync(process.pid), ...dirs };
  const text = `${JSON.stringify(record)}\n`;
  const held: HeldLockFile[] = [];
  const release = (): void => {
    for (const lock of held.reverse()) lock.release();
  };
  try {
    for (const [dir, what, option] of [[dirs.stateDir, 'state', '--state-dir'], [dirs.runDir, 'run', '--run-dir']] as const) {
      const attempt = tryLockFile(path.join(dir, DAEMON_LOCK_FILE), text);
      if ('holder' in attempt) {
        throw new BdsnapError('EBUSY', `the ${what} directory ${dir} is in use by another bdsnap daemon (${describeHolder(attempt.holder)}); stop that daemon first, or give this one its own ${option}`);
      }
      held.push(attempt.held);
    }
    for (const socket of sockets) {
      if (await unixSocketAccepts(socket)) {
        throw new BdsnapError('EBUSY', `${socket} is served by another process (it answers, but holds no bdsnap lock on ${dirs.runDir}); stop it first, or give this daemon its own --run-dir`);
      }
    }
  } catch (err) {
    release();
    throw err;
  }
  return { release };
}

function describeHolder(text: string): string {
  let value: Partial<HolderRecord>;
  try {
    value = JSON.parse(text) as Partial<HolderRecord>;
  } catch {
    return 'a process that has not recorded itself yet';
  }
  const parts = [`pid ${typeof value.pid === 'number' ? value.pid : '?'}`];
  if (typeof value.runDir === 'string') parts.push(`run dir ${value.runDir}`);
  if (typeof value.stateDir === 'string') parts.push(`state dir ${value.stateDir}`);
  return parts.join(', ');
}
