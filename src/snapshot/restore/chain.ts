/**
 * Step 1 of a restore: which sessions to apply. The chain is the target session and every
 * newer session of the same device in the same snapshot root, oldest first, minus those a
 * finished restore already undid. Refused here: a failed session (its originals are
 * incomplete), sessions that disagree on device size or chunk size, an unreadable directory
 * that may be a newer session (without it the chain is unknown), a restore of another session
 * that did not finish, and a target whose start was lost.
 *
 * A finished restore takes the device back to its target's start. Newer sessions it undid
 * leave the chain of any later restore; but if its target is older than the session asked for
 * now, the device went back to before that session started, and what the restore overwrote is
 * kept nowhere: the session's start cannot be rebuilt, and only a refusal is right.
 */

import path from 'node:path';
import { BdsnapError } from '../../errors.js';
import { JOURNAL_FILE } from '../format.js';
import { compareSessions, listSessions, readSessionInfo, type SessionInfo } from '../sessions.js';
import { readJournal, type Journal } from './journal.js';
import type { FinishedRestore } from './check.js';

export interface Chain {
  /** The session asked for. */
  target: SessionInfo;
  /** Sessions to apply, oldest (the target) first. */
  sessions: SessionInfo[];
  /**
   * A finished restore from the target already undid it: its originals are still the content
   * to restore, but its end digests describe a state that no longer exists.
   */
  targetUndone: boolean;
  /** Every readable session of the device from the target on: what an in-place restore undoes. */
  undoes: string[];
  /** Every finished restore of the device, for the continuity check. */
  restores: FinishedRestore[];
}

/** Whether the finished restore `j` (from a session older than `s`) took the device back to before `s` started. */
function undid(j: Journal, s: SessionInfo): boolean {
  if (j.sessions.includes(s.dir)) return true;
  if (j.listsAll) return false;
  // A journal written before `listsAll` lists only the sessions it applied: tell by time.
  const finishedMs = Date.parse(j.finishedAt ?? '');
  const mountMs = Date.parse(s.mountTime);
  return !(finishedMs < mountMs);
}

/** The restore journal of each session that has one. Errors: ECORRUPT. */
export async function readJournals(sessions: SessionInfo[], devicePath: string): Promise<Map<string, Journal>> {
  const journals = new Map<string, Journal>();
  for (const s of sessions) {
    const j = await readJournal(path.join(s.dir, JOURNAL_FILE), devicePath);
    if (j !== undefined) journals.set(s.dir, j);
  }
  return journals;
}

/**
 * A restore of `devicePath` that was interrupted (its journal still says 'running'): the device
 * is half way to that session's start, neither state. The session it restores, or undefined.
 * Errors: ECORRUPT (a journal that cannot be read).
 */
export async function unfinishedRestore(snapshotRoot: string, devicePath: string): Promise<{ dir: string; startedAt: string } | undefined> {
  const sessions = (await listSessions(snapshotRoot, devicePath)).filter((s) => s.state !== 'unreadable');
  for (const [dir, j] of await readJournals(sessions, devicePath)) {
    if (j.state === 'running') return { dir, startedAt: j.startedAt };
  }
  return undefined;
}

/**
 * Refuse to open `devicePath` for anything that reads or records its content (a mount, an NBD
 * client, a snapshot, a session) while an interrupted restore has it half way: neither state.
 * Called with the device's lock held, so no restore can start and die between the check and
 * the open. Errors: EBUSY naming the restore to finish, ECORRUPT (an unreadable journal).
 */
export async function refuseUnfinishedRestore(snapshotRoot: string, devicePath: string): Promise<void> {
  const half = await unfinishedRestore(snapshotRoot, devicePath);
  if (half) {
    throw new BdsnapError('EBUSY', `${devicePath} is half way through a restore from ${half.dir} (started at ${half.startedAt}, interrupted); finish it first: bdsnap restore ${half.dir}`);
  }
}

/**
 * The sessions whose start is lost: a finished restore from an older session took the device
 * back to before them. By session directory: the older session and when its restore finished.
 */
export function lostStarts(sessions: SessionInfo[], journals: Map<string, Journal>): Map<string, { by: string; finishedAt: string }> {
  const lost = new Map<string, { by: string; finishedAt: string }>();
  for (const older of sessions) {
    const j = journals.get(older.dir);
    if (j?.state !== 'done') continue;
    for (const s of sessions) {
      if (!lost.has(s.dir) && compareSessions(s, older) > 0 && undid(j, s)) lost.set(s.dir, { by: older.dir, finishedAt: j.finishedAt ?? '?' });
    }
  }
  return lost;
}

