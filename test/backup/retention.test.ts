/**
 * Retention as a table of cases checked against restic's documented behaviour (`restic forget`,
 * doc/060_forget.rst: rules ORed, calendar periods that have a backup, the oldest kept while a
 * rule has counts left, --keep-within relative to the newest backup, future backups ignored),
 * plus random histories checked against a second, independent formulation of the same rules.
 */

process.env.TZ = 'UTC';

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { applyRetention, checkPolicy, isoWeek, type RetentionPolicy } from '../../src/backup/retention.js';

interface B {
  id: string;
  timeMs: number;
}

const at = (iso: string, id = iso): B => ({ id, timeMs: Date.parse(iso) });
const DAY = 86_400_000;
const HOUR = 3_600_000;

/** Kept ids (newest first) with reasons, and removed ids. */
function plan(backups: B[], policy: RetentionPolicy, now = '2030-01-01T00:00:00Z'): { keep: Record<string, string>; remove: string[] } {
  const p = applyRetention(backups, policy, Date.parse(now));
  return { keep: Object.fromEntries(p.keep.map((k) => [k.backup.id, k.reasons.join(', ')])), remove: p.remove.map((b) => b.id) };
}

interface Case {
  name: string;
  backups: B[];
  policy: RetentionPolicy;
  now?: string;
  keep: Record<string, string>;
  remove: string[];
}

const sundays = ['2019-09-01', '2019-09-08', '2019-09-15', '2019-09-22', '2019-09-29', '2019-10-06', '2019-10-13', '2019-10-20', '2019-10-27', '2019-11-03', '2019-11-10', '2019-11-17']
  .map((d) => at(`${d}T11:00:00Z`, d));

