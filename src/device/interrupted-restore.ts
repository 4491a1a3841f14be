/**
 * Where a backup restore in place (`bdsnap backup restore` onto the device, or onto an existing
 * `--output` file) keeps its journal and its undo log, so that a restore that was killed is
 * found from the target alone: by the next restore into it, which finishes it, and by the
 * daemon, which refuses to open a device left half way.
 *
 * One private directory per target, named after its identity (a file's dev and inode, a block
 * device's rdev), under the restore directory: $BDSNAP_RESTORE_DIR; for root
 * /var/lib/bdsnap/restores (kept across a reboot, unlike /tmp, and only root may write there);
 * for anyone else a directory of their own under $XDG_STATE_HOME or ~/.local/state. Both levels
 * must be private directories of this user (see host/private-dir.ts).
 *
 * Invariant: while the target may hold neither its old content nor the backup's, `journal.json`
 * is there, written durably before the first byte of the target changes; it is removed only
 * after a restore into the target finished and was flushed, or a failed one put back a target
 * that was whole before it. A journal that cannot be read refuses the device (ECORRUPT), never
 * passes for "no restore".
 */

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { z } from 'zod';
import { BdsnapError, toBdsnapError } from '../errors.js';
import { fsyncDirectory, writeFileAtomic } from '../host/atomic-file.js';
import { checkPrivateDir, ensurePrivateDir } from '../host/private-dir.js';
import { parseJson } from '../stored-json.js';
import type { DeviceIdentity } from './block-device.js';

const JOURNAL_FILE = 'journal.json';
/** Largest journal read: it holds a few names. */
const MAX_JOURNAL_BYTES = 64 * 1024;

const journalSchema = z.object({
  state: z.literal('running'),
  /** The backup being restored, and the command that restores it again. */
  backup: z.string().min(1),
  command: z.string().min(1),
  target: z.string().min(1),
  identity: z.string().min(1),
  startedAt: z.string().min(1),
});

export type BackupRestoreJournal = z.infer<typeof journalSchema>;

/** The restore directory (see the header). */
export function restoreDirectory(): string {
  if (process.env.BDSNAP_RESTORE_DIR) return process.env.BDSNAP_RESTORE_DIR;
  if ((process.geteuid?.() ?? 0) === 0) return '/var/lib/bdsnap/restores';
  const state = process.env.XDG_STATE_HOME || path.join(os.homedir(), '.local', 'state');
  return path.join(state, 'bdsnap', 'restores');
}

function identityKey(identity: DeviceIdentity): string {
  return identity.kind === 'block' ? `block-${identity.rdev}` : `file-${identity.dev}-${identity.ino}`;
}

function describe(identity: DeviceIdentity): string {
  return identity.kind === 'block' ? `rdev ${identity.rdev}` : `${identity.dev}:${identity.ino}`;
}

/**
 * The journal of an interrupted backup restore into the file or device `identity`, or
 * undefined. Errors: ECORRUPT (a journal that does not parse or is not a plain file), EPERM (a
 * directory that is not private), EIO.
 */
export async function readBackupRestoreJournal(identity: DeviceIdentity): Promise<BackupRestoreJournal | undefined> {
  const top = restoreDirectory();
  const dir = path.join(top, identityKey(identity));
  for (const d of [top, dir]) {
    try {
      await checkPrivateDir(d);
    } catch (err) {
      if (toBdsnapError(err).code === 'ENOENT') return undefined;
      throw err;
    }
  }
  const file = path.join(dir, JOURNAL_FILE);
  let fh: fs.promises.FileHandle;
  try {
    fh = await fs.promises.open(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    if ((err as NodeJS.ErrnoException).code === 'ELOOP') throw new BdsnapError('ECORRUPT', `${file} is a symbolic link, not a restore journal`);
    throw toBdsnapError(err);
  }
  try {
    const st = await fh.stat();
    if (!st.isFile() || st.size > MAX_JOURNAL_BYTES) throw new BdsnapError('ECORRUPT', `${file} is not a restore journal (not a small regular file)`);
    const journal = parseJson(await fh.readFile(), journalSchema, (problem) => `${file} is not a valid restore journal (${problem})`);
    if (journal.identity !== describe(identity)) throw new BdsnapError('ECORRUPT', `${file} is the journal of a restore into ${journal.identity}, not ${describe(identity)}`);
    return journal;
  } finally {
    await fh.close();
  }
}

/**
 * Refuse to open `devicePath` (opened as `identity`, its lock held) while a backup restore into
 * it was interrupted: it holds neither its old content nor the backup's. Errors: EBUSY naming
 * the command that finishes the restore, and those of readBackupRestoreJournal.
 */
export async function refuseInterruptedBackupRestore(devicePath: string, identity: DeviceIdentity): Promise<void> {
  const j = await readBackupRestoreJournal(identity);
  if (j) {
    throw new BdsnapError('EBUSY', `${devicePath} is half way through a restore of backup ${j.backup} (started at ${j.startedAt}, interrupted); finish it first: ${j.command}`);
  }
}

/**
 * The place of one backup restore in place: its private directory, holding the journal and
 * the undo log. Made with `begin` before the first write to the target.
 */
export class BackupRestoreRecord {
  /** The private directory of this target: the undo log is made here. */
  readonly dir: string;
  /** The journal of an earlier restore into the target that was interrupted: this one finishes it. */
  readonly interrupted: BackupRestoreJournal | undefined;

  private constructor(dir: string, interrupted: BackupRestoreJournal | undefined) {
    this.dir = dir;
    this.interrupted = interrupted;
  }

  /**
   * Make the target's directory and, unless an interrupted restore's journal is there (kept:
   * the target stays half way until a restore into it ends), write this restore's journal,
   * durably. Errors: as BdsnapError.
   */
  static async begin(identity: DeviceIdentity, what: { backup: string; command: string; target: string }): Promise<BackupRestoreRecord> {
    const top = restoreDirectory();
    const dir = path.join(top, identityKey(identity));
    try {
      await ensurePrivateDir(top);
      await ensurePrivateDir(dir);
    } catch (err) {
      const e = toBdsnapError(err);
      throw new BdsnapError(e.code, `cannot make the journal of a restore in place in ${dir}: ${e.message}; set BDSNAP_RESTORE_DIR to a private directory with room`, { cause: err });
    }
    const interrupted = await readBackupRestoreJournal(identity);
    if (!interrupted) {
      const journal: BackupRestoreJournal = { state: 'running', ...what, identity: describe(identity), startedAt: new Date().toISOString() };
      await writeFileAtomic(path.join(dir, JOURNAL_FILE), JSON.stringify(journal));
    }
    return new BackupRestoreRecord(dir, interrupted);
  }

  /** The target is whole (restored and flushed, or put back when it was whole before): remove the journal and the directory. */
  async end(): Promise<void> {
    try {
      await fs.promises.rm(path.join(this.dir, JOURNAL_FILE), { force: true });
      await fsyncDirectory(this.dir);
      await fs.promises.rm(this.dir, { recursive: true, force: true });
    } catch (err) {
      throw toBdsnapError(err);
    }
  }
}
