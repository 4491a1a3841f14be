/**
 * `node dist/bench/instant-restore.js`: instant restore against a whole restore of the same
 * backup, side by side in one run, the two taking turns to go first.
 *
 *   node dist/bench/instant-restore.js [--size-mib N | --size 16G] [--runs N] [--usable-only] [--s3 http://HOST:PORT | --s3 start]
 *
 * One image is backed up once into a local repository (with --s3, a new bucket of that S3
 * server; `start`: a throwaway radosgw, stopped at the end): with --size-mib, of mixed content (a
 * quarter each of random bytes, zeroes, one repeated MiB, text); with --size, as a large disk
 * holds data: 4 MiB of random bytes at the start of every 128 MiB (1/32 of it), holes between.
 * --usable-only leaves out the reader run (it reads the whole device). Per run, each into a new
 * file:
 * - whole: `restoreBackup` (what `bdsnap backup restore --output` runs), start to durable end;
 * - instant: `bdsnap backup restore --instant --output` through a running daemon; *usable* is
 *   from the command's start until a client has read the device's first 4 KiB through the
 *   daemon; *copied* until the daemon reports the restore complete (its map and data durable),
 *   and the copy alone from the daemon's start of the restore to its end (its status);
 *   then, the client still connected (so the daemon serves the file through the restore), the
 *   first READ_BYTES of it are read in 1 MiB requests, in turns with the same range of a plain
 *   device of the same content (a copy of the image, activated), both through the daemon's
 *   NBD socket;
 * - instant with a reader: the same, while one NBD client reads the whole device in 1 MiB
 *   requests from the start; its throughput against the background copy's alone.
 * Every restored file is compared with the image.
 */

import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { LocalDirStore, Repository, backupDevices, restoreBackup } from '../src/backup/index.js';
import { NbdClient } from '../src/nbd/client.js';
import { S3Store } from '../src/repository/s3-store.js';
import { withClient } from '../src/service/client.js';
import type { InstantRestoreInfo } from '../src/service/control-protocol.js';
import { ServeSnapshotProvider, TEST_REPO_PASSWORD, makeImage, startDaemon, type RunningDaemon } from './helpers.js';
import { benchOptions } from './options.js';
import { fillPageCache } from './page-cache.js';
import { startRadosgw } from './radosgw.js';
import { spread } from './report.js';
import { parseBytes } from '../src/units.js';

const MiB = 1024 * 1024;
const SPREAD_EVERY_BYTES = 128 * MiB;
const SPREAD_DATA_BYTES = 4 * MiB;
/** Bytes read per turn of the restored-range reads. */
const READ_BYTES = 256 * MiB;
const READ_TURNS = 3;

/** A sparse image of `sizeBytes` with SPREAD_DATA_BYTES of random data at the start of every SPREAD_EVERY_BYTES; the data's bytes. */
function makeSpreadImage(file: string, sizeBytes: number): number {
  const fd = fs.openSync(file, 'w');
  let dataBytes = 0;
  try {
    fs.ftruncateSync(fd, sizeBytes);
    for (let at = 0; at < sizeBytes; at += SPREAD_EVERY_BYTES) {
      const data = crypto.randomBytes(Math.min(SPREAD_DATA_BYTES, sizeBytes - at));
      fs.writeSync(fd, data, 0, data.length, at);
      dataBytes += data.length;
    }
  } finally {
    fs.closeSync(fd);
  }
  return dataBytes;
}

interface Sample {
  wholeSec: number;
  usableSec: number;
  copiedSec: number;
  copySec: number;
  readerMiBs: number;
  copyWithReaderSec: number;
  /** Reads of a restored range through the restore, and of a plain device, MiB/s. */
  restoredReadMiBs: number;
  plainReadMiBs: number;
}

/** MiB/s of reading `client`'s first `bytes` in 1 MiB requests. */
async function readRate(client: NbdClient, bytes: number): Promise<number> {
  const buf = Buffer.alloc(MiB);
  const t0 = performance.now();
  for (let at = 0; at < bytes; at += MiB) await client.read(buf.subarray(0, Math.min(MiB, bytes - at)), at);
  return bytes / MiB / ((performance.now() - t0) / 1000);
}

/** In pieces: a 16 GiB image is more than one Buffer holds. */
function sha256(file: string): string {
  const hash = crypto.createHash('sha256');
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.allocUnsafe(8 * MiB);
    for (let n; (n = fs.readSync(fd, buf, 0, buf.length, null)) > 0;) hash.update(buf.subarray(0, n));
  } finally {
    fs.closeSync(fd);
  }
  return hash.digest('hex');
}

/** Through the control socket: a `bdsnap status` process ten times a second would take a core from the daemon. */
async function restoresOf(daemon: RunningDaemon): Promise<InstantRestoreInfo[]> {
  return (await withClient(daemon.runDir, (c) => c.status())).restores;
}

