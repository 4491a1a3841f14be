/**
 * The fio workloads of `npm run bench`, each one row of the table. Sequential rows report
 * bandwidth, random rows IOPS. All use fio's nbd engine: one connection, `ioDepth`
 * requests in flight on it.
 */

import type { FioResult } from '../test/helpers/fio.js';

export type Unit = 'MB/s' | 'IOPS';

export interface Workload {
  name: string;
  rw: 'write' | 'read' | 'randwrite' | 'randread';
  blockSizeBytes: number;
  ioDepth: number;
  unit: Unit;
}

export const WORKLOADS: Workload[] = [
  { name: 'seq write 1 MiB, qd 4', rw: 'write', blockSizeBytes: 1 << 20, ioDepth: 4, unit: 'MB/s' },
  { name: 'seq read 1 MiB, qd 4', rw: 'read', blockSizeBytes: 1 << 20, ioDepth: 4, unit: 'MB/s' },
  { name: 'rand write 4 KiB, qd 1', rw: 'randwrite', blockSizeBytes: 4096, ioDepth: 1, unit: 'IOPS' },
  { name: 'rand write 4 KiB, qd 16', rw: 'randwrite', blockSizeBytes: 4096, ioDepth: 16, unit: 'IOPS' },
  { name: 'rand read 4 KiB, qd 1', rw: 'randread', blockSizeBytes: 4096, ioDepth: 1, unit: 'IOPS' },
  { name: 'rand read 4 KiB, qd 16', rw: 'randread', blockSizeBytes: 4096, ioDepth: 16, unit: 'IOPS' },
];

/** The figure of merit of one fio run for this workload (MB = 10^6 bytes). */
export function score(workload: Workload, result: FioResult): number {
  const side = workload.rw.endsWith('write') ? result.write : result.read;
  return workload.unit === 'MB/s' ? side.bandwidthBytesPerSec / 1e6 : side.iops;
}
