/**
 * The restore journal (`restore.json` in the target session's directory): 'running' while a
 * restore writes the device, 'done' after its final sync, with the sessions it undid. Read back
 * through a schema: a journal that does not parse, or names another device, stops the restore
 * (ECORRUPT) rather than being taken for "no restore happened".
 */

import { z } from 'zod';
import { BdsnapError } from '../../errors.js';
import { writeFileAtomic } from '../../host/atomic-file.js';
import { SESSION_FILE_MODE } from '../format.js';
import { readOptional } from './files.js';

const journalSchema = z.object({
  state: z.enum(['running', 'done']),
  devicePath: z.string().min(1),
  /** Session directories undone by this restore and the earlier ones it built on. */
  sessions: z.array(z.string().min(1)),
  startedAt: z.string().min(1),
  finishedAt: z.string().min(1).optional(),
});

export type Journal = z.infer<typeof journalSchema>;

/** The journal at `file`, or undefined if there is none. Errors: ECORRUPT, EIO. */
export async function readJournal(file: string, devicePath?: string): Promise<Journal | undefined> {
  const raw = await readOptional(file);
  if (raw === undefined) return undefined;
  let value: unknown;
  try {
    value = JSON.parse(raw.toString('utf8'));
  } catch (err) {
    throw new BdsnapError('ECORRUPT', `${file} is not a valid restore journal: ${(err as Error).message}`, { cause: err });
  }
  const parsed = journalSchema.safeParse(value);
  if (!parsed.success) {
    const first = parsed.error.issues[0];
    const where = first ? `${first.path.join('.') || '(root)'}: ${first.message}` : 'unknown problem';
    throw new BdsnapError('ECORRUPT', `${file} is not a valid restore journal (${where})`);
  }
  if (devicePath !== undefined && parsed.data.devicePath !== devicePath) {
    throw new BdsnapError('ECORRUPT', `${file} is the journal of a restore of ${parsed.data.devicePath}, not of ${devicePath}`);
  }
  return parsed.data;
}

export async function writeJournal(file: string, journal: Journal): Promise<void> {
  await writeFileAtomic(file, JSON.stringify(journal), SESSION_FILE_MODE);
}
