/**
 * The floor of the `mount-fsync` row on this machine's disk, without any server or route: what
 * fio's cycle (8 sequential 1 MiB writes, then fsync) makes a block device underneath do, done
 * by one program with plain file calls on an image file, two ways alternated in each round:
 * - plain: write the 8 MiB, fdatasync the image; then the journal's commit block (4 KiB) and
 *   fdatasync again. A loop device has no FUA, so ext4's commit reaches the device as a FLUSH,
 *   a write and another FLUSH: two flushes per fsync, as seen in an strace of the daemon;
 * - copy-before-write: first read each original MiB and write it into a store file, and on
 *   every flush fdatasync the store before the image (what an answered FLUSH must cover: the
 *   originals and the new data are both durable).
 * No protocol, no FUSE, no loop device, no filesystem: the ratio is an upper bound for a
 * session's fsync row against the same work without copies, and the plain figure an upper bound
 * for any route's.
 *
 * Run: node dist/bench/flush-floor.js [--seconds N] [--rounds N]
 */

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { makeImage } from './helpers.js';
import { fillPageCache, settleFile } from './page-cache.js';

const BLOCK = 1 << 20;
const WRITES_PER_FSYNC = 8;
/** fio's file in the mount rows: the cycles wrap around within it. */
const REGION_BYTES = 512 * BLOCK;
const IMAGE_BYTES = 2 * REGION_BYTES;
const COMMIT_BYTES = 4096;

/** Cycles for `seconds`; returns MB/s of new data. */
function cycles(image: string, store: string | undefined, seconds: number): number {
  const fd = fs.openSync(image, 'r+');
  const storeFd = store === undefined ? undefined : fs.openSync(store, 'w', 0o600);
  const data = Buffer.alloc(BLOCK, 0x5a);
  const original = Buffer.alloc(BLOCK);
  const commit = Buffer.alloc(COMMIT_BYTES, 0xc3);
  let written = 0;
  let storeEnd = 0;
  const startMs = performance.now();
  try {
    while (performance.now() - startMs < seconds * 1000) {
      for (let i = 0; i < WRITES_PER_FSYNC; i++) {
        const pos = written % REGION_BYTES;
        if (storeFd !== undefined) {
          fs.readSync(fd, original, 0, BLOCK, pos);
          fs.writeSync(storeFd, original, 0, BLOCK, storeEnd);
          storeEnd += BLOCK;
        }
        fs.writeSync(fd, data, 0, BLOCK, pos);
        written += BLOCK;
      }
      if (storeFd !== undefined) fs.fdatasyncSync(storeFd);
      fs.fdatasyncSync(fd);
      fs.writeSync(fd, commit, 0, COMMIT_BYTES, IMAGE_BYTES - COMMIT_BYTES);
      fs.fdatasyncSync(fd);
    }
    return written / 1e6 / ((performance.now() - startMs) / 1000);
  } finally {
    fs.closeSync(fd);
    if (storeFd !== undefined) fs.closeSync(storeFd);
  }
}

export interface FlushFloorRound {
  plain: number;
  copying: number;
  ratio: number;
}

/** One round: both ways, in the given order, each from the same cache state. */
export function flushFloorRound(dir: string, seconds: number, reverse: boolean): FlushFloorRound {
  const image = path.join(dir, 'flush-floor.img');
  if (!fs.existsSync(image)) makeImage(image, IMAGE_BYTES, 'blocks');
  const store = path.join(dir, 'flush-floor.store');
  const values: Record<string, number> = {};
  for (const way of reverse ? ['copying', 'plain'] : ['plain', 'copying']) {
    settleFile(image);
    fillPageCache(dir, REGION_BYTES * 2);
    values[way] = cycles(image, way === 'copying' ? store : undefined, seconds);
    fs.rmSync(store, { force: true });
  }
  const plain = values.plain ?? NaN;
  const copying = values.copying ?? NaN;
  return { plain, copying, ratio: copying / plain };
}

function main(): void {
  const { values } = parseArgs({ options: { seconds: { type: 'string', default: '5' }, rounds: { type: 'string', default: '3' } } });
  const seconds = Number(values.seconds);
  const rounds = Number(values.rounds);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-flush-floor-'));
  try {
    process.stdout.write(`load average ${os.loadavg()[0]?.toFixed(2)}\n`);
    for (let r = 0; r < rounds; r++) {
      const round = flushFloorRound(dir, seconds, r % 2 === 1);
      process.stdout.write(`round ${r + 1}: plain ${round.plain.toFixed(0)} MB/s, copy-before-write ${round.copying.toFixed(0)} MB/s, ratio ${round.ratio.toFixed(2)}\n`);
    }
    process.stdout.write(`load average ${os.loadavg()[0]?.toFixed(2)}\n`);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

if (process.argv[1] !== undefined && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) main();
