/** Settings shared by the benchmark's rows, targets and restore measurement. */

import { randomBytes } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import type { BlockDevice } from '../src/device/block-device.js';
import { DEFAULT_CHUNK_SIZE } from '../src/snapshot/format.js';

/** Chunk size of the session targets; first-write rows place one write per chunk. */
export const BENCH_CHUNK_BYTES = Number(process.env.BDSNAP_BENCH_CHUNK_BYTES ?? DEFAULT_CHUNK_SIZE);

/** Run `count` writes of `lengthBytes` at offsets from `offsetOf`, `depth` in flight; MB/s and IOPS. */
export async function writeLoad(dev: BlockDevice, count: number, lengthBytes: number, depth: number, offsetOf: (i: number) => number): Promise<{ mbps: number; iops: number }> {
  const data = randomBytes(lengthBytes);
  let next = 0;
  const start = performance.now();
  await Promise.all(Array.from({ length: depth }, async () => {
    while (next < count) {
      const i = next++;
      await dev.write(data, offsetOf(i));
    }
  }));
  const seconds = (performance.now() - start) / 1000;
  // Flushed outside the timing: what is measured is the request path, as the page cache sees it.
  await dev.flush();
  return { mbps: (count * lengthBytes) / seconds / 1e6, iops: count / seconds };
}

export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

