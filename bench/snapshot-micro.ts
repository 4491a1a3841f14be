/**
 * Microbenchmark of the copy-before-write engine, without NBD: used to pick the default chunk
 * size. For each chunk size it measures, on a fresh session over an image in the page cache:
 * - first writes: 4 KiB random writes (every one lands on a chunk not yet preserved) and 1 MiB
 *   sequential writes, 16 requests in flight, against the same writes on the bare FileDevice;
 * - rewrites of chunks already preserved (should cost nothing over the bare device);
 * - restore throughput against a plain sequential write of the same bytes;
 * - sha256 and crc32 cost of one chunk (how long a record checksum holds the event loop).
 *
 * Each measurement is repeated (--repeat, default 3) with the bare device measured again right
 * before the session in the same round, and the medians of the values and of the per-round
 * ratios are printed: on a shared machine only ratios taken within one round mean much.
 *
 * Run: node dist/bench/snapshot-micro.js [--size-mib N] [--chunks 4,16,64,256] [--durability process|strict] [--repeat N]
 */

import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { crc32 } from 'node:zlib';
import { performance } from 'node:perf_hooks';
import { FileDevice } from '../src/device/file-device.js';
import { CowDevice, restore } from '../src/snapshot/index.js';
import { median, writeLoad } from './workloads.js';

interface Args {
  sizeMib: number;
  chunksKib: number[];
  durability: 'process' | 'strict';
  repeat: number;
}

function parseArgs(argv: string[]): Args {
  const args: Args = { sizeMib: 256, chunksKib: [4, 16, 64, 256], durability: 'process', repeat: 3 };
  for (let i = 0; i < argv.length; i++) {
    const v = argv[i + 1];
    if (argv[i] === '--size-mib' && v) args.sizeMib = Number(v);
    else if (argv[i] === '--chunks' && v) args.chunksKib = v.split(',').map(Number);
    else if (argv[i] === '--durability' && (v === 'process' || v === 'strict')) args.durability = v;
    else if (argv[i] === '--repeat' && v) args.repeat = Math.max(1, Number(v));
    else continue;
    i++;
  }
  return args;
}

function shuffledOffsets(count: number, sizeBytes: number, lengthBytes: number, stride: number): number[] {
  // One write per distinct `stride` region, in random order: every write is a first write for
  // any chunk size up to the stride.
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
    const stride = Math.max(...args.chunksKib) * 1024;
    const randomCount = Math.floor(sizeBytes / stride);
    const seqCount = Math.floor(sizeBytes / (1 << 20));
    for (const kib of args.chunksKib) {
      const chunkSize = kib * 1024;
      const m = { bare4: [] as number[], bare1m: [] as number[], first4: [] as number[], again4: [] as number[], first1m: [] as number[], restore: [] as number[], plain: [] as number[] };
      const r = { first4: [] as number[], again4: [] as number[], first1m: [] as number[], restore: [] as number[] };
      for (let round = 0; round < args.repeat; round++) {
        const offsets = shuffledOffsets(randomCount, sizeBytes, 4096, stride);
        const root = path.join(top, `snap-${kib}-${round}`);
        const dev = await FileDevice.open(image);
        const b4 = await writeLoad(dev, randomCount, 4096, depth, (i) => offsets[i]!);
        const b1m = await writeLoad(dev, seqCount, 1 << 20, depth, (i) => i << 20);
        const cow = CowDevice.create(dev, { devicePath: image, snapshotRoot: root, chunkSize, durability: args.durability });
        const r4 = await writeLoad(cow, randomCount, 4096, depth, (i) => offsets[i]!);
        const r4again = await writeLoad(cow, randomCount, 4096, depth, (i) => offsets[i]!);
        await cow.close();
        // Sequential first writes on a fresh session.
        const cow2 = CowDevice.create(dev, { devicePath: image, snapshotRoot: path.join(root, 'seq'), chunkSize, durability: args.durability });
        const r1m = await writeLoad(cow2, seqCount, 1 << 20, depth, (i) => i << 20);
        const summary = await cow2.close();
        await dev.close();
        // Restore of the sequential session vs a plain sequential write of the same bytes.
        const restored = await restore(summary!.sessionDir);
        const plain = await FileDevice.open(image);
        // The plain write is timed with its flush, as restore is.
        const plainStart = performance.now();
        await writeLoad(plain, seqCount, 1 << 20, 4, (i) => i << 20);
        const plainMbps = (seqCount << 20) / ((performance.now() - plainStart) / 1000) / 1e6;
        await plain.close();
        const restoreMbps = restored.bytes / (restored.durationMs / 1000) / 1e6;
        m.bare4.push(b4.iops);
        m.bare1m.push(b1m.mbps);
        m.first4.push(r4.iops);
        m.again4.push(r4again.iops);
        m.first1m.push(r1m.mbps);
        m.restore.push(restoreMbps);
        m.plain.push(plainMbps);
        r.first4.push(r4.iops / b4.iops);
        r.again4.push(r4again.iops / b4.iops);
        r.first1m.push(r1m.mbps / b1m.mbps);
        r.restore.push(restoreMbps / plainMbps);
        fs.rmSync(root, { recursive: true, force: true });
      }
      const x = (v: number[]): string => `${median(v).toFixed(2)}x`;
      rows.push(
        `chunk ${String(kib).padStart(3)} KiB (${args.durability}), medians of ${args.repeat}:\n`
        + `  bare device      4K rand ${median(m.bare4).toFixed(0).padStart(7)} IOPS | 1M seq ${median(m.bare1m).toFixed(0).padStart(5)} MB/s\n`
        + `  first write      4K rand ${median(m.first4).toFixed(0).padStart(7)} IOPS (${x(r.first4)}) | 1M seq ${median(m.first1m).toFixed(0).padStart(5)} MB/s (${x(r.first1m)})\n`
        + `  rewrite          4K rand ${median(m.again4).toFixed(0).padStart(7)} IOPS (${x(r.again4)})\n`
        + `  restore          ${median(m.restore).toFixed(0).padStart(5)} MB/s vs plain seq write + fdatasync ${median(m.plain).toFixed(0)} MB/s (${x(r.restore)})`,
      );
    }
    for (const kib of args.chunksKib) {
      const buf = randomBytes(kib * 1024);
      const n = 2000;
      const start = performance.now();
      for (let i = 0; i < n; i++) createHash('sha256').update(buf).digest();
      const shaUs = ((performance.now() - start) / n) * 1000;
      const crcStart = performance.now();
      for (let i = 0; i < n; i++) crc32(buf);
      rows.push(`one ${kib} KiB chunk: sha256 ${shaUs.toFixed(1)} us, crc32 ${(((performance.now() - crcStart) / n) * 1000).toFixed(1)} us`);
    }
  } finally {
    fs.rmSync(top, { recursive: true, force: true });
  }
  process.stdout.write(`image ${args.sizeMib} MiB, ${depth} writes in flight\n${rows.join('\n')}\n`);
}

await main();
