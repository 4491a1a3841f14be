/** The `--keep-*` options that `forget` (of sessions) and `backup forget` share, parsed once. */

import parseDuration from 'parse-duration';
import { BdsnapError } from '../errors.js';

/** A `--keep-NAME N` count: a whole number >= 0. */
export function parseKeepCount(flag: string, value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  const n = /^\d{1,9}$/.test(value) ? Number(value) : Number.NaN;
  if (!Number.isSafeInteger(n)) throw new BdsnapError('EINVAL', `${flag} takes a whole number, got "${value}"`);
  return n;
}

/** `--keep-within DURATION` (30d, 12h, 2w, 1y) in milliseconds. */
export function parseKeepWithin(value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  const ms = parseDuration(value);
  if (ms === null || !(ms > 0)) throw new BdsnapError('EINVAL', `--keep-within takes a duration such as 30d, 12h or 2w, got "${value}"`);
  return ms;
}
