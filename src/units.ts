/**
 * Sizes as people write and read them: parsing "64K", "1M", "2G" (or plain bytes) from the
 * command line, and printing bytes in binary units. Beside errors.ts so that every layer's
 * messages use the same spelling.
 */

import { BdsnapError } from './errors.js';

const SUFFIX: Record<string, number> = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 };

/** Bytes from "4096", "64K", "64KiB", "1M", "2G", "0"; NaN when `text` is not a size. */
export function sizeValue(text: string): number {
  const m = /^(\d+)\s*([KMGT]?)(?:i?B)?$/i.exec(text.trim());
  const value = m ? Number(m[1]) * (SUFFIX[(m[2] ?? '').toUpperCase()] ?? NaN) : NaN;
  return Number.isSafeInteger(value) ? value : NaN;
}

/** Bytes from "4096", "64K", "64KiB", "1M", "2G"; throws EINVAL naming the option. */
export function parseBytes(text: string, what: string): number {
  const value = sizeValue(text);
  if (!(value > 0)) {
    throw new BdsnapError('EINVAL', `bad ${what} "${text}": expected a positive size such as 65536, 64K, 1M or 2G`);
  }
  return value;
}

/** `one` for a count of 1, else `many`: "1 pack", "2 packs". */
export function plural(n: number, one: string, many = `${one}s`): string {
  return n === 1 ? one : many;
}

/** A count and its noun: "1 pack", "3 packs", "0 pieces". */
export function countOf(n: number, one: string, many = `${one}s`): string {
  return `${n} ${plural(n, one, many)}`;
}

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];

/** "64 KiB", "1.5 GiB", "0 B": binary units, at most one decimal. */
export function formatBytes(bytes: number): string {
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit++;
  }
  const text = Number.isInteger(value) || value >= 100 ? Math.round(value).toString() : value.toFixed(1).replace(/\.0$/, '');
  return `${text} ${UNITS[unit]}`;
}

/** A duration for people: `45s`, `12m`, `3h`. */
export function formatDuration(ms: number): string {
  if (ms < 120_000) return `${Math.round(ms / 1000)}s`;
  if (ms < 7_200_000) return `${Math.round(ms / 60_000)}m`;
  return `${Math.round(ms / 3_600_000)}h`;
}
