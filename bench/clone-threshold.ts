/**
 * Where cloning an original (FICLONERANGE) starts to beat copying it: on a real XFS made in a
 * loop-mounted file, with the image and the session store on it, sequential first writes of
 * each request size go through a fresh session that copies every original (cloneMinBytes
 * Infinity) and one that clones every aligned run (cloneMinBytes 0), against the bare device
 * on the same filesystem. No NBD: the engine alone, 4 writes in flight, image clean in the page
 * cache before each pass. Used to pick DEFAULT_CLONE_MIN_BYTES (src/snapshot/cow-device.ts).
 *
 * Run (root): node dist/bench/clone-threshold.js [--size-mib N] [--sizes-kib 16,64,256,1024] [--repeat N]
 */

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { performance } from 'node:perf_hooks';
import { FileDevice } from '../src/device/file-device.js';
import { CowDevice } from '../src/snapshot/index.js';
import { CleanupStack, makeImage, missingNeeds, mountScratchFs, scratchFsNeeds } from './helpers.js';
import { settleFile } from './page-cache.js';
import { BENCH_CHUNK_BYTES, median, writeLoad } from './workloads.js';

const DEPTH = 4;

async function pass(image: string, sizeBytes: number, requestBytes: number, root: string | undefined, cloneMinBytes: number): Promise<{ mbps: number; closeMs: number; clonedBytes: number }> {
  settleFile(image);
  const dev = await FileDevice.open(image);
  try {
    const target = root === undefined ? dev : CowDevice.create(dev, { devicePath: image, snapshotRoot: root, chunkSize: BENCH_CHUNK_BYTES, cloneMinBytes });
    const { mbps } = await writeLoad(target, Math.floor(sizeBytes / requestBytes), requestBytes, DEPTH, (i) => i * requestBytes);
    if (!(target instanceof CowDevice)) return { mbps, closeMs: 0, clonedBytes: 0 };
    const closeStart = performance.now();
    await target.close();
    return { mbps, closeMs: performance.now() - closeStart, clonedBytes: target.stats().clonedBytes };
  } finally {
    await dev.close();
    if (root !== undefined) fs.rmSync(root, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { 'size-mib': { type: 'string', default: '256' }, 'sizes-kib': { type: 'string', default: '16,64,128,256,512,1024,2048' }, repeat: { type: 'string', default: '3' } } });
  const missing = missingNeeds(scratchFsNeeds('xfs'));
  if (missing.length > 0) {
    process.stdout.write(`clone-threshold: skipped: needs ${missing.join(', ')} to make an XFS in a loop-mounted file\n`);
    return;
  }
  const sizeBytes = Number(values['size-mib']) * 2 ** 20;
  const sizesKib = values['sizes-kib'].split(',').map(Number);
  const repeat = Math.max(1, Number(values.repeat));
  const cleanup = new CleanupStack();
  const top = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-clone-threshold-'));
  cleanup.after(() => fs.rmSync(top, { recursive: true, force: true }));
  try {
    const mnt = await mountScratchFs(cleanup, top, 'xfs', 4 * sizeBytes);
    const image = path.join(mnt, 'disk.img');
    makeImage(image, sizeBytes, 'random');
    cleanup.after(() => fs.rmSync(image, { force: true }));
    const root = path.join(mnt, 'snapshot');
    process.stdout.write(`XFS (reflink) in a loop-mounted file, image ${sizeBytes / 2 ** 20} MiB, ${BENCH_CHUNK_BYTES / 1024} KiB chunks, ${DEPTH} writes in flight, medians of ${repeat}; load average ${os.loadavg()[0]?.toFixed(2)}\n`);
    process.stdout.write('request   plain MB/s   copied (x plain)   cloned (x plain)   cloned/copied   close ms copied/cloned\n');
    for (const kib of sizesKib) {
      const r = { plain: [] as number[], copied: [] as number[], cloned: [] as number[], copyClose: [] as number[], cloneClose: [] as number[] };
      for (let round = 0; round < repeat; round++) {
        const plain = await pass(image, sizeBytes, kib * 1024, undefined, 0);
        const copied = await pass(image, sizeBytes, kib * 1024, root, Infinity);
        const cloned = await pass(image, sizeBytes, kib * 1024, root, 0);
        if (cloned.clonedBytes === 0) throw new Error('nothing was cloned: this XFS does not clone');
        r.plain.push(plain.mbps);
        r.copied.push(copied.mbps / plain.mbps);
        r.cloned.push(cloned.mbps / plain.mbps);
        r.copyClose.push(copied.closeMs);
        r.cloneClose.push(cloned.closeMs);
      }
      const ratio = median(r.cloned) / median(r.copied);
      process.stdout.write(`${`${kib} KiB`.padEnd(10)}${median(r.plain).toFixed(0).padStart(10)}   ${median(r.copied).toFixed(2).padStart(16)}   ${median(r.cloned).toFixed(2).padStart(16)}   ${ratio.toFixed(2).padStart(13)}   ${median(r.copyClose).toFixed(0)}/${median(r.cloneClose).toFixed(0)}\n`);
    }
  } finally {
    await cleanup.run();
  }
}

await main();