/** Until the restore of `target` is complete; its record then, unless it was let go at once (nobody held it). */
async function waitCopied(daemon: RunningDaemon, target: string): Promise<InstantRestoreInfo | undefined> {
  for (;;) {
    const r = (await restoresOf(daemon)).find((x) => x.target === target);
    if (!r || r.state === 'complete') return r;
    if (r.state === 'failed') throw new Error(`instant restore of ${target} failed`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

interface InstantRun {
  usableSec: number;
  copiedSec: number;
  /** With `plain`: the background copy's own time, from the daemon's start of the restore to its end. */
  copySec: number;
  readerMiBs: number;
  /** With `plain`: reads of a restored range through the restore and through the plain device. */
  restoredReadMiBs: number;
  plainReadMiBs: number;
}

/**
 * From the command's start: until the first 4 KiB are read, and until the copy is done; with
 * `readAll`, a reader of the whole device meanwhile; with `plain` (an activated device of the
 * same content), reads of the restored device against it once the copy is done.
 */
async function instant(daemon: RunningDaemon, repoSpec: string, id: string, device: string, out: string, readAll: boolean, plain?: string): Promise<InstantRun> {
  const socketPath = path.join(daemon.runDir, 'nbd.sock');
  const t0 = performance.now();
  await daemon.cli(['backup', 'restore', '--repo', repoSpec, id, device, '--output', out, '--instant']);
  const client = await NbdClient.connect({ socketPath, exportName: out });
  const r: InstantRun = { usableSec: 0, copiedSec: 0, copySec: 0, readerMiBs: 0, restoredReadMiBs: 0, plainReadMiBs: 0 };
  try {
    await client.read(Buffer.alloc(4096), 0);
    r.usableSec = (performance.now() - t0) / 1000;
    if (readAll) r.readerMiBs = await readRate(client, client.size);
    if (plain === undefined) {
      await client.close();
    } else {
      // Connected through the end of the copy, the client keeps the file served by the restore.
      const done = await waitCopied(daemon, out);
      r.copiedSec = (performance.now() - t0) / 1000;
      r.copySec = (Date.parse(done!.finishedAt!) - Date.parse(done!.startedAt)) / 1000;
      const plainClient = await NbdClient.connect({ socketPath, exportName: plain });
      try {
        const bytes = Math.min(READ_BYTES, client.size);
        // A first turn of each that is not counted: both ranges in the page cache.
        await readRate(client, bytes);
        await readRate(plainClient, bytes);
        const restored: number[] = [];
        const plainRates: number[] = [];
        for (let turn = 0; turn < READ_TURNS; turn++) {
          const pair = [async () => restored.push(await readRate(client, bytes)), async () => plainRates.push(await readRate(plainClient, bytes))];
          if (turn % 2 === 1) pair.reverse();
          for (const read of pair) await read();
        }
        r.restoredReadMiBs = spread(restored).median;
        r.plainReadMiBs = spread(plainRates).median;
      } finally {
        await plainClient.close();
      }
    }
  } finally {
    await client.close();
  }
  if (plain === undefined) {
    await waitCopied(daemon, out);
    r.copiedSec = (performance.now() - t0) / 1000;
  }
  return r;
}

async function main(): Promise<void> {
  const values = benchOptions('node dist/bench/instant-restore.js [--size-mib N | --size SIZE] [--runs N] [--usable-only] [--s3 http://HOST:PORT | --s3 start]', {
    'size-mib': { type: 'string', default: '1024' }, size: { type: 'string' }, runs: { type: 'string', default: '3' }, 'usable-only': { type: 'boolean', default: false }, s3: { type: 'string' },
  });
  const rgw = values.s3 === 'start' ? startRadosgw() : undefined;
  const s3 = rgw?.endpoint ?? values.s3;
  const sizeBytes = values.size !== undefined ? parseBytes(values.size, '--size') : Number(values['size-mib']) * MiB;
  const usableOnly = values['usable-only'];
  const runs = Number(values.runs);
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-bench-instant-'));
  let daemon: RunningDaemon | undefined;
  let s3Store: S3Store | undefined;
  try {
    const image = path.join(work, 'disk.img');
    // What a restore writes, and so the page cache a cell fills first (fillPageCache).
    let writtenBytes = sizeBytes;
    let layout = 'mixed';
    if (values.size !== undefined) {
      writtenBytes = makeSpreadImage(image, sizeBytes);
      layout = `${writtenBytes / MiB} MiB of random data spread over it (${SPREAD_DATA_BYTES / MiB} MiB every ${SPREAD_EVERY_BYTES / MiB} MiB)`;
    } else {
      makeImage(image, sizeBytes, 'mixed', 7);
    }
    const want = sha256(image);
    // The plain device the restored one's reads are set against: a copy of the image.
    const plain = path.join(work, 'plain.img');
    execFileSync('cp', ['--sparse=always', image, plain]);
    let repoSpec = path.join(work, 'repo');
    if (s3 !== undefined) {
      const bucket = `bench-instant-${crypto.randomBytes(4).toString('hex')}`;
      s3Store = new S3Store({ endpoint: s3, bucket, prefix: '' });
      await s3Store.createBucket();
      repoSpec = `s3:${s3}/${bucket}`;
    }
    const store = (): LocalDirStore | S3Store => s3Store ?? new LocalDirStore(repoSpec);
    const backupT0 = performance.now();
    await Repository.init(store(), { password: TEST_REPO_PASSWORD });
    const repo = await Repository.open(store(), { password: () => TEST_REPO_PASSWORD });
    const provider = new ServeSnapshotProvider(work, { copy: false });
    const { id } = await backupDevices(repo, provider, [image]);
    const backupSec = (performance.now() - backupT0) / 1000;
    daemon = await startDaemon(undefined, { activate: [plain] });
    process.stderr.write(`image ${sizeBytes / MiB} MiB, ${layout}, backed up ${s3 !== undefined ? `into S3 at ${s3}` : 'locally'} in ${backupSec.toFixed(1)} s; ${runs} runs, load ${os.loadavg()[0]!.toFixed(1)}\n`);
    const samples: Sample[] = [];
    for (let i = 0; i < runs; i++) {
      const s: Partial<Sample> = {};
      const steps: Array<() => Promise<void>> = [
        async () => {
          const out = path.join(work, 'whole.img');
          fillPageCache(work, writtenBytes);
          const t0 = performance.now();
          await restoreBackup(repo, id, image, { output: out });
          s.wholeSec = (performance.now() - t0) / 1000;
          if (sha256(out) !== want) throw new Error('the whole restore differs from the image');
          fs.rmSync(out);
        },
        async () => {
          const out = path.join(work, 'instant.img');
          fillPageCache(work, writtenBytes);
          const r = await instant(daemon!, repoSpec, id, image, out, false, path.resolve(plain));
          s.usableSec = r.usableSec;
          s.copiedSec = r.copiedSec;
          s.copySec = r.copySec;
          s.restoredReadMiBs = r.restoredReadMiBs;
          s.plainReadMiBs = r.plainReadMiBs;
          if (sha256(out) !== want) throw new Error('the instant restore differs from the image');
          fs.rmSync(out);
          if (usableOnly) return;
          const out2 = path.join(work, 'instant-read.img');
          fillPageCache(work, writtenBytes);
          const r2 = await instant(daemon!, repoSpec, id, image, out2, true);
          s.readerMiBs = r2.readerMiBs;
          s.copyWithReaderSec = r2.copiedSec;
          if (sha256(out2) !== want) throw new Error('the instant restore with a reader differs from the image');
          fs.rmSync(out2);
        },
      ];
      if (i % 2 === 1) steps.reverse();
      for (const step of steps) await step();
      samples.push(s as Sample);
      process.stderr.write(`run ${i + 1}: ${JSON.stringify(s)}\n`);
    }
    const fmt = (xs: number[], digits = 2): string => {
      const x = spread(xs);
      return `${x.median.toFixed(digits)} (${x.min.toFixed(digits)}-${x.max.toFixed(digits)})`;
    };
    const sizeMiB = sizeBytes / MiB;
    process.stdout.write([
      `| measure | value | target |`,
      `|---|---|---|`,
      `| time to a usable device (--instant until the first read) | ${fmt(samples.map((s) => s.usableSec))} s | at most 1 s |`,
      `| whole restore | ${fmt(samples.map((s) => s.wholeSec))} s | |`,
      `| background copy throughput / whole restore's (the daemon's start of the restore to its end) | ${fmt(samples.map((s) => s.wholeSec / s.copySec))}x | at least 0.8x |`,
      `| the same from the command's start (with the client's start) | ${fmt(samples.map((s) => s.wholeSec / s.copiedSec))}x | |`,
      `| reads of a restored range through the restore / of a plain device (${Math.min(READ_BYTES, sizeBytes) / MiB} MiB in 1 MiB requests, in turns) | ${fmt(samples.map((s) => s.restoredReadMiBs / s.plainReadMiBs))}x (${fmt(samples.map((s) => s.restoredReadMiBs), 0)} against ${fmt(samples.map((s) => s.plainReadMiBs), 0)} MiB/s) | at least 0.9x |`,
      ...(usableOnly ? [] : [`| a reader of data not restored yet / the copy alone | ${fmt(samples.map((s) => s.readerMiBs / (sizeMiB / s.copiedSec)))}x (${fmt(samples.map((s) => s.readerMiBs), 0)} MiB/s) | at least 0.5x |`]),
      '',
      `Medians of ${runs} runs of a ${sizeMiB} MiB image (${layout}; repository ${s3 !== undefined ? 'in S3' : 'local'}), (min-max) in brackets. Load average at the end: ${os.loadavg().map((x) => x.toFixed(1)).join(' ')}.`,
    ].join('\n') + '\n');
  } finally {
    await daemon?.server.stop();
    s3Store?.close();
    rgw?.stop();
    fs.rmSync(work, { recursive: true, force: true });
  }
}

await main();
