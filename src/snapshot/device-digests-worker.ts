/**
 * Worker thread of digestDeviceChunks: reads its share of the device's chunks in large
 * sequential runs and sends back their digests, DIGEST_BYTES each, in the order given.
 */

import fs from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import { preadFullySync } from '../host/fd-io.js';
import { DIGEST_BYTES, chunkDigest, type DigestAlgorithm } from './chunk-digest.js';
import { chunkRuns } from './chunk-runs.js';

export interface DigestWorkerData {
  devicePath: string;
  /** Sorted, distinct. */
  chunks: Float64Array;
  chunkSize: number;
  sizeBytes: number;
  runBytes: number;
  algorithm: DigestAlgorithm;
}

function digestChunks({ devicePath, chunks, chunkSize, sizeBytes, runBytes, algorithm }: DigestWorkerData): Buffer {
  const fd = fs.openSync(devicePath, 'r');
  try {
    const out = Buffer.allocUnsafe(chunks.length * DIGEST_BYTES);
    const maxRun = Math.max(1, Math.floor(runBytes / chunkSize));
    const buf = Buffer.allocUnsafe(maxRun * chunkSize);
    for (const [i, j] of chunkRuns(chunks, maxRun)) {
      const start = chunks[i]! * chunkSize;
      const length = Math.min((chunks[i]! + j - i) * chunkSize, sizeBytes) - start;
      const done = preadFullySync(fd, buf, start, length);
      // The device shrank: what is missing reads as zeroes, and will not match.
      if (done < length) buf.fill(0, done, length);
      for (let k = 0; k < j - i; k++) {
        chunkDigest(buf.subarray(k * chunkSize, Math.min((k + 1) * chunkSize, length)), algorithm, out, (i + k) * DIGEST_BYTES);
      }
    }
    return out;
  } finally {
    fs.closeSync(fd);
  }
}

if (parentPort) parentPort.postMessage(digestChunks(workerData as DigestWorkerData));
