/**
 * The fio workloads of `npm run bench`, each one row of the table. Sequential rows report
 * bandwidth, random rows IOPS. All use fio's nbd engine: one connection, `ioDepth`
 * requests in flight on it.
 */

import type { FioResult } from '../test/helpers/fio.js';
import { DEFAULT_CHUNK_SIZE } from '../src/snapshot/format.js';

export type Unit = 'MB/s' | 'IOPS';

export interface Workload {
  name: string;
  /** fio's rw; `write:N` skips N bytes after each write. */
  rw: string;
  blockSizeBytes: number;
  ioDepth: number;
  unit: Unit;
  /**
   * One pass over the image instead of a timed loop (capped by the runtime): with a session
   * open, every write of the pass lands in a chunk not yet preserved, so the row measures
   * first writes only.
   */
  onePass?: boolean;
  /** Only these targets run this row (default: all). */
  targets?: string[];
}

/** Chunk size of the session targets; first-write rows place one write per chunk. */
export const BENCH_CHUNK_BYTES = Number(process.env.BDSNAP_BENCH_CHUNK_BYTES ?? DEFAULT_CHUNK_SIZE);

const FIRST_WRITE_TARGETS = ['bdsnap', 'bdsnap+session'];

export const WORKLOADS: Workload[] = [
  { name: 'seq write 1 MiB, qd 4', rw: 'write', blockSizeBytes: 1 << 20, ioDepth: 4, unit: 'MB/s' },
  { name: 'seq read 1 MiB, qd 4', rw: 'read', blockSizeBytes: 1 << 20, ioDepth: 4, unit: 'MB/s' },
  { name: 'rand write 4 KiB, qd 1', rw: 'randwrite', blockSizeBytes: 4096, ioDepth: 1, unit: 'IOPS' },
  { name: 'rand write 4 KiB, qd 16', rw: 'randwrite', blockSizeBytes: 4096, ioDepth: 16, unit: 'IOPS' },
  { name: 'rand read 4 KiB, qd 1', rw: 'randread', blockSizeBytes: 4096, ioDepth: 1, unit: 'IOPS' },
  { name: 'rand read 4 KiB, qd 16', rw: 'randread', blockSizeBytes: 4096, ioDepth: 16, unit: 'IOPS' },
  { name: 'first write seq 1 MiB, qd 4', rw: 'write', blockSizeBytes: 1 << 20, ioDepth: 4, unit: 'MB/s', onePass: true, targets: FIRST_WRITE_TARGETS },
  // 4 KiB writes with a stride of one chunk: every write is the first one in its chunk.
  { name: 'first write 4 KiB/chunk, qd 1', rw: `write:${BENCH_CHUNK_BYTES - 4096}`, blockSizeBytes: 4096, ioDepth: 1, unit: 'IOPS', onePass: true, targets: FIRST_WRITE_TARGETS },
  { name: 'first write 4 KiB/chunk, qd 16', rw: `write:${BENCH_CHUNK_BYTES - 4096}`, blockSizeBytes: 4096, ioDepth: 16, unit: 'IOPS', onePass: true, targets: FIRST_WRITE_TARGETS },
];

/** The figure of merit of one fio run for this workload (MB = 10^6 bytes). */
export function score(workload: Workload, result: FioResult): number {
  const side = workload.rw.includes('write') ? result.write : result.read;
  return workload.unit === 'MB/s' ? side.bandwidthBytesPerSec / 1e6 : side.iops;
}
