/**
 * Retention: which backups of one group a policy keeps. Pure, no I/O.
 *
 * The semantics are restic's (`restic forget`, as documented for 0.16 and later), so that a
 * policy written for restic means the same here:
 * - `keepLast N`: the N newest backups.
 * - `keepHourly|Daily|Weekly|Monthly|Yearly N`: going from the newest backup to the oldest, the
 *   first (newest) backup of each of the last N hours, days, ISO weeks, months or years **that
 *   have a backup**: an empty period does not use up a count. If a rule still has counts left
 *   when the oldest backup is reached, the oldest is kept too ("oldest daily backup"), so the
 *   history reaches as far back as the rule asked for.
 * - `keepWithinMs D`: every backup made within D before the newest backup of the group
 *   (strictly after newest - D), not before now: a host that stopped backing up keeps its last
 *   backups. Backups dated in the future do not count as the newest (one host's wrong clock
 *   must not make all the others' backups look old) and are kept by this rule.
 * A backup is kept when ANY rule keeps it (restic ORs the rules; PBS instead applies them one
 * after the other to what the previous rules left). Each kept backup lists every rule that
 * keeps it.
 *
 * Periods are calendar periods in the process's local time zone (set TZ to choose; restic uses
 * local time too): hours :00 to :59, days 00:00 to 23:59, ISO 8601 weeks Monday to Sunday (the
 * days around New Year may belong to the week of the other year), months, years. Backups with
 * the same time are taken in id order, the greater id first, so the plan never depends on
 * listing order.
 */

import { BdsnapError } from '../errors.js';

export interface RetentionPolicy {
  keepLast?: number;
  keepHourly?: number;
  keepDaily?: number;
  keepWeekly?: number;
  keepMonthly?: number;
  keepYearly?: number;
  /** Keep every backup within this many milliseconds before the group's newest. */
  keepWithinMs?: number;
}

export interface Dated {
  id: string;
  timeMs: number;
}

export interface Kept<T> {
  backup: T;
  /** Why, e.g. ['last backup', 'daily backup', 'within 7d']. */
  reasons: string[];
}

export interface RetentionPlan<T> {
  /** Newest first. */
  keep: Array<Kept<T>>;
  /** Newest first. */
  remove: T[];
}

const COUNT_RULES = [
  ['keepLast', 'last'],
  ['keepHourly', 'hourly'],
  ['keepDaily', 'daily'],
  ['keepWeekly', 'weekly'],
  ['keepMonthly', 'monthly'],
  ['keepYearly', 'yearly'],
] as const;

/** True if the policy keeps nothing by any rule (then forgetting by it is refused). */
export function isEmptyPolicy(policy: RetentionPolicy): boolean {
  return COUNT_RULES.every(([key]) => !policy[key]) && !policy.keepWithinMs;
}

/** EINVAL unless every count is a whole number >= 0 and the duration positive; EINVAL for an empty policy. */
export function checkPolicy(policy: RetentionPolicy): void {
  for (const [key, name] of COUNT_RULES) {
    const n = policy[key];
    if (n !== undefined && !(Number.isSafeInteger(n) && n >= 0)) throw new BdsnapError('EINVAL', `--keep-${name} takes a whole number, got ${n}`);
  }
  if (policy.keepWithinMs !== undefined && !(Number.isFinite(policy.keepWithinMs) && policy.keepWithinMs > 0)) {
    throw new BdsnapError('EINVAL', `--keep-within takes a positive duration, got ${policy.keepWithinMs} ms`);
  }
  if (isEmptyPolicy(policy)) {
    throw new BdsnapError('EINVAL', 'the policy keeps nothing, so nothing is removed: give --keep-last, --keep-hourly|daily|weekly|monthly|yearly N (N >= 1) or --keep-within DURATION');
  }
}

/** The calendar period of `timeMs` for a rule, as one number (YYYYMMDDHH, YYYYWW, ...). */
function periodOf(rule: (typeof COUNT_RULES)[number][1], timeMs: number, nr: number): number {
  const d = new Date(timeMs);
  switch (rule) {
    case 'last': return nr;
    case 'hourly': return ((d.getFullYear() * 100 + d.getMonth() + 1) * 100 + d.getDate()) * 100 + d.getHours();
    case 'daily': return (d.getFullYear() * 100 + d.getMonth() + 1) * 100 + d.getDate();
    case 'weekly': return isoWeek(d);
    case 'monthly': return d.getFullYear() * 100 + d.getMonth() + 1;
    case 'yearly': return d.getFullYear();
  }
}

/** ISO 8601 week-year and week as YYYYWW: the week of a date is the week of its Thursday. */
export function isoWeek(d: Date): number {
  const mondayBased = (d.getDay() + 6) % 7;
  const thursday = new Date(d.getFullYear(), d.getMonth(), d.getDate() - mondayBased + 3);
  const year = thursday.getFullYear();
  // Week 1 is the week of January 4th; rounding absorbs a daylight-saving hour.
  const jan4 = new Date(year, 0, 4);
  const firstThursday = new Date(year, 0, 4 - ((jan4.getDay() + 6) % 7) + 3);
  const week = 1 + Math.round((thursday.getTime() - firstThursday.getTime()) / (7 * 86_400_000));
  return year * 100 + week;
}

/** A duration as its user would write it: 7d, 36h, 90m, 45s, or milliseconds. */
export function formatDurationMs(ms: number): string {
  for (const [unit, size] of [['d', 86_400_000], ['h', 3_600_000], ['m', 60_000], ['s', 1000]] as const) {
    if (ms % size === 0) return `${ms / size}${unit}`;
  }
  return `${ms}ms`;
}

/** Which of `backups` (one group: one host and device set) `policy` keeps. checkPolicy first. */
export function applyRetention<T extends Dated>(backups: readonly T[], policy: RetentionPolicy, nowMs: number): RetentionPlan<T> {
  checkPolicy(policy);
  const list = [...backups].sort((a, b) => b.timeMs - a.timeMs || (a.id < b.id ? 1 : a.id > b.id ? -1 : 0));
  const rules = COUNT_RULES.filter(([key]) => (policy[key] ?? 0) > 0).map(([key, name]) => ({ name, left: policy[key]!, last: Number.NaN }));
  const latestMs = list.find((b) => b.timeMs <= nowMs)?.timeMs;
  const withinAfterMs = policy.keepWithinMs === undefined ? undefined : latestMs === undefined ? -Infinity : latestMs - policy.keepWithinMs;
  const plan: RetentionPlan<T> = { keep: [], remove: [] };
  list.forEach((backup, nr) => {
    const reasons: string[] = [];
    if (withinAfterMs !== undefined && backup.timeMs > withinAfterMs) reasons.push(`within ${formatDurationMs(policy.keepWithinMs!)}`);
    for (const rule of rules) {
      if (rule.left === 0) continue;
      const period = periodOf(rule.name, backup.timeMs, nr);
      const oldest = nr === list.length - 1;
      if (period !== rule.last || oldest) {
        reasons.push(`${period === rule.last ? 'oldest ' : ''}${rule.name} backup`);
        rule.last = period;
        rule.left--;
      }
    }
    if (reasons.length > 0) plan.keep.push({ backup, reasons });
    else plan.remove.push(backup);
  });
  return plan;
}