const CASES: Case[] = [
  {
    // restic's own example: one backup every Sunday for 12 weeks, --keep-daily 4.
    name: 'restic docs: 12 Sundays, keep-daily 4 keeps the last four Sundays',
    backups: sundays, policy: { keepDaily: 4 },
    keep: { '2019-11-17': 'daily backup', '2019-11-10': 'daily backup', '2019-11-03': 'daily backup', '2019-10-27': 'daily backup' },
    remove: ['2019-10-20', '2019-10-13', '2019-10-06', '2019-09-29', '2019-09-22', '2019-09-15', '2019-09-08', '2019-09-01'],
  },
  {
    name: 'keep-last N keeps the N newest, whatever their times',
    backups: [at('2026-01-01T00:00:00Z', 'a'), at('2026-01-01T00:00:01Z', 'b'), at('2026-01-01T00:00:02Z', 'c'), at('2026-01-05T00:00:00Z', 'd')],
    policy: { keepLast: 2 },
    keep: { d: 'last backup', c: 'last backup' }, remove: ['b', 'a'],
  },
  {
    name: 'keep-last larger than the history keeps everything',
    backups: [at('2026-01-01T00:00:00Z', 'a'), at('2026-01-02T00:00:00Z', 'b')],
    policy: { keepLast: 5 },
    keep: { b: 'last backup', a: 'last backup' }, remove: [],
  },
  {
    name: 'hour boundaries: :59:59.999 and :00 are two hours; the newest of each hour is kept',
    backups: [at('2026-03-01T10:00:00.000Z', '10:00'), at('2026-03-01T10:59:59.999Z', '10:59'), at('2026-03-01T11:00:00.000Z', '11:00'), at('2026-03-01T11:30:00Z', '11:30')],
    policy: { keepHourly: 2 },
    keep: { '11:30': 'hourly backup', '10:59': 'hourly backup' }, remove: ['11:00', '10:00'],
  },
  {
    name: 'day boundary at midnight; days without backups use up no count',
    backups: [at('2026-03-01T23:59:59.999Z', 'd1-late'), at('2026-03-02T00:00:00Z', 'd2-first'), at('2026-03-02T18:00:00Z', 'd2-last'), at('2026-03-09T09:00:00Z', 'd9')],
    policy: { keepDaily: 3 },
    keep: { d9: 'daily backup', 'd2-last': 'daily backup', 'd1-late': 'daily backup' }, remove: ['d2-first'],
  },
  {
    name: 'ISO weeks across New Year: Mon 2024-12-30 is in 2025-W01 with Jan 1 and Sun Jan 5',
    backups: [at('2024-12-29T12:00:00Z', 'sun-w52'), at('2024-12-30T12:00:00Z', 'mon-w01'), at('2025-01-01T12:00:00Z', 'wed-w01'), at('2025-01-05T23:00:00Z', 'sun-w01'), at('2025-01-06T00:30:00Z', 'mon-w02')],
    policy: { keepWeekly: 3 },
    keep: { 'mon-w02': 'weekly backup', 'sun-w01': 'weekly backup', 'sun-w52': 'weekly backup' }, remove: ['wed-w01', 'mon-w01'],
  },
  {
    name: 'month boundaries: Jan 31 23:59 and Feb 1 00:00 are two months',
    backups: [at('2026-01-15T00:00:00Z', 'jan15'), at('2026-01-31T23:59:00Z', 'jan31'), at('2026-02-01T00:00:00Z', 'feb1'), at('2026-02-28T00:00:00Z', 'feb28')],
    policy: { keepMonthly: 2 },
    keep: { feb28: 'monthly backup', jan31: 'monthly backup' }, remove: ['feb1', 'jan15'],
  },
  {
    name: 'counts left at the oldest backup: the oldest is kept too (restic: "oldest")',
    backups: [at('2022-03-01T00:00:00Z', 'y22a'), at('2022-06-01T00:00:00Z', 'y22b'), at('2023-12-31T23:59:59Z', 'y23'), at('2024-01-01T00:00:00Z', 'y24')],
    policy: { keepYearly: 5 },
    keep: { y24: 'yearly backup', y23: 'yearly backup', y22b: 'yearly backup', y22a: 'oldest yearly backup' }, remove: [],
  },
  {
    name: 'no counts left at the oldest: it goes',
    backups: [at('2022-03-01T00:00:00Z', 'y22a'), at('2022-06-01T00:00:00Z', 'y22b'), at('2023-12-31T23:59:59Z', 'y23'), at('2024-01-01T00:00:00Z', 'y24')],
    policy: { keepYearly: 3 },
    keep: { y24: 'yearly backup', y23: 'yearly backup', y22b: 'yearly backup' }, remove: ['y22a'],
  },
  {
    name: 'ties: the same instant is ordered by id, the greater first, whatever the input order',
    backups: [at('2026-05-05T05:05:05Z', 'b'), at('2026-05-05T05:05:05Z', 'a'), at('2026-05-04T00:00:00Z', 'z')],
    policy: { keepLast: 1, keepDaily: 1 },
    keep: { b: 'last backup, daily backup' }, remove: ['a', 'z'],
  },
  {
    name: 'rules are ORed: keep-last 2 and keep-daily 3 over two backups a day',
    backups: [1, 2, 3, 4].flatMap((d) => [at(`2026-04-0${d}T08:00:00Z`, `d${d}-08`), at(`2026-04-0${d}T20:00:00Z`, `d${d}-20`)]),
    policy: { keepLast: 2, keepDaily: 3 },
    keep: { 'd4-20': 'last backup, daily backup', 'd4-08': 'last backup', 'd3-20': 'daily backup', 'd2-20': 'daily backup' },
    remove: ['d3-08', 'd2-08', 'd1-20', 'd1-08'],
  },
  {
    name: 'keep-within is relative to the newest backup, not to now; the limit itself is out',
    backups: [at('2026-01-03T12:00:00.000Z', 'edge'), at('2026-01-03T12:00:00.001Z', 'inside'), at('2026-01-01T00:00:00Z', 'old'), at('2026-01-10T12:00:00Z', 'newest')],
    policy: { keepWithinMs: 7 * DAY }, now: '2026-01-20T00:00:00Z',
    keep: { newest: 'within 7d', inside: 'within 7d' }, remove: ['edge', 'old'],
  },
  {
    name: 'keep-within: a backup dated in the future is kept and is not the newest',
    backups: [at('2026-01-10T12:00:00Z', 'newest'), at('2026-01-10T00:00:00Z', 'same-day'), at('2026-01-01T00:00:00Z', 'old'), at('2027-01-01T00:00:00Z', 'future')],
    policy: { keepWithinMs: 36 * HOUR }, now: '2026-01-20T00:00:00Z',
    keep: { future: 'within 36h', newest: 'within 36h', 'same-day': 'within 36h' }, remove: ['old'],
  },
  {
    name: 'keep-within when every backup is in the future keeps them all',
    backups: [at('2027-01-01T00:00:00Z', 'f1'), at('2026-01-01T00:00:00Z', 'f0')],
    policy: { keepWithinMs: HOUR }, now: '2025-01-01T00:00:00Z',
    keep: { f1: 'within 1h', f0: 'within 1h' }, remove: [],
  },
  {
    name: 'keep-within with keep-monthly: a backup may have both reasons',
    backups: [at('2026-02-10T00:00:00Z', 'feb10'), at('2026-02-09T00:00:00Z', 'feb9'), at('2026-01-20T00:00:00Z', 'jan20'), at('2026-01-05T00:00:00Z', 'jan5'), at('2025-12-31T00:00:00Z', 'dec31')],
    policy: { keepWithinMs: 2 * DAY, keepMonthly: 2 },
    keep: { feb10: 'within 2d, monthly backup', feb9: 'within 2d', jan20: 'monthly backup' }, remove: ['jan5', 'dec31'],
  },
  {
    name: 'keep-daily 0 is no rule: keep-last alone decides',
    backups: [at('2026-01-01T00:00:00Z', 'a'), at('2026-01-02T00:00:00Z', 'b')],
    policy: { keepDaily: 0, keepLast: 1 },
    keep: { b: 'last backup' }, remove: ['a'],
  },
];

