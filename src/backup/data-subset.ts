/**
 * `verify --read-data-subset N/T`: slice N of T of the stored pieces, chosen by the piece's name
 * alone (its first 32 bits, modulo T), so a slice is the same on every run and on every host,
 * and the T slices together hold every piece exactly once. Piece names are hashes (keyed or
 * not), so the slices come out about even. restic's `check --read-data-subset n/t` does the
 * same with a pack id's first byte.
 */

import { BdsnapError } from '../errors.js';

export interface DataSubset {
  /** 1..total */
  n: number;
  total: number;
}

/** The most slices: more would leave most of them empty in any real repository. */
export const MAX_SUBSETS = 65_536;

/** Parse "N/T". EINVAL unless 1 <= N <= T <= MAX_SUBSETS. */
export function parseDataSubset(text: string): DataSubset {
  const m = /^(\d{1,6})\/(\d{1,6})$/.exec(text);
  const n = m ? Number(m[1]) : Number.NaN;
  const total = m ? Number(m[2]) : Number.NaN;
  if (!(n >= 1 && n <= total && total <= MAX_SUBSETS)) {
    throw new BdsnapError('EINVAL', `--read-data-subset takes N/T with 1 <= N <= T <= ${MAX_SUBSETS} (e.g. 1/7: run 1/7 to 7/7 to read everything once), got "${text}"`);
  }
  return { n, total };
}

/** Whether the piece named by the hex `hash` is in `subset`. */
export function inDataSubset(hash: string, subset: DataSubset): boolean {
  const lead = Number.parseInt(hash.slice(0, 8), 16);
  if (!Number.isSafeInteger(lead) || hash.length < 8) throw new BdsnapError('EINVAL', `"${hash}" is not a piece name`);
  return lead % subset.total === subset.n - 1;
}

export function formatDataSubset(subset: DataSubset): string {
  return `${subset.n}/${subset.total}`;
}
