/** Byte ranges: sorting and merging, and which pieces a set of ranges touches or covers. */

import type { ByteRange } from '../bytes.js';

export type { ByteRange };

/** Sorted, merged, non-empty ranges, clipped to [0, sizeBytes). */
export function normalizeRanges(ranges: readonly ByteRange[], sizeBytes: number): ByteRange[] {
  const sorted = ranges
    .map((r) => ({ start: Math.max(0, r.offsetBytes), end: Math.min(sizeBytes, r.offsetBytes + r.lengthBytes) }))
    .filter((r) => r.end > r.start)
    .sort((a, b) => a.start - b.start);
  const out: ByteRange[] = [];
  let cur: { start: number; end: number } | undefined;
  for (const r of sorted) {
    if (cur && r.start <= cur.end) cur.end = Math.max(cur.end, r.end);
    else {
      if (cur) out.push({ offsetBytes: cur.start, lengthBytes: cur.end - cur.start });
      cur = { ...r };
    }
  }
  if (cur) out.push({ offsetBytes: cur.start, lengthBytes: cur.end - cur.start });
  return out;
}

/** Indexes of the pieces of `pieceBytes` that normalized `ranges` touch. */
export function touchedPieces(ranges: readonly ByteRange[], pieceBytes: number): Set<number> {
  const out = new Set<number>();
  for (const r of ranges) {
    const last = Math.floor((r.offsetBytes + r.lengthBytes - 1) / pieceBytes);
    for (let i = Math.floor(r.offsetBytes / pieceBytes); i <= last; i++) out.add(i);
  }
  return out;
}

/** Indexes of the pieces that normalized `ranges` cover completely (the last piece ends at sizeBytes). */
export function coveredPieces(ranges: readonly ByteRange[], pieceBytes: number, sizeBytes: number): Set<number> {
  const out = new Set<number>();
  for (const r of ranges) {
    const end = r.offsetBytes + r.lengthBytes;
    for (let i = Math.ceil(r.offsetBytes / pieceBytes); i * pieceBytes < end; i++) {
      if (Math.min((i + 1) * pieceBytes, sizeBytes) <= end) out.add(i);
    }
  }
  return out;
}
