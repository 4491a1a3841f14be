/**
 * End digests of lists of device chunks, computed in worker threads that the caller's thread
 * may join. Restore needs two checking passes before it may write a byte (the store's record
 * checksums, the device's end digests); running the device pass in workers while the main
 * thread scans the store puts both cores to work, and the main thread, once its scan is done,
 * takes its share of what is left of the device pass instead of waiting for it
 * (device-digest-runs.ts). Each thread opens the device read-only by path and reads it in large
 * sequential runs.
 */

import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { BdsnapError } from '../errors.js';
import { closeFd, openFd, preadFully } from '../host/fd-io.js';
import { DIGEST_BYTES, type DigestAlgorithm } from './chunk-digest.js';
import { DigestTable } from './digest-table.js';
import { RunTaker, type DigestPassData, type TakenRun } from './device-digest-runs.js';

const WORKER_URL = new URL('./device-digests-worker.js', import.meta.url);

/** Bytes of the device read at once. */
const RUN_BYTES = 8 * 1024 * 1024;
/** Below this many bytes to hash, one worker: starting a second costs more than it saves. */
const SPLIT_ABOVE_BYTES = 32 * 1024 * 1024;
/**
 * A second worker only where each thread gets a core of its own: the caller's thread scans the
 * store meanwhile. On two cores, three busy threads took 1.4-1.5 s to check a 1 GiB restore and
 * two took 1.1 s (the second worker's start-up and the switching cost more than it hashed).
 */
const SPLIT_MIN_CORES = 3;

/** What to digest: sorted, distinct chunks, with one algorithm. */
export interface DigestList {
  algorithm: DigestAlgorithm;
  chunks: Float64Array;
}

/**
 * A pass over the device digesting `lists`, started in worker threads: one or, for a large set
 * on three cores or more, two (`workers` overrides that choice). `finish()` digests what is left
 * to take on the caller's thread, then gives one table per list once the workers are done too.
 * Errors: EIO.
 */
export class DeviceDigestPass {
  readonly #data: DigestPassData;
  readonly #workers: Promise<void[]>;

  constructor(devicePath: string, lists: DigestList[], chunkSize: number, sizeBytes: number, workers?: number) {
    const jobs = lists.map(({ algorithm, chunks }) => ({
      chunks, algorithm, next: new SharedArrayBuffer(4), out: new SharedArrayBuffer(chunks.length * DIGEST_BYTES),
    }));
    this.#data = { devicePath, chunkSize, sizeBytes, runBytes: RUN_BYTES, jobs };
    const total = lists.reduce((sum, l) => sum + l.chunks.length, 0);
    const count = total === 0 ? 0 : workers ?? (total * chunkSize > SPLIT_ABOVE_BYTES && availableParallelism() >= SPLIT_MIN_CORES ? 2 : 1);
    this.#workers = Promise.all(Array.from({ length: count }, () => runWorker(this.#data)));
    // Reported by finish(); a pass nobody finishes (its result not needed after all) fails quietly.
    this.#workers.catch(() => undefined);
  }

  /**
   * Take and digest runs on this thread until none is left, then wait for the workers. The
   * reads stay off this thread (it may be serving), the next run read while this one is hashed.
   */
  async finish(): Promise<DigestTable[]> {
    const taker = new RunTaker(this.#data);
    const first = taker.take();
    if (first !== undefined) {
      const { devicePath } = this.#data;
      let reading: Promise<unknown> | undefined;
      try {
        const fd = await openFd(devicePath, 'r');
        try {
          let [buf, spare] = [Buffer.allocUnsafe(taker.bufferBytes), Buffer.allocUnsafe(taker.bufferBytes)];
          const read = (run: TakenRun, into: Buffer): Promise<number> => {
            const done = preadFully(fd, into.subarray(0, run.length), run.start);
            // Awaited in turn, or by the finally below; a failure meanwhile is no unhandled rejection.
            done.catch(() => undefined);
            reading = done;
            return done;
          };
          let run = first;
          let done = read(run, buf);
          for (;;) {
            const next = taker.take();
            const nextDone = next === undefined ? undefined : read(next, spare);
            taker.digest(run, buf, await done);
            if (next === undefined || nextDone === undefined) break;
            [buf, spare] = [spare, buf];
            run = next;
            done = nextDone;
          }
        } finally {
          // No read may land in a buffer, or on a closed descriptor, after this.
          await reading?.catch(() => undefined);
          await closeFd(fd);
        }
      } catch (err) {
        throw new BdsnapError('EIO', `cannot read ${devicePath} to check digests: ${(err as Error).message}`, { cause: err });
      }
    }
    await this.#workers;
    return this.#data.jobs.map((j) => new DigestTable(j.chunks, Buffer.from(j.out)));
  }
}

/**
 * Digest every chunk of `chunks` (sorted, distinct) of the device at `devicePath` in worker
 * threads and this one (see DeviceDigestPass). Errors: EIO.
 */
export async function digestDeviceChunks(
  devicePath: string, chunks: Float64Array, chunkSize: number, sizeBytes: number, algorithm: DigestAlgorithm, workers?: number,
): Promise<DigestTable> {
  const [table] = await new DeviceDigestPass(devicePath, [{ algorithm, chunks }], chunkSize, sizeBytes, workers).finish();
  return table!;
}

function runWorker(data: DigestPassData): Promise<void> {
  const { devicePath } = data;
  return new Promise((resolve, reject) => {
    const worker = new Worker(WORKER_URL, { workerData: data });
    let settled = false;
    worker.once('message', () => {
      settled = true;
      void worker.terminate();
      resolve();
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
