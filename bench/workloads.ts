/** Settings shared by the benchmark's rows, targets and restore measurement. */

import { DEFAULT_CHUNK_SIZE } from '../src/snapshot/format.js';

/** Chunk size of the session targets; first-write rows place one write per chunk. */
export const BENCH_CHUNK_BYTES = Number(process.env.BDSNAP_BENCH_CHUNK_BYTES ?? DEFAULT_CHUNK_SIZE);