for (const c of CASES) {
  test(`retention: ${c.name}`, () => {
    const got = plan(c.backups, c.policy, c.now);
    assert.deepEqual(got, { keep: c.keep, remove: c.remove });
    // The plan does not depend on the order the backups were listed in.
    assert.deepEqual(plan([...c.backups].reverse(), c.policy, c.now), got);
  });
}

test('retention: restic docs, daily for two years with --keep-daily 7 --keep-weekly 5 --keep-monthly 12 --keep-yearly 75', () => {
  const backups: B[] = [];
  for (let t = Date.parse('2022-01-01T12:00:00Z'); t <= Date.parse('2023-12-31T12:00:00Z'); t += DAY) backups.push({ id: new Date(t).toISOString().slice(0, 10), timeMs: t });
  const got = plan(backups, { keepDaily: 7, keepWeekly: 5, keepMonthly: 12, keepYearly: 75 }, '2024-01-01T00:00:00Z');
  // 2023-12-31 is a Sunday: 7 days, 4 more Sundays, 11 more month ends, the end of 2022, and
  // (75 years asked, 2 there) the oldest backup.
  const want = [
    '2023-12-31', '2023-12-30', '2023-12-29', '2023-12-28', '2023-12-27', '2023-12-26', '2023-12-25',
    '2023-12-24', '2023-12-17', '2023-12-10', '2023-12-03',
    '2023-11-30', '2023-10-31', '2023-09-30', '2023-08-31', '2023-07-31', '2023-06-30', '2023-05-31', '2023-04-30', '2023-03-31', '2023-02-28', '2023-01-31',
    '2022-12-31', '2022-01-01',
  ];
  assert.deepEqual(Object.keys(got.keep), want);
  assert.equal(got.keep['2023-12-31'], 'daily backup, weekly backup, monthly backup, yearly backup');
  assert.equal(got.keep['2023-12-24'], 'weekly backup');
  assert.equal(got.keep['2022-01-01'], 'oldest yearly backup');
  assert.equal(got.remove.length, backups.length - want.length);
});

test('retention: ISO 8601 weeks', () => {
  const table: Array<[string, number]> = [
    ['2020-12-31', 202053], ['2021-01-03', 202053], ['2021-01-04', 202101], ['2024-12-29', 202452], ['2024-12-30', 202501],
    ['2018-12-31', 201901], ['2016-01-03', 201553], ['2026-06-15', 202625], ['2015-12-31', 201553], ['2027-01-01', 202653],
  ];
  for (const [day, want] of table) assert.equal(isoWeek(new Date(`${day}T12:00:00Z`)), want, day);
});

