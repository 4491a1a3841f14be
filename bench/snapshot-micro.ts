/**
 * Microbenchmark of the copy-before-write engine, without NBD: used to pick the default chunk
 * size. For each chunk size it measures, on a fresh session over an image in the page cache:
 * - first writes: 4 KiB random writes (every one lands on a chunk not yet preserved) and 1 MiB
 *   sequential writes, 16 requests in flight, against the same writes on the bare FileDevice;
 * - rewrites of chunks already preserved (should cost nothing over the bare device);
 * - restore throughput against a plain sequential write of the same bytes;
 * - sha256 cost of one chunk (how long a record checksum holds the event loop).
 *
 * Run: node dist/bench/snapshot-micro.js [--size-mib N] [--chunks 4,16,64,256] [--durability process|strict]
 */

import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { FileDevice } from '../src/device/file-device.js';
import type { BlockDevice } from '../src/device/block-device.js';
import { CowDevice, restore } from '../src/snapshot/index.js';

interface Args {
  sizeMib: number;
  chunksKib: number[];
  durability: 'process' | 'strict';
}

function parseArgs(argv: string[]): Args {
  const args: Args = { sizeMib: 256, chunksKib: [4, 16, 64, 256], durability: 'process' };
  for (let i = 0; i < argv.length; i++) {
    const v = argv[i + 1];
    if (argv[i] === '--size-mib' && v) args.sizeMib = Number(v);
    else if (argv[i] === '--chunks' && v) args.chunksKib = v.split(',').map(Number);
    else if (argv[i] === '--durability' && (v === 'process' || v === 'strict')) args.durability = v;
    else continue;
    i++;
  }
  return args;
}

/** Run `count` writes of `lengthBytes` at offsets from `offsetOf`, `depth` in flight; MB/s and IOPS. */
async function writeLoad(dev: BlockDevice, count: number, lengthBytes: number, depth: number, offsetOf: (i: number) => number): Promise<{ mbps: number; iops: number }> {
  const data = randomBytes(lengthBytes);
  let next = 0;
  const start = performance.now();
  await Promise.all(Array.from({ length: depth }, async () => {
    while (next < count) {
      const i = next++;
      await dev.write(data, offsetOf(i));
    }
  }));
  const seconds = (performance.now() - start) / 1000;
  // Flushed outside the timing: what is measured is the request path, as the page cache sees it.
  await dev.flush();
  return { mbps: (count * lengthBytes) / seconds / 1e6, iops: count / seconds };
}

function shuffledOffsets(count: number, sizeBytes: number, lengthBytes: number): number[] {
  // One write per distinct 256 KiB region, in random order: every write is a first write for
  // any chunk size up to 256 KiB.
  const stride = 256 * 1024;
  const slots = Math.floor(sizeBytes / stride);
  const order = Array.from({ length: slots }, (_, i) => i);
  for (let i = order.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [order[i], order[j]] = [order[j]!, order[i]!];
  }
  return order.slice(0, count).map((s) => s * stride + ((s * 4096) % (stride - lengthBytes)));
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  const top = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-bench-'));
  const sizeBytes = args.sizeMib << 20;
  const image = path.join(top, 'disk.img');
  fs.writeFileSync(image, '');
  const fd = fs.openSync(image, 'r+');
  const block = randomBytes(8 << 20);
  for (let pos = 0; pos < sizeBytes; pos += block.length) fs.writeSync(fd, block, 0, Math.min(block.length, sizeBytes - pos), pos);
  fs.closeSync(fd);
  const rows: string[] = [];
  const depth = 16;
  try {
    const randomCount = Math.floor(sizeBytes / (256 * 1024));
    const offsets = shuffledOffsets(randomCount, sizeBytes, 4096);
    const seqCount = Math.floor(sizeBytes / (1 << 20));
    {
      const dev = await FileDevice.open(image);
      const r4 = await writeLoad(dev, randomCount, 4096, depth, (i) => offsets[i]!);
      const r1m = await writeLoad(dev, seqCount, 1 << 20, depth, (i) => i << 20);
      await dev.close();
      rows.push(`bare FileDevice            | 4K rand ${r4.iops.toFixed(0).padStart(7)} IOPS | 1M seq ${r1m.mbps.toFixed(0).padStart(5)} MB/s |`);
    }
    for (const kib of args.chunksKib) {
      const chunkSize = kib * 1024;
      const root = path.join(top, `snap-${kib}`);
      const dev = await FileDevice.open(image);
      const cow = CowDevice.create(dev, { devicePath: image, snapshotRoot: root, chunkSize, durability: args.durability });
      const r4 = await writeLoad(cow, randomCount, 4096, depth, (i) => offsets[i]!);
      const r4again = await writeLoad(cow, randomCount, 4096, depth, (i) => offsets[i]!);
      await cow.close();
      // Sequential first writes on a fresh session.
      const cow2 = CowDevice.create(dev, { devicePath: image, snapshotRoot: path.join(top, `snap-seq-${kib}`), chunkSize, durability: args.durability });
      const r1m = await writeLoad(cow2, seqCount, 1 << 20, depth, (i) => i << 20);
      const summary = await cow2.close();
      await dev.close();
      // Restore of the sequential session vs a plain sequential write of the same bytes.
      const restored = await restore(summary!.sessionDir);
      const plain = await FileDevice.open(image);
      // The plain write is timed with its flush, as restore is.
      const plainStart = performance.now();
      await writeLoad(plain, seqCount, 1 << 20, 4, (i) => i << 20);
      const plainRate = { mbps: (seqCount << 20) / ((performance.now() - plainStart) / 1000) / 1e6 };
      await plain.close();
      const restoreMbps = restored.bytes / (restored.durationMs / 1000) / 1e6;
      rows.push(
        `chunk ${String(kib).padStart(3)} KiB (${args.durability.padEnd(7)}) | first 4K rand ${r4.iops.toFixed(0).padStart(7)} IOPS`
        + ` | rewrite 4K ${r4again.iops.toFixed(0).padStart(7)} IOPS | first 1M seq ${r1m.mbps.toFixed(0).padStart(5)} MB/s`
        + ` | restore ${restoreMbps.toFixed(0).padStart(5)} MB/s (plain seq write ${plainRate.mbps.toFixed(0)} MB/s, ${(restoreMbps / plainRate.mbps).toFixed(2)}x)`,
      );
      fs.rmSync(root, { recursive: true, force: true });
      fs.rmSync(path.join(top, `snap-seq-${kib}`), { recursive: true, force: true });
    }
    for (const kib of args.chunksKib) {
      const buf = randomBytes(kib * 1024);
      const n = 2000;
      const start = performance.now();
      for (let i = 0; i < n; i++) createHash('sha256').update(buf).digest();
      rows.push(`sha256 of one ${kib} KiB chunk: ${(((performance.now() - start) / n) * 1000).toFixed(1)} us`);
    }
  } finally {
    fs.rmSync(top, { recursive: true, force: true });
  }
  process.stdout.write(`image ${args.sizeMib} MiB, ${depth} writes in flight\n${rows.join('\n')}\n`);
}

await main();
