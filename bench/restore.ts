/**
 * Restore throughput against a plain sequential write of the same bytes.
 *
 * Each round: a session is opened with `bdsnap serve --snapshot-root`, fio overwrites the
 * whole image once (so every chunk is preserved), the server stops, and `restore()` puts
 * the image back (checks of every record and end digest included, final fdatasync
 * included). The baseline is `dd` writing the same number of bytes sequentially into the
 * same image with a final fdatasync. Rounds alternate the two; the medians are compared.
 * Each round also times the check floor (restore-floor.ts) on the session's store and the
 * image, which gives the ceiling of restore / dd here.
 */

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { restore } from '../src/snapshot/index.js';
import { run, runFio, startServer } from './helpers.js';
import { BENCH_CHUNK_BYTES } from './workloads.js';
import { checkFloorSec } from './restore-floor.js';

export interface RestoreResult {
  bytes: number;
  rounds: number;
  restoreMBps: number;
  plainWriteMBps: number;
  ratio: number;
  /** dd / (check floor + dd): the most restore / dd can be here (see restore-floor.ts). */
  ceiling: number;
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)] ?? NaN;
}

async function preserveWholeImage(imagePath: string, root: string): Promise<string> {
  const server = await startServer(undefined, {
    kind: 'bdsnap',
    images: [imagePath],
    extraArgs: ['--snapshot-root', root, '--chunk-size', String(BENCH_CHUNK_BYTES)],
  });
  try {
    const size = fs.statSync(imagePath).size;
    await runFio({ uri: server.uri(server.exportNames[0]), rw: 'write', blockSizeBytes: 1 << 20, ioDepth: 4, sizeBytes: size, seed: Date.now() % 100000 });
  } finally {
    await server.stop();
  }
  const dirs = fs.readdirSync(root);
  if (dirs.length !== 1 || dirs[0] === undefined) throw new Error(`expected one session directory in ${root}, found ${dirs.length}`);
  return path.join(root, dirs[0]);
}

export async function measureRestore(imagePath: string, rounds: number): Promise<RestoreResult> {
  const bytes = fs.statSync(imagePath).size;
  const restoreSec: number[] = [];
  const writeSec: number[] = [];
  const floorSec: number[] = [];
  for (let i = 0; i < rounds; i++) {
    const root = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-bench-restore-'));
    try {
      const sessionDir = await preserveWholeImage(imagePath, root);
      // The session's writes are written back first, so that neither the floor nor the restore
      // competes with that write-back (dd starts after the restore's own fdatasync).
      await run('sync', []);
      floorSec.push(await checkFloorSec(path.join(sessionDir, 'data.bin'), imagePath));
      let started = process.hrtime.bigint();
      const summary = await restore(sessionDir);
      restoreSec.push(Number(process.hrtime.bigint() - started) / 1e9);
      if (summary.bytes !== bytes) throw new Error(`restore wrote ${summary.bytes} bytes, expected ${bytes}`);

      started = process.hrtime.bigint();
      await run('dd', ['if=/dev/zero', `of=${imagePath}`, 'bs=1M', `count=${bytes / 2 ** 20}`, 'conv=notrunc,fdatasync', 'status=none']);
      writeSec.push(Number(process.hrtime.bigint() - started) / 1e9);
    } finally {
      fs.rmSync(root, { recursive: true, force: true });
    }
  }
  const restoreMBps = bytes / 1e6 / median(restoreSec);
  const plainWriteMBps = bytes / 1e6 / median(writeSec);
  const ceiling = median(writeSec) / (median(floorSec) + median(writeSec));
  return { bytes, rounds, restoreMBps, plainWriteMBps, ratio: restoreMBps / plainWriteMBps, ceiling };
}
