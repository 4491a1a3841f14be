/**
 * sha256 of a list of device chunks, computed in a worker thread. Restore needs two hashing
 * passes before it may write a byte (the store's record checksums, the device's end digests);
 * running the device pass in a worker while the main thread scans the store puts both cores to
 * work. The worker opens the device read-only by path and reads it in large sequential runs.
 */

import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { BdsnapError } from '../errors.js';

// Plain CommonJS so that it can run with `eval: true`, without a separate file to ship.
const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const fs = require('node:fs');
const { createHash } = require('node:crypto');
const { devicePath, chunks, chunkSize, sizeBytes, runBytes } = workerData;
const fd = fs.openSync(devicePath, 'r');
const out = Buffer.allocUnsafe(chunks.length * 32);
const maxRun = Math.max(1, Math.floor(runBytes / chunkSize));
const buf = Buffer.allocUnsafe(maxRun * chunkSize);
let i = 0;
while (i < chunks.length) {
  let j = i + 1;
  while (j < chunks.length && chunks[j] === chunks[j - 1] + 1 && j - i < maxRun) j++;
  const start = chunks[i] * chunkSize;
  const length = Math.min((chunks[i] + j - i) * chunkSize, sizeBytes) - start;
  let done = 0;
  while (done < length) {
    const n = fs.readSync(fd, buf, done, length - done, start + done);
    if (n === 0) { buf.fill(0, done, length); break; }
    done += n;
  }
  for (let k = 0; k < j - i; k++) {
    createHash('sha256').update(buf.subarray(k * chunkSize, Math.min((k + 1) * chunkSize, length))).digest().copy(out, (i + k) * 32);
  }
  i = j;
}
fs.closeSync(fd);
parentPort.postMessage(out);
`;

/** Below this many bytes to hash, one worker: starting a second costs more than it saves. */
const SPLIT_ABOVE_BYTES = 32 * 1024 * 1024;

/**
 * Digest every chunk of `chunks` (sorted, distinct) of the device at `devicePath`, in one
 * worker or, for a large set, two (each reading its own half of the device), so that the
 * hashing uses both cores while the caller's thread checks the store. Errors: EIO.
 */
export async function digestDeviceChunks(devicePath: string, chunks: number[], chunkSize: number, sizeBytes: number): Promise<Map<number, Buffer>> {
  if (chunks.length === 0) return new Map();
  const parts = chunks.length * chunkSize > SPLIT_ABOVE_BYTES && availableParallelism() > 1 ? 2 : 1;
  const per = Math.ceil(chunks.length / parts);
  const slices = Array.from({ length: parts }, (_, i) => chunks.slice(i * per, (i + 1) * per));
  const outs = await Promise.all(slices.map((slice) => runWorker(devicePath, slice, chunkSize, sizeBytes)));
  const map = new Map<number, Buffer>();
  slices.forEach((slice, k) => {
    const out = outs[k]!;
    slice.forEach((c, i) => map.set(c, out.subarray(i * 32, (i + 1) * 32)));
  });
  return map;
}

function runWorker(devicePath: string, chunks: number[], chunkSize: number, sizeBytes: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const worker = new Worker(WORKER_SOURCE, { eval: true, workerData: { devicePath, chunks, chunkSize, sizeBytes, runBytes: 8 * 1024 * 1024 } });
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