/** Errors: ENOENT, ECORRUPT, ESESSION, EMISMATCH. Warnings are appended to `warnings`. */
export async function resolveChain(sessionDir: string, warnings: string[]): Promise<Chain> {
  const target = await readSessionInfo(sessionDir);
  const devicePath = target.devicePath;
  const all = await listSessions(path.dirname(target.dir), devicePath);
  // Names sort by mount time within one device (fixed-width UTC stamp), so an unreadable
  // directory named after the target may be a newer session: without it the chain is unknown.
  const unreadable = all.filter((s) => s.state === 'unreadable' && path.basename(s.dir) > path.basename(target.dir));
  if (unreadable.length > 0) {
    const s = unreadable[0]!;
    throw new BdsnapError('ECORRUPT', `session directory ${s.dir} (which may be a newer session of ${devicePath}) cannot be read: ${s.problem ?? 'unknown problem'}`);
  }
  const readable = all.filter((s) => s.state !== 'unreadable');
  const journals = await readJournals(readable, devicePath);
  for (const [dir, j] of journals) {
    if (j.state === 'running' && dir !== target.dir) {
      throw new BdsnapError('ESESSION', `a restore of ${devicePath} from ${dir} started at ${j.startedAt} did not finish, so the device is half way to that session's start; finish it first (bdsnap restore ${dir})`);
    }
  }
  const lost = lostStarts(readable, journals).get(target.dir);
  if (lost) {
    throw new BdsnapError('ESESSION', `the start of ${target.dir} cannot be rebuilt: a restore from the older session ${lost.by}, finished at ${lost.finishedAt}, took ${devicePath} back to before it, and what that restore overwrote is kept nowhere; ${lost.by} and sessions started since can still be restored`);
  }

  let chain = readable.filter((s) => compareSessions(s, target) >= 0);
  const undoes = chain.map((s) => s.dir);
  // A finished restore from a session took it and the sessions it applied back: those are undone.
  // Newer ones leave the chain (their originals describe states that no longer exist); the
  // target stays (its originals are still the content to restore) but its end digests are stale.
  let targetUndone = false;
  for (const s of [...chain]) {
    const j = journals.get(s.dir);
    if (j?.state !== 'done' || !chain.includes(s)) continue;
    const undone = new Set(j.sessions);
    chain = chain.filter((c) => c.dir === target.dir || !undone.has(c.dir));
    if (s.dir === target.dir) targetUndone = true;
    else warnings.push(`session ${s.dir} and ${j.sessions.length - 1} later one(s) were already undone by a restore finished at ${j.finishedAt ?? '?'}`);
  }
  if (chain[0]?.dir !== target.dir) throw new BdsnapError('ENOENT', `${target.dir} is not listed in its snapshot root`);
  for (const s of chain) {
    if (s.state === 'failed') {
      throw new BdsnapError('ESESSION', `session ${s.dir} failed (${s.failedReason ?? 'no reason recorded'}): its originals are incomplete, so the device cannot be restored to ${s.dir === target.dir ? 'its start' : `a point before it`}`);
    }
    if (s.deviceSize !== target.deviceSize) {
      throw new BdsnapError('EMISMATCH', `session ${s.dir} recorded a device size of ${s.deviceSize} bytes but ${target.dir} recorded ${target.deviceSize}`);
    }
    if (s.chunkSize !== target.chunkSize) {
      throw new BdsnapError('ESESSION', `sessions ${target.dir} and ${s.dir} use different chunk sizes (${target.chunkSize}, ${s.chunkSize}); restore them one at a time, newest first`);
    }
    if (s.state === 'interrupted') warnings.push(`session ${s.dir} was interrupted (recovered after a crash): its originals are used, but it has no end digests to check`);
    if (s.state === 'active') warnings.push(`session ${s.dir} was never closed (crash?): it is treated as interrupted and has no end digests to check`);
  }
  const restores = readable.flatMap((s) => {
    const journal = journals.get(s.dir);
    return journal?.state === 'done' ? [{ target: s, journal }] : [];
  });
  return { target, sessions: chain, targetUndone, undoes, restores };
}
