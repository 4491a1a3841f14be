/**
 * The snapshot rows, side by side in one run through the real daemon and fio's nbd engine:
 *
 * - image reads vs device reads (sequential 1 MiB at depth 4, random 4 KiB at depth 16): the
 *   image of a snapshot taken after half the device was rewritten, so half its chunks come
 *   from the difference storage and half from the device (target: at least 0.9x);
 * - first writes (one pass of random 4 KiB writes over the device, depth 16) with a snapshot
 *   held vs with a mount session: each cell starts a new snapshot or a new session, so every
 *   write is a first write (target: about 1.0x);
 * - plain writes (an inactive device, no snapshot) with the change map on vs off (a second
 *   daemon started with --no-change-tracking): random 4 KiB at depth 1 and 16, sequential
 *   1 MiB at depth 4, timed (target: at most 3% slower);
 * - the write stall of `snapshot create` on 4 devices under random 4 KiB writes at depth 16
 *   each: how long the barrier held new writes, over many creates (target: p99 <= 50 ms).
 *
 * Usage: node dist/bench/snapshots.js [--repeat N] [--size-mib N] [--creates N] [--rows LIST] [--durability process|strict] [--json FILE]
 */

import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { benchOptions } from './options.js';
import { runFio, type RunningDaemon, startDaemon } from './helpers.js';
import { spread } from './report.js';

const values = benchOptions('node dist/bench/snapshots.js [--repeat N] [--size-mib N] [--creates N] [--rows reads,first-writes,tracking,stall] [--durability process|strict] [--json FILE]', {
  repeat: { type: 'string', default: '3' },
  'size-mib': { type: 'string', default: '1024' },
  creates: { type: 'string', default: '30' },
  json: { type: 'string' },
  rows: { type: 'string', default: 'reads,first-writes,tracking,stall' },
  durability: { type: 'string', default: 'process' },
});
if (values.durability !== 'process' && values.durability !== 'strict') throw new Error('--durability must be process or strict');
/** The daemons' durability (strict: change maps that survive a power loss, and the flush a take makes for them). */
const DURABILITY = values.durability;
const REPEAT = Number(values.repeat);
const SIZE_BYTES = Number(values['size-mib']) << 20;
const CREATES = Number(values.creates);
const ROWS = new Set(values.rows.split(','));

interface Cell {
  row: string;
  unit: string;
  /** The reference side first, then the measured side, per repetition. */
  reference: number[];
  measured: number[];
  target: string;
}

function filledImage(dir: string, name: string): string {
  const file = path.join(dir, name);
  const fd = fs.openSync(file, 'w');
  const chunk = Buffer.alloc(8 << 20);
  for (let at = 0; at < SIZE_BYTES; at += chunk.length) {
    randomBytes(chunk.length).copy(chunk);
    fs.writeSync(fd, chunk, 0, Math.min(chunk.length, SIZE_BYTES - at), at);
  }
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  return file;
}

function uri(daemon: RunningDaemon, exportName: string): string {
  return `nbd+unix:///${encodeURIComponent(exportName)}?socket=${encodeURIComponent(path.join(daemon.runDir, 'nbd.sock'))}`;
}

async function createSnapshot(daemon: RunningDaemon, devices: string[]): Promise<{ id: string; stallMs: number }> {
  const r = await daemon.cli(['snapshot', 'create', ...devices, '--json']);
  return JSON.parse(r.stdout) as { id: string; stallMs: number };
}

async function destroySnapshot(daemon: RunningDaemon, id: string): Promise<void> {
  await daemon.cli(['snapshot', 'destroy', id]);
}

function median(xs: number[]): number {
  return spread(xs).median;
}

function percentile(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)] ?? NaN;
}

