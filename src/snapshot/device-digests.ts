/**
 * End digests of a list of device chunks, computed in worker threads. Restore needs two
 * checking passes before it may write a byte (the store's record checksums, the device's end
 * digests); running the device pass in workers while the main thread scans the store puts both
 * cores to work. Each worker opens the device read-only by path and reads it in large
 * sequential runs.
 */

import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { BdsnapError } from '../errors.js';
import type { DigestAlgorithm } from './chunk-digest.js';
import { DigestTable } from './digest-table.js';
import type { DigestWorkerData } from './device-digests-worker.js';

const WORKER_URL = new URL('./device-digests-worker.js', import.meta.url);

/** Below this many bytes to hash, one worker: starting a second costs more than it saves. */
const SPLIT_ABOVE_BYTES = 32 * 1024 * 1024;
/**
 * A second worker only where each thread gets a core of its own: the caller's thread scans the
 * store meanwhile. On two cores, three busy threads took 1.4-1.5 s to check a 1 GiB restore and
 * two took 1.1 s (the second worker's start-up and the switching cost more than it hashed).
 */
const SPLIT_MIN_CORES = 3;

/**
 * Digest every chunk of `chunks` (sorted, distinct) of the device at `devicePath`, in one
 * worker or, for a large set on three cores or more, two (each reading its own half of the
 * device), so that the hashing runs beside the caller's thread checking the store. `parts`
 * overrides that choice. Errors: EIO.
 */
export async function digestDeviceChunks(
  devicePath: string, chunks: Float64Array, chunkSize: number, sizeBytes: number, algorithm: DigestAlgorithm,
  parts = chunks.length * chunkSize > SPLIT_ABOVE_BYTES && availableParallelism() >= SPLIT_MIN_CORES ? 2 : 1,
): Promise<DigestTable> {
  if (chunks.length === 0) return new DigestTable(chunks, Buffer.alloc(0));
  const per = Math.ceil(chunks.length / parts);
  const slices = Array.from({ length: parts }, (_, i) => chunks.slice(i * per, (i + 1) * per));
  const outs = await Promise.all(slices.map((slice) => runWorker({ devicePath, chunks: slice, chunkSize, sizeBytes, runBytes: 8 * 1024 * 1024, algorithm })));
  return new DigestTable(chunks, outs.length === 1 ? outs[0]! : Buffer.concat(outs));
}

function runWorker(data: DigestWorkerData): Promise<Buffer> {
  const { devicePath } = data;
  return new Promise((resolve, reject) => {
    const worker = new Worker(WORKER_URL, { workerData: data });
    let settled = false;
    worker.once('message', (raw: Uint8Array) => {
      settled = true;
      void worker.terminate();
      resolve(Buffer.from(raw.buffer, raw.byteOffset, raw.byteLength));
    });
    worker.once('error', (err) => {
      settled = true;
      reject(new BdsnapError('EIO', `cannot read ${devicePath} to check digests: ${err.message}`, { cause: err }));
    });
    worker.once('exit', (code) => {
      if (!settled) reject(new BdsnapError('EIO', `the digest worker for ${devicePath} exited with code ${code}`));
    });
  });
}
