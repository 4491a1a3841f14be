/**
 * The restore journal (`restore.json` in the target session's directory): 'running' while a
 * restore writes the device, 'done' after its final sync, with the sessions it undid. A restore
 * takes the device back to a session's start, so every session that had started by then is
 * undone: the start of a newer one can no longer be rebuilt, since what the restore overwrote
 * is kept nowhere (`chain.ts` refuses it). Read back
 * through a schema: a journal that does not parse, or names another device, stops the restore
 * (ECORRUPT) rather than being taken for "no restore happened".
 */

import { z } from 'zod';
import { BdsnapError } from '../../errors.js';
import { writeFileAtomic } from '../../host/atomic-file.js';
import { SESSION_FILE_MODE } from '../format.js';
import { deviceStampSchema } from '../../host/device-stamp.js';
import { parseJson } from '../../stored-json.js';
import { readOptional } from './files.js';

const journalSchema = z.object({
  state: z.enum(['running', 'done']),
  devicePath: z.string().min(1),
  /**
   * Session directories undone by this restore and the earlier ones it built on. With
   * `listsAll`, every session of the device from the target on that existed when the restore
   * ran, including those an earlier restore had undone already; without it (journals written
   * before), only the sessions whose originals were applied.
   */
  sessions: z.array(z.string().min(1)),
  listsAll: z.literal(true).optional(),
  /**
   * false when `--force` overrode a failed check: the device may then hold what no session
   * recorded, so the restore's result is not known to be the target's start. Absent: true.
   */
  verified: z.boolean().optional(),
  /** The device's stamp after each verified restore from this session (`host/device-stamp.ts`). */
  stamps: z.array(deviceStampSchema).optional(),
  startedAt: z.string().min(1),
  finishedAt: z.string().min(1).optional(),
});

export type Journal = z.infer<typeof journalSchema>;

/** The journal at `file`, or undefined if there is none. Errors: ECORRUPT, EIO. */
export async function readJournal(file: string, devicePath?: string): Promise<Journal | undefined> {
  const raw = await readOptional(file);
  if (raw === undefined) return undefined;
  const journal = parseJson(raw, journalSchema, (problem) => `${file} is not a valid restore journal (${problem})`);
  if (devicePath !== undefined && journal.devicePath !== devicePath) {
    throw new BdsnapError('ECORRUPT', `${file} is the journal of a restore of ${journal.devicePath}, not of ${devicePath}`);
  }
  return journal;
}

export async function writeJournal(file: string, journal: Journal): Promise<void> {
  await writeFileAtomic(file, JSON.stringify(journal), SESSION_FILE_MODE);
}