async function readRows(daemon: RunningDaemon, device: string, cells: Cell[]): Promise<void> {
  // Rewrite half the device, then snapshot: the image's chunks come half from each place.
  await runFio({ uri: uri(daemon, device), rw: 'write', blockSizeBytes: 1 << 20, ioDepth: 4, sizeBytes: SIZE_BYTES / 2, extraArgs: ['--end_fsync=1'] });
  const snap = await createSnapshot(daemon, [device]);
  await runFio({ uri: uri(daemon, device), rw: 'write', blockSizeBytes: 1 << 20, ioDepth: 4, sizeBytes: SIZE_BYTES / 2, extraArgs: ['--end_fsync=1'] });
  const jobs = [
    { row: 'reads, sequential 1 MiB, depth 4: image / device', unit: 'MB/s', rw: 'read', bs: 1 << 20, depth: 4 },
    { row: 'reads, random 4 KiB, depth 16: image / device', unit: 'IOPS', rw: 'randread', bs: 4096, depth: 16 },
  ];
  for (const job of jobs) {
    const cell: Cell = { row: job.row, unit: job.unit, reference: [], measured: [], target: '>= 0.9' };
    for (let i = 0; i < REPEAT; i++) {
      for (const side of i % 2 === 0 ? ['device', 'image'] : ['image', 'device']) {
        const name = side === 'device' ? device : `${device}@${snap.id}`;
        const r = await runFio({ uri: uri(daemon, name), rw: job.rw, blockSizeBytes: job.bs, ioDepth: job.depth, sizeBytes: SIZE_BYTES, runtimeSec: 4 });
        const value = job.unit === 'MB/s' ? r.read.bandwidthBytesPerSec / 1e6 : r.read.iops;
        (side === 'device' ? cell.reference : cell.measured).push(value);
      }
    }
    cells.push(cell);
  }
  await destroySnapshot(daemon, snap.id);
}

async function firstWriteRows(daemon: RunningDaemon, active: string, idle: string, cells: Cell[]): Promise<void> {
  const writes = Math.min(16384, SIZE_BYTES / 4096);
  const cell: Cell = { row: `first writes, random 4 KiB one pass (${writes}), depth 16: snapshot held / mount session`, unit: 'IOPS', reference: [], measured: [], target: '~ 1.0' };
  const pass = (device: string): Promise<number> => runFio({
    uri: uri(daemon, device), rw: 'randwrite', blockSizeBytes: 4096, ioDepth: 16, sizeBytes: SIZE_BYTES,
    extraArgs: [`--number_ios=${writes}`, '--end_fsync=1'],
  }).then((r) => r.write.iops);
  for (let i = 0; i < REPEAT; i++) {
    for (const side of i % 2 === 0 ? ['session', 'snapshot'] : ['snapshot', 'session']) {
      if (side === 'session') {
        // A new connection of an active device: a new session, every chunk unpreserved.
        cell.reference.push(await pass(active));
      } else {
        const snap = await createSnapshot(daemon, [idle]);
        cell.measured.push(await pass(idle));
        await destroySnapshot(daemon, snap.id);
      }
    }
  }
  cells.push(cell);
}

async function trackingRows(tracked: RunningDaemon, untracked: RunningDaemon, trackedImg: string, untrackedImg: string, cells: Cell[]): Promise<void> {
  const jobs = [
    { row: 'plain writes, random 4 KiB, depth 1: change map on / off', rw: 'randwrite', bs: 4096, depth: 1, unit: 'IOPS' },
    { row: 'plain writes, random 4 KiB, depth 16: change map on / off', rw: 'randwrite', bs: 4096, depth: 16, unit: 'IOPS' },
    { row: 'plain writes, sequential 1 MiB, depth 4: change map on / off', rw: 'write', bs: 1 << 20, depth: 4, unit: 'MB/s' },
  ];
  for (const job of jobs) {
    const cell: Cell = { row: job.row, unit: job.unit, reference: [], measured: [], target: '>= 0.97' };
    for (let i = 0; i < REPEAT; i++) {
      for (const side of i % 2 === 0 ? ['off', 'on'] : ['on', 'off']) {
        const [daemon, img] = side === 'on' ? [tracked, trackedImg] : [untracked, untrackedImg];
        const r = await runFio({ uri: uri(daemon, img), rw: job.rw, blockSizeBytes: job.bs, ioDepth: job.depth, sizeBytes: SIZE_BYTES, runtimeSec: 4 });
        const value = job.unit === 'MB/s' ? r.write.bandwidthBytesPerSec / 1e6 : r.write.iops;
        (side === 'on' ? cell.measured : cell.reference).push(value);
      }
    }
    cells.push(cell);
  }
}

