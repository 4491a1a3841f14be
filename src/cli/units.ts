/** Parsing of sizes given on the command line ("64K", "1M", "2G", or plain bytes). */

import { BdsnapError } from '../errors.js';

const SUFFIX: Record<string, number> = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 };

/** Bytes from "4096", "64K", "64KiB", "1M", "2G"; throws EINVAL naming the option. */
export function parseBytes(text: string, what: string): number {
  const m = /^(\d+)\s*([KMGT]?)(?:i?B)?$/i.exec(text.trim());
  const value = m ? Number(m[1]) * (SUFFIX[(m[2] ?? '').toUpperCase()] ?? NaN) : NaN;
  if (!Number.isSafeInteger(value) || value <= 0) {
    throw new BdsnapError('EINVAL', `bad ${what} "${text}": expected a positive size such as 65536, 64K, 1M or 2G`);
  }
  return value;
}
