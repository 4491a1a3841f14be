/**
 * The owner of a snapshot a process took for itself (`backup create`): the process, named by
 * pid and start time (a pid alone is reused, see host/processes.ts), recorded with the
 * snapshot. Such a snapshot lives as long as its owner: while the daemon runs, as long as the
 * control connection that asked for it (the manager is told when it closes); after a restart,
 * which ended that connection, as long as the process, checked at start and then every
 * OWNER_CHECK_MS. A snapshot whose owner cannot be told gone is kept: "cannot tell" is never
 * taken for "gone". Users' own snapshots have no owner and are never removed this way.
 */

import { z } from 'zod';
import { BdsnapError } from '../../errors.js';
import { processStartTime } from '../../host/processes.js';

export const ownerSchema = z.object({
  pid: z.number().int().positive(),
  /** Field 22 of /proc/<pid>/stat when the snapshot was asked for. */
  startTime: z.string().regex(/^\d+$/),
}).strict();

export type SnapshotOwner = z.infer<typeof ownerSchema>;

/** How often a restarted daemon looks whether the owners of the snapshots it put back are gone. */
export const OWNER_CHECK_MS = 2000;

/** The owner record of process `pid`. Errors: ESHUTDOWN when it has already ended, EIO when /proc cannot tell. */
export async function ownerOf(pid: number): Promise<SnapshotOwner> {
  const startTime = await processStartTime(pid);
  if (startTime === null) throw new BdsnapError('ESHUTDOWN', `process ${pid}, which asked for the snapshot, has ended`);
  return { pid, startTime };
}

/** Whether `owner` still runs: 'gone' only when /proc says so (no such process, an exited one, or a reused pid). */
export async function ownerState(owner: SnapshotOwner): Promise<'alive' | 'gone' | 'unknown'> {
  try {
    const startTime = await processStartTime(owner.pid);
    return startTime === owner.startTime ? 'alive' : 'gone';
  } catch {
    return 'unknown';
  }
}