async function stallRow(daemon: RunningDaemon, devices: string[]): Promise<{ stallsMs: number[]; writerIops: number }> {
  const runtimeSec = Math.max(10, Math.ceil(CREATES * 0.6));
  const fioDir = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-bench-fio-'));
  const fios = devices.map((d, i) => new Promise<number>((resolve, reject) => {
    const output = path.join(fioDir, `fio-${i}.json`);
    const p = spawn('fio', ['--name=stall', '--ioengine=nbd', `--uri=${uri(daemon, d)}`, '--rw=randwrite', '--bs=4k', '--iodepth=16',
      `--size=${SIZE_BYTES}`, '--time_based=1', `--runtime=${runtimeSec}`, '--output-format=json', `--output=${output}`], { stdio: ['ignore', 'ignore', 'inherit'], cwd: fioDir });
    p.once('exit', (code) => {
      if (code !== 0) return reject(new Error(`fio exited ${code}`));
      const json = JSON.parse(fs.readFileSync(output, 'utf8')) as { jobs: Array<{ write: { iops: number } }> };
      resolve(json.jobs[0]?.write.iops ?? 0);
    });
  }));
  await new Promise((r) => setTimeout(r, 1000));
  const stallsMs: number[] = [];
  for (let i = 0; i < CREATES; i++) {
    const snap = await createSnapshot(daemon, devices);
    stallsMs.push(snap.stallMs);
    await destroySnapshot(daemon, snap.id);
  }
  const iops = await Promise.all(fios);
  fs.rmSync(fioDir, { recursive: true, force: true });
  return { stallsMs, writerIops: iops.reduce((a, b) => a + b, 0) };
}

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-bench-snapshots-'));
  const cells: Cell[] = [];
  try {
    const images = ['read.img', 'active.img', 'idle.img', 'untracked.img', 's0.img', 's1.img', 's2.img', 's3.img'].map((n) => filledImage(dir, n));
    const [readImg, activeImg, idleImg, untrackedImg, ...stallImgs] = images as [string, string, string, string, ...string[]];
    const daemon = await startDaemon(undefined, { activate: [activeImg], durability: DURABILITY });
    const untracked = ROWS.has('tracking') ? await startDaemon(undefined, { extraArgs: ['--no-change-tracking'], durability: DURABILITY }) : undefined;
    try {
      // Register the idle devices (a snapshot taken and dropped).
      await destroySnapshot(daemon, (await createSnapshot(daemon, [readImg, idleImg, ...stallImgs])).id);
      if (untracked) {
        await destroySnapshot(untracked, (await createSnapshot(untracked, [untrackedImg])).id);
        await trackingRows(daemon, untracked, idleImg, untrackedImg, cells);
      }
      if (ROWS.has('reads')) await readRows(daemon, readImg, cells);
      if (ROWS.has('first-writes')) await firstWriteRows(daemon, activeImg, idleImg, cells);
      const stall = ROWS.has('stall') ? await stallRow(daemon, stallImgs) : { stallsMs: [], writerIops: 0 };
      const lines = [
        `bdsnap snapshot bench: ${SIZE_BYTES >> 20} MiB images (filled), ${REPEAT} repetitions, sides alternating; ${values.durability} durability; ${os.cpus().length} cores`,
        '',
        '| row | reference (min / median / max) | measured (min / median / max) | ratio of medians | target |',
        '|---|---|---|---|---|',
      ];
      const fmt = (xs: number[]): string => `${Math.min(...xs).toFixed(0)} / ${median(xs).toFixed(0)} / ${Math.max(...xs).toFixed(0)}`;
      for (const c of cells) lines.push(`| ${c.row} (${c.unit}) | ${fmt(c.reference)} | ${fmt(c.measured)} | ${(median(c.measured) / median(c.reference)).toFixed(2)}x | ${c.target} |`);
      if (stall.stallsMs.length > 0) lines.push(`| write stall of snapshot create, 4 devices, random 4 KiB writes depth 16 each (${CREATES} creates; writers did ${stall.writerIops.toFixed(0)} IOPS in all) | | p50 ${percentile(stall.stallsMs, 50).toFixed(2)} ms, p99 ${percentile(stall.stallsMs, 99).toFixed(2)} ms, max ${Math.max(...stall.stallsMs).toFixed(2)} ms | | p99 <= 50 ms |`);
      process.stdout.write(`${lines.join('\n')}\n`);
      if (values.json) fs.writeFileSync(values.json, JSON.stringify({ cells, stall }, null, 2));
    } catch (err) {
      process.stderr.write(`daemon output:\n${daemon.server.stderr()}\n`);
      throw err;
    } finally {
      await daemon.server.stop();
      await untracked?.server.stop();
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench failed: ${(err as Error).stack ?? String(err)}\n`);
  process.exitCode = 1;
});