test('retention: a policy that keeps nothing, or a bad count, is refused', () => {
  assert.throws(() => checkPolicy({}), { code: 'EINVAL', message: /keeps nothing/ });
  assert.throws(() => checkPolicy({ keepLast: 0 }), { code: 'EINVAL' });
  assert.throws(() => checkPolicy({ keepDaily: -1 }), { code: 'EINVAL', message: /--keep-daily/ });
  assert.throws(() => checkPolicy({ keepLast: 1.5 }), { code: 'EINVAL' });
  assert.throws(() => checkPolicy({ keepWithinMs: 0 }), { code: 'EINVAL' });
  assert.throws(() => applyRetention([at('2026-01-01T00:00:00Z')], {}, 0), { code: 'EINVAL' });
});

/**
 * The same rules, said the other way round: for each calendar rule, sort the periods that have a
 * backup, newest first, and keep the newest backup of each of the first N; if fewer than N
 * periods exist, the oldest backup too. Within: strictly after the newest non-future backup - D.
 */
function oracle(backups: B[], policy: RetentionPolicy, nowMs: number): Set<string> {
  const sorted = [...backups].sort((a, b) => b.timeMs - a.timeMs || (a.id < b.id ? 1 : -1));
  const keep = new Set<string>();
  const key = (rule: string, t: number): string => {
    const d = new Date(t);
    const iso = d.toISOString();
    switch (rule) {
      case 'hourly': return iso.slice(0, 13);
      case 'daily': return iso.slice(0, 10);
      case 'weekly': return String(isoWeek(d));
      case 'monthly': return iso.slice(0, 7);
      default: return iso.slice(0, 4);
    }
  };
  if (policy.keepLast) for (const b of sorted.slice(0, policy.keepLast)) keep.add(b.id);
  for (const [rule, n] of [['hourly', policy.keepHourly], ['daily', policy.keepDaily], ['weekly', policy.keepWeekly], ['monthly', policy.keepMonthly], ['yearly', policy.keepYearly]] as const) {
    if (!n) continue;
    const newestOf = new Map<string, B>();
    for (const b of sorted) if (!newestOf.has(key(rule, b.timeMs))) newestOf.set(key(rule, b.timeMs), b);
    // Periods in the order their newest backups come (a period's backups are adjacent in time).
    const periods = [...newestOf.values()];
    for (const b of periods.slice(0, n)) keep.add(b.id);
    if (periods.length < n && sorted.length > 0) keep.add(sorted[sorted.length - 1]!.id);
  }
  if (policy.keepWithinMs) {
    const latest = sorted.find((b) => b.timeMs <= nowMs)?.timeMs ?? -Infinity;
    for (const b of sorted) if (b.timeMs > latest - policy.keepWithinMs) keep.add(b.id);
  }
  return keep;
}

test('retention: random histories agree with the period-by-period formulation', () => {
  const start = Date.parse('2024-12-20T00:00:00Z');
  const history = fc.uniqueArray(fc.integer({ min: 0, max: 60 * 24 * 4 }), { maxLength: 60 }).map((minutes) =>
    // Minutes over ~4 days and some far apart, around a New Year (week and year boundaries).
    minutes.map((m, i) => ({ id: `b${String(i).padStart(3, '0')}`, timeMs: start + (m % 5 === 0 ? m * 60_000 * 40 : m * 60_000 * 7) })));
  const count = fc.option(fc.integer({ min: 0, max: 8 }), { nil: undefined });
  const policy = fc.record({
    keepLast: count, keepHourly: count, keepDaily: count, keepWeekly: count, keepMonthly: count, keepYearly: count,
    keepWithinMs: fc.option(fc.integer({ min: 1, max: 30 * DAY }), { nil: undefined }),
  });
  fc.assert(fc.property(history, policy, fc.integer({ min: 0, max: 400 * DAY }), (backups, p, nowOffsetMs) => {
    const clean = Object.fromEntries(Object.entries(p).filter(([, v]) => v !== undefined)) as RetentionPolicy;
    let empty = false;
    try {
      checkPolicy(clean);
    } catch {
      empty = true;
    }
    fc.pre(!empty);
    const nowMs = start + nowOffsetMs;
    const got = applyRetention(backups, clean, nowMs);
    assert.equal(got.keep.length + got.remove.length, backups.length);
    assert.deepEqual(new Set(got.keep.map((k) => k.backup.id)), oracle(backups, clean, nowMs));
  }), { numRuns: 500 });
});
