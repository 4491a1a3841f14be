/**
 * Forgetting old sessions of a device, so the snapshot root does not grow for ever.
 *
 * A restore of a session applies every newer session of the device first, so a session can
 * only go together with every session older than it: what is removed is always the oldest part
 * of the device's sessions, and whatever is kept stays restorable exactly as before. Sessions
 * whose start is lost (a restore of an older session went back past them, `chain.ts`) can
 * never be restored and go too, before the older session whose restore journal says so.
 *
 * Never removed: a session still open (its store is locked by a live process, or it is marked
 * active and was never recovered), one whose restore did not finish, and anything newer than
 * those. A directory is first renamed out of the listing (`*.forgotten`), then deleted, so a
 * crash half way leaves no half-removed session that a restore would trip over.
 */

import fs from 'node:fs';
import path from 'node:path';
import { BdsnapError, toBdsnapError } from '../errors.js';
import { removePath, renamePath } from '../host/fd-io.js';
import { FORGOTTEN_SUFFIX } from './format.js';
import { compareSessions, listSessions, type SessionInfo } from './sessions.js';
import { lostStarts, readJournals } from './restore/chain.js';


export interface ForgetPolicy {
  /** Keep the newest N sessions that can still be restored. */
  keepLast?: number;
  /** Keep the sessions mounted within this many milliseconds of `nowMs`. */
  keepWithinMs?: number;
  nowMs?: number;
}

export interface ForgetPlan {
  devicePath: string;
  /** Oldest first, each with why it goes. */
  remove: Array<{ dir: string; reason: string }>;
  /** Oldest first. */
  keep: string[];
  /** Why nothing older than the kept sessions' oldest could go further, if something stopped it. */
  stoppedBy?: string;
}

/** What forgetting with `policy` would remove. Errors: EINVAL (no policy), ECORRUPT (an unreadable session). */
export async function planForget(snapshotRoot: string, devicePath: string, policy: ForgetPolicy): Promise<ForgetPlan> {
  if (policy.keepLast === undefined && policy.keepWithinMs === undefined) {
    throw new BdsnapError('EINVAL', 'say what to keep: --keep-last N and/or --keep-within DURATION');
  }
  if (policy.keepLast !== undefined && (!Number.isSafeInteger(policy.keepLast) || policy.keepLast < 0)) throw new BdsnapError('EINVAL', `--keep-last must be a whole number, got ${policy.keepLast}`);
  const sessions = await listSessions(snapshotRoot, devicePath);
  const unreadable = sessions.find((s) => s.state === 'unreadable');
  if (unreadable) {
    throw new BdsnapError('ECORRUPT', `session directory ${unreadable.dir} cannot be read (${unreadable.problem ?? 'unknown problem'}), so which sessions a restore needs is unknown; repair or remove it first`);
  }
  const journals = await readJournals(sessions, devicePath);
  const lost = lostStarts(sessions, journals);
  const live = sessions.filter((s) => !lost.has(s.dir));

  // The sessions the policy keeps, and with them every newer one (their restores need them).
  const nowMs = policy.nowMs ?? Date.now();
  const wanted = live.filter((s, i) => (policy.keepLast !== undefined && i >= live.length - policy.keepLast)
    || (policy.keepWithinMs !== undefined && Date.parse(s.mountTime) >= nowMs - policy.keepWithinMs));
  let cut = wanted.length > 0 ? live.indexOf(wanted[0]!) : live.length;
  // Nothing at or after a session that may still be written or is half restored goes.
  let stoppedBy: string | undefined;
  for (let i = 0; i < cut; i++) {
    const why = await stillInUse(live[i]!, journals.get(live[i]!.dir)?.state);
    if (why) {
      cut = i;
      stoppedBy = `${live[i]!.dir} ${why}`;
      break;
    }
  }
  const remove: ForgetPlan['remove'] = [];
  const going = new Set(live.slice(0, cut).map((s) => s.dir));
  for (const s of sessions) {
    const l = lost.get(s.dir);
    if (l) remove.push({ dir: s.dir, reason: `cannot be restored: a restore from ${l.by} (finished at ${l.finishedAt}) went back past its start` });
    else if (going.has(s.dir)) remove.push({ dir: s.dir, reason: 'older than the sessions kept' });
  }
  // Sessions whose start is lost go before the sessions whose journals say so.
  remove.sort((a, b) => Number(lost.has(b.dir)) - Number(lost.has(a.dir)));
  const keep = sessions.filter((s) => !remove.some((r) => r.dir === s.dir)).sort(compareSessions).map((s) => s.dir);
  return { devicePath, remove, keep, ...(stoppedBy ? { stoppedBy } : {}) };
}

/** Why a session cannot go yet, or undefined. */
async function stillInUse(s: SessionInfo, journalState: 'running' | 'done' | undefined): Promise<string | undefined> {
  if (s.state === 'active') return 'is still open (or was never recovered after a crash: start the daemon, or restore it, first)';
  if (journalState === 'running') return `has a restore that did not finish (run bdsnap restore ${s.dir} first)`;
  return undefined;
}

/** Remove what `plan` says, in its order. Errors: as BdsnapError (what was removed before stays removed). */
export async function forgetSessions(snapshotRoot: string, plan: ForgetPlan): Promise<void> {
  await removeForgottenLeftovers(snapshotRoot);
  for (const { dir } of plan.remove) {
    const gone = `${dir}${FORGOTTEN_SUFFIX}`;
    try {
      await renamePath(dir, gone);
      await removePath(gone, { recursive: true });
    } catch (err) {
      throw new BdsnapError(toBdsnapError(err).code, `cannot remove session ${dir}: ${(err as Error).message}`, { cause: err });
    }
  }
}

/** Leftovers of a removal a crash interrupted. */
async function removeForgottenLeftovers(snapshotRoot: string): Promise<void> {
  const entries = await fs.promises.readdir(snapshotRoot).catch(() => [] as string[]);
  for (const name of entries) {
    if (name.endsWith(FORGOTTEN_SUFFIX)) await removePath(path.join(snapshotRoot, name), { recursive: true });
  }
}
