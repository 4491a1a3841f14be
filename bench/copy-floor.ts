/**
 * The floor of copy-before-write on this machine, without bdsnap: what sequential first
 * writes cost when a program does nothing but the copies. One pass of 1 MiB writes over an
 * image in the page cache, 4 in flight on the thread pool (as the NBD bench's "first write seq"
 * row), done two ways in the same round:
 * - plain: write the new data;
 * - copy-before-write: read the original, write it at the end of what the pass stored so far
 *   in a store file, write the new data.
 * Each pass is timed a few times in a round and the fastest kept. The store file is the same
 * for every copy pass of a round and already fills an image's worth of page cache (see
 * copyFloorRound), so a pass measures the copies and not the host handing memory back.
 * No checksums, no protocol, no event-loop work: the ratio is an upper bound for any
 * copy-before-write server in user space that keeps the originals in a file, before the NBD
 * transfer (which both sides of the real bench pay) is added to both sides.
 *
 * Run: node dist/bench/copy-floor.js [--size-mib N] [--rounds N]
 */

import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { performance } from 'node:perf_hooks';
import { preadOnce, pwriteOnce } from '../src/host/fd-io.js';
import { fileURLToPath } from 'node:url';
import { makeImage } from './helpers.js';
import { fillPageCache, settleFile } from './page-cache.js';

const BLOCK = 1 << 20;
const IN_FLIGHT = 4;

function pread(fd: number, buf: Buffer, pos: number): Promise<number> {
  return preadOnce(fd, buf, 0, buf.length, pos);
}

function pwrite(fd: number, buf: Buffer, pos: number): Promise<number> {
  return pwriteOnce(fd, buf, 0, buf.length, pos);
}

/** One pass over the image; returns MB/s. */
async function pass(image: string, store: string | undefined): Promise<number> {
  const fd = fs.openSync(image, 'r+');
  // After the first pass, over the previous pass's pages (copyFloorRound).
  const storeFd = store === undefined ? undefined : fs.openSync(store, fs.existsSync(store) ? 'r+' : 'w', 0o600);
  const size = fs.fstatSync(fd).size;
  const data = Buffer.alloc(BLOCK, 0x5a);
  let next = 0;
  let storeEnd = 0;
  const worker = async (): Promise<void> => {
    const original = Buffer.alloc(BLOCK);
    while (next < size) {
      const pos = next;
      next += BLOCK;
      if (storeFd !== undefined) {
        await pread(fd, original, pos);
        const at = storeEnd;
        storeEnd += BLOCK;
        await pwrite(storeFd, original, at);
      }
      await pwrite(fd, data, pos);
    }
  };
  const started = performance.now();
  try {
    await Promise.all(Array.from({ length: IN_FLIGHT }, worker));
  } finally {
    fs.closeSync(fd);
    if (storeFd !== undefined) fs.closeSync(storeFd);
  }
  return size / 1e6 / ((performance.now() - started) / 1000);
}

/**
 * How many times a round times each pass, keeping the fastest: the floor is what the machine
 * can do.
 */
const PASSES_PER_ROUND = 3;

/** MB/s of the fastest of PASSES_PER_ROUND passes, each over the image written back and read in. */
async function bestPass(image: string, store: string | undefined): Promise<number> {
  let best = 0;
  for (let i = 0; i < PASSES_PER_ROUND; i++) {
    settleFile(image);
    best = Math.max(best, await pass(image, store));
  }
  return best;
}

/** What one round measured: MB/s of the best passes, and their ratio (the floor). */
export interface CopyFloorRound {
  plain: number;
  cow: number;
  ratio: number;
  /**
   * MB/s of one more copy pass, into a new store file right after an image's worth of memory
   * was got back from the host (as a session's cell starts): what copying costs with the new
   * memory a store takes, which this machine hands out at a rate of its own (no part of the
   * ratio).
   */
  newStore: number;
}

/**
 * One round over `image` (in the page cache): the best of a few plain passes, then the best of
 * a few copy-before-write passes into `store`, then one pass into a new store (removed
 * afterwards).
 */
export async function copyFloorRound(image: string, store: string): Promise<CopyFloorRound> {
  // An untimed copy pass warms the code and makes the store file, which every timed copy pass
  // writes over. This virtual machine hands free memory back to its host within seconds, and a
  // pass that filled a new file paid to get it back at 1-1.6 GB/s in most rounds (a ratio of
  // 0.11-0.18, against 0.42-0.56 over a store already in the page cache). A session pays that
  // too, for its new store: the timed passes do not, so their ratio is the stricter floor. The
  // last pass, into a new store, pays it as a session does.
  fs.rmSync(store, { force: true });
  try {
    execFileSync('sync');
    await pass(image, store);
    const plain = await bestPass(image, undefined);
    const cow = await bestPass(image, store);
    fs.rmSync(store, { force: true });
    settleFile(image);
    fillPageCache(path.dirname(store), fs.statSync(image).size);
    const newStore = await pass(image, store);
    return { plain, cow, ratio: cow / plain, newStore };
  } finally {
    fs.rmSync(store, { force: true });
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { 'size-mib': { type: 'string', default: '1024' }, rounds: { type: 'string', default: '3' } } });
  const sizeBytes = Number(values['size-mib']) * 2 ** 20;
  const rounds = Number(values.rounds);
  if (!(sizeBytes > 0 && sizeBytes % BLOCK === 0) || !(rounds > 0)) throw new Error('--size-mib and --rounds must be positive integers');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-copy-floor-'));
  try {
    const image = path.join(dir, 'image.img');
    makeImage(image, sizeBytes);
    const store = path.join(dir, 'store.bin');
    await pass(image, undefined); // warm the page cache
    const ratios: number[] = [];
    for (let r = 1; r <= rounds; r++) {
      const { plain, cow, ratio, newStore } = await copyFloorRound(image, store);
      ratios.push(ratio);
      process.stdout.write(`round ${r}: plain ${plain.toFixed(0)} MB/s, copy-before-write ${cow.toFixed(0)} MB/s, ratio ${ratio.toFixed(2)}x; into a new store ${newStore.toFixed(0)} MB/s\n`);
    }
    ratios.sort((a, b) => a - b);
    process.stdout.write(`median ratio ${ratios[Math.floor(ratios.length / 2)]!.toFixed(2)}x\n`);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

if (process.argv[1] !== undefined && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().catch((err: unknown) => {
    process.stderr.write(`copy-floor: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exitCode = 1;
  });
}
