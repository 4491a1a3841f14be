/**
 * Worker thread of a device digest pass (device-digests.ts): takes runs of chunks until none
 * is left, reads each from the device and writes its digests into the pass's shared buffer.
 */

import fs from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import { preadFullySync } from '../host/fd-io.js';
import { RunTaker, type DigestPassData } from './device-digest-runs.js';

function digestRuns(data: DigestPassData): void {
  const taker = new RunTaker(data);
  let run = taker.take();
  if (run === undefined) return;
  const fd = fs.openSync(data.devicePath, 'r');
  try {
    const buf = Buffer.allocUnsafe(taker.bufferBytes);
    for (; run !== undefined; run = taker.take()) taker.digest(run, buf, preadFullySync(fd, buf, run.start, run.length));
  } finally {
    fs.closeSync(fd);
  }
}

if (parentPort) {
  digestRuns(workerData as DigestPassData);
  parentPort.postMessage('done');
}
