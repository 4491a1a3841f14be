/**
 * The floor of a checked restore on this machine, without bdsnap: before a restore may write
 * a byte, it reads every original in the session store and checks its CRC-32, and reads every
 * touched chunk of the device and hashes it for the end digests. Here two worker threads do
 * only that (one per file: 8 MiB reads, a CRC-32 per 16 KiB), at once, on files in the page
 * cache. No record parsing, no plan, no second read of the store: a lower bound for the
 * checking part of any restore that verifies before it writes.
 *
 * With `dd` for the writing part, dd / (check + dd) is the ceiling of the restore row's
 * figure (restore / dd) on this machine.
 *
 * Run: node dist/bench/restore-floor.js FILE FILE
 */

import fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';

const READ_BYTES = 8 * 1024 * 1024;
const CRC_PART_BYTES = 16 * 1024;

/** Runs in a worker: read `file` whole and CRC every part; posts the number of bytes read. */
const WORKER_SOURCE = `
const fs = require('node:fs');
const { crc32 } = require('node:zlib');
const { workerData, parentPort } = require('node:worker_threads');
const fd = fs.openSync(workerData.file, 'r');
const buf = Buffer.allocUnsafe(${READ_BYTES});
let total = 0;
let crc = 0;
for (;;) {
  const n = fs.readSync(fd, buf, 0, buf.length, total);
  if (n === 0) break;
  for (let at = 0; at < n; at += ${CRC_PART_BYTES}) crc ^= crc32(buf.subarray(at, Math.min(at + ${CRC_PART_BYTES}, n)));
  total += n;
}
fs.closeSync(fd);
parentPort.postMessage({ total, crc });
`;

function checkOne(file: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const worker = new Worker(WORKER_SOURCE, { eval: true, workerData: { file } });
    worker.once('message', (m: { total: number }) => resolve(m.total));
    worker.once('error', reject);
  });
}

/** Seconds to read and CRC both files at once, one thread each. */
export async function checkFloorSec(storeFile: string, deviceFile: string): Promise<number> {
  const started = process.hrtime.bigint();
  const [a, b] = await Promise.all([checkOne(storeFile), checkOne(deviceFile)]);
  if (a === 0 || b === 0) throw new Error('the check floor read an empty file');
  return Number(process.hrtime.bigint() - started) / 1e9;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const [store, device] = process.argv.slice(2);
  if (store === undefined || device === undefined || !fs.existsSync(store) || !fs.existsSync(device)) {
    process.stderr.write('usage: node dist/bench/restore-floor.js STORE_FILE DEVICE_FILE\n');
    process.exit(2);
  }
  const sec = await checkFloorSec(store, device);
  process.stdout.write(`read and CRC of both files at once: ${(sec * 1000).toFixed(0)} ms\n`);
}
