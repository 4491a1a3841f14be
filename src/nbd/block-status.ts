/** BLOCK_STATUS replies: what a context's extents become on the wire. Pure. */

import { BdsnapError } from '../errors.js';

/** Most descriptors in one BLOCK_STATUS chunk (the spec's recommended ceiling). */
const MAX_EXTENTS_PER_REPLY = 1 << 20;

/**
 * The extents of one context cut to the request: contiguous from its offset, at most
 * `lengthBytes` in all, one with REQ_ONE, at most MAX_EXTENTS_PER_REPLY. A source that gives
 * none or a bad length is an I/O error, never a malformed reply.
 */
export function clipExtents(
  extents: ReadonlyArray<{ length: number; flags: number }>, lengthBytes: number, reqOne: boolean, context: string, mapFlags: (flags: number) => number,
): Array<{ length: number; flags: number }> {
  const out: Array<{ length: number; flags: number }> = [];
  let covered = 0;
  for (const e of extents) {
    if (!Number.isSafeInteger(e.length) || e.length <= 0) throw new BdsnapError('EIO', `${context}: bad extent length ${e.length}`);
    const length = Math.min(e.length, lengthBytes - covered);
    if (length <= 0) break;
    out.push({ length, flags: mapFlags(e.flags) });
    covered += length;
    if (reqOne || out.length === MAX_EXTENTS_PER_REPLY) break;
  }
  if (out.length === 0) throw new BdsnapError('EIO', `${context}: no extents`);
  return out;
}
