/**
 * The floor of copy-before-write on this machine, without bdsnap: what sequential first
 * writes cost when a program does nothing but the copies. One pass of 1 MiB writes over an
 * image in the page cache, 4 in flight on the thread pool (as the NBD bench's "first write seq"
 * row), done two ways in the same round:
 * - plain: write the new data;
 * - copy-before-write: read the original, append it to a new store file, write the new data.
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
import { makeImage } from '../test/helpers/files.js';
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
  const storeFd = store === undefined ? undefined : fs.openSync(store, 'w', 0o600);
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
 * Before a timed round: write back every dirty page (`sync`), and make one untimed
 * copy-before-write pass into `store` (removed after), which warms the code and the image's
 * pages. The memory the timed copy pass fills is got back just before it (copyFloorRound).
 */
async function settle(image: string, store: string): Promise<void> {
  execFileSync('sync');
  fs.rmSync(store, { force: true });
  await pass(image, store);
  fs.rmSync(store, { force: true });
  execFileSync('sync');
}

/**
 * One round over `image` (in the page cache): a plain pass, then a copy-before-write pass
 * into a new `store` (removed afterwards); returns the copy-before-write / plain ratio.
 */
export async function copyFloorRatio(image: string, store: string): Promise<number> {
  return (await copyFloorRound(image, store)).ratio;
}

async function copyFloorRound(image: string, store: string): Promise<{ plain: number; cow: number; ratio: number }> {
  await settle(image, store);
  const plain = await pass(image, undefined);
  fs.rmSync(store, { force: true });
  // The copy pass fills a new store file: like a session's cell (bench/rows.ts), it starts
  // right after an image's worth of memory was got back from the host. This virtual machine
  // hands free memory back to its host; the untimed pass of settle() got it once, but it went
  // back during the sync and the plain pass, and in one round in three or more the timed pass
  // measured the host giving it back (0.05-0.2x, not 0.4x).
  fillPageCache(path.dirname(store), fs.statSync(image).size);
  settleFile(image);
  try {
    const cow = await pass(image, store);
    return { plain, cow, ratio: cow / plain };
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
      const { plain, cow, ratio } = await copyFloorRound(image, store);
      ratios.push(ratio);
      process.stdout.write(`round ${r}: plain ${plain.toFixed(0)} MB/s, copy-before-write ${cow.toFixed(0)} MB/s, ratio ${ratio.toFixed(2)}x\n`);
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
