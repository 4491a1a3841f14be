/**
 * The work of a device digest pass, shared by its worker threads and the thread that started
 * it: runs of adjacent chunks, each taken by whoever is free from one shared counter, each
 * chunk's digest written at its place in a shared buffer. Whichever thread is slowed or started
 * late, the pass ends with its last run. Imports nothing heavy: the workers load it.
 */

import { DIGEST_BYTES, chunkDigest, type DigestAlgorithm } from './chunk-digest.js';
import { chunkRuns } from './chunk-runs.js';

/** The chunks to digest with one algorithm. */
export interface DigestJob {
  /** Sorted, distinct. */
  chunks: Float64Array;
  algorithm: DigestAlgorithm;
  /** Int32 [0]: the next run of this job nobody has taken. */
  next: SharedArrayBuffer;
  /** DIGEST_BYTES per chunk, in the order of `chunks`. */
  out: SharedArrayBuffer;
}

export interface DigestPassData {
  devicePath: string;
  chunkSize: number;
  sizeBytes: number;
  runBytes: number;
  jobs: DigestJob[];
}

/** A taken run: chunks [from, to) of `job`, the device's bytes [start, start + length). */
export interface TakenRun {
  job: number;
  from: number;
  to: number;
  start: number;
  length: number;
}

/** One thread's view of a pass: takes runs from the shared counters and digests them. */
export class RunTaker {
  readonly #data: DigestPassData;
  /** Per job: the [from, to) of every run, the same list in every thread. */
  readonly #runs: Array<Array<[number, number]>>;
  readonly #next: Int32Array[];
  readonly #out: Buffer[];
  #job = 0;
  /** Bytes of the largest run: the size of a read buffer. */
  readonly bufferBytes: number;

  constructor(data: DigestPassData) {
    this.#data = data;
    const maxRun = Math.max(1, Math.floor(data.runBytes / data.chunkSize));
    this.#runs = data.jobs.map((j) => [...chunkRuns(j.chunks, maxRun)]);
    this.#next = data.jobs.map((j) => new Int32Array(j.next));
    this.#out = data.jobs.map((j) => Buffer.from(j.out));
    const most = Math.max(0, ...data.jobs.map((j) => j.chunks.length));
    this.bufferBytes = Math.min(maxRun, most) * data.chunkSize;
  }

  /** The next run nobody has taken (jobs in order), or undefined when every run is taken. */
  take(): TakenRun | undefined {
    const { chunkSize, sizeBytes } = this.#data;
    for (; this.#job < this.#runs.length; this.#job++) {
      const runs = this.#runs[this.#job]!;
      const k = Atomics.add(this.#next[this.#job]!, 0, 1);
      if (k >= runs.length) continue;
      const [from, to] = runs[k]!;
      const chunks = this.#data.jobs[this.#job]!.chunks;
      const start = chunks[from]! * chunkSize;
      return { job: this.#job, from, to, start, length: Math.min((chunks[from]! + to - from) * chunkSize, sizeBytes) - start };
    }
    return undefined;
  }

  /** Digest a run from `buf`, which holds `done` of its bytes read from the device. */
  digest(run: TakenRun, buf: Buffer, done: number): void {
    // The device shrank: what is missing reads as zeroes, and will not match.
    if (done < run.length) buf.fill(0, done, run.length);
    const { chunkSize } = this.#data;
    const { algorithm } = this.#data.jobs[run.job]!;
    const out = this.#out[run.job]!;
    for (let k = 0; k < run.to - run.from; k++) {
      chunkDigest(buf.subarray(k * chunkSize, Math.min((k + 1) * chunkSize, run.length)), algorithm, out, (run.from + k) * DIGEST_BYTES);
    }
  }
}
