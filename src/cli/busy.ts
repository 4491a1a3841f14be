/**
 * What frees a device the daemon holds. A command that finds a device in use (restore, serve,
 * backup restore, a second mount) learns only that some process has it open; when that process
 * is the daemon, its status says why (a bdsnap mount, snapshots, NBD clients, an instant restore),
 * and the refusal can name the command (or the wait) that frees it instead of a pid.
 */

import fs from 'node:fs';
import { BdsnapError } from '../errors.js';
import { processCommandLine } from '../host/processes.js';
import { withClient } from '../service/client.js';
import { withTimeout } from '../timeout.js';
import type { StatusResult } from '../service/control-protocol.js';
import { describeHolder, describeRestoreHold } from '../service/device-holders.js';

/** The messages of device-lock.ts, file-device.ts and in-use.ts when another process has the device open. */
const LOCAL_OPEN_REFUSALS = [/ is already open by /, / is busy: mounted or claimed by another program/, / is open for writing by pid /];
/** The device and the pid such a message names. */
const HOLDER = / is (?:already open by process|open for writing by pid) (\d+)/;

/** A daemon that does not answer this fast leaves the original message as it was. */
const STATUS_TIMEOUT_MS = 2000;

/**
 * `err` with the daemon's reason for holding the device it names, when it is EBUSY about a
 * device the daemon of `runDir` mounts or holds; `err` itself otherwise (no daemon, no match).
 */
export async function explainBusy(err: unknown, runDir?: string): Promise<unknown> {
  // Only a local open that found the device held (its lock, or O_EXCL on a block device) lacks
  // the reason; the daemon's own refusals (a second mount, destroying a snapshot in use) and the
  // in-use checks already name the fix.
  if (!(err instanceof BdsnapError) || err.code !== 'EBUSY' || !LOCAL_OPEN_REFUSALS.some((r) => r.test(err.message))) return err;
  let status: StatusResult;
  try {
    status = await withTimeout(withClient(runDir, (c) => c.status()), STATUS_TIMEOUT_MS, () => new Error('timed out'));
  } catch {
    return err;
  }
  // The lock names its holder: when that is not this daemon, this daemon's status cannot say why.
  const holderPid = Number(HOLDER.exec(err.message)?.[1] ?? Number.NaN);
  if (Number.isInteger(holderPid) && holderPid !== status.pid) return heldElsewhere(err, holderPid, status.pid);
  // A target under instant restore is the restore's, whatever else status shows of it (its mount is the restore's too).
  const restore = namedIn(err.message, status.restores ?? [], (r) => r.target);
  if (restore) return new BdsnapError('EBUSY', describeRestoreHold(restore), { cause: err });
  const named = namedIn(err.message, status.devices, (d) => d.device);
  const why = named ? describeHolder(named) : undefined;
  return why ? new BdsnapError('EBUSY', `${named!.device} is in use: ${why}`, { cause: err }) : err;
}

/** The item whose path `message` names (by that path or its real path), the longest such path first. */
function namedIn<T>(message: string, items: T[], pathOf: (item: T) => string): T | undefined {
  return items
    .filter((x) => message.includes(pathOf(x)) || message.includes(realpathOr(pathOf(x))))
    .sort((a, b) => pathOf(b).length - pathOf(a).length)[0];
}

/**
 * The refusal when the device's lock is held by a process other than the daemon asked: when it is
 * another bdsnap daemon, named with its run directory, where its status says what holds the
 * device; `err` unchanged otherwise.
 */
async function heldElsewhere(err: BdsnapError, pid: number, daemonPid: number): Promise<BdsnapError> {
  const device = err.message.slice(0, HOLDER.exec(err.message)?.index ?? 0);
  const argv = await processCommandLine(pid).catch(() => null);
  const at = argv?.indexOf('daemon') ?? -1;
  if (argv && at > 0 && argv.slice(0, at).some((a) => /bdsnap|cli\/main\.js$/.test(a))) {
    const runDirAt = argv.indexOf('--run-dir', at);
    const where = runDirAt > 0 && argv[runDirAt + 1] ? `run directory ${argv[runDirAt + 1]}` : 'the default run directory';
    const env = runDirAt > 0 && argv[runDirAt + 1] ? `BDSNAP_RUN_DIR=${argv[runDirAt + 1]} ` : '';
    return new BdsnapError('EBUSY', `${device} is already open by process ${pid}, another bdsnap daemon (${where}), not this one (pid ${daemonPid}): free it there first (${env}bdsnap status shows what holds it)`, { cause: err });
  }
  // Some other program: the lock's own message says what to do.
  return err;
}

function realpathOr(p: string): string {
  try {
    return fs.realpathSync(p);
  } catch {
    return p;
  }
}

