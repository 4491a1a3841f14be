/**
 * The rows of `npm run bench`: each compares a measured side with its baseline on this machine
 * in the same run, states what it measures, and carries its target (BENCHMARKS.md).
 *
 * Fairness rules every row follows:
 * - Each cell starts as a user's next run of fio would (see CellStart): the image read into
 *   the page cache, nothing written back, no memory handed to the cell
 *   (BDSNAP_BENCH_CELL_START=settled starts every cell written back and with memory given, as
 *   the bench did before it was checked against fio run by hand).
 * - As a user comparing two servers by hand, each side of a row serves its own image
 *   (RowContext.baselineImagePath for the other side), and the images are full of random data
 *   (checked before every cell) and stay so: every row that writes writes random data, and the
 *   restore row fills the image again after its dd.
 * - First-write rows really write first: a fresh session per cell, and every write lands in
 *   a chunk no earlier write of the cell touched (sequential: one pass; random: a replayed
 *   list of distinct chunks); the session's manifest must show one chunk preserved per write
 *   (for the replayed list: per block of it the cell changed).
 * - The two sides of a row alternate which goes first from one repetition to the next.
 */

import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { setTimeout as delay } from 'node:timers/promises';
import { deflateRawSync } from 'node:zlib';
import { BDSNAP_MAIN, CleanupStack, type FioJob, makeImage, MIN_SCRATCH_FS_BYTES, missingNeeds, mountScratchFs, run, runFio, scratchFsNeeds, startDaemon } from './helpers.js';
import { copyFloorRound } from './copy-floor.js';
import { cacheFile, fillPageCache, settleFile } from './page-cache.js';
import { flushFloorRound } from './flush-floor.js';
import { BDSNAP_MOUNT, MOUNT_ROUTES, MOUNT_RUNTIME_SEC, mountCell, type MountJob, mountUnavailable, NBDKIT_BDSNAP_ATTACH, NBDKIT_BY_HAND } from './mount.js';
import { measureRestore } from './restore.js';
import { BDSNAP_REWRITE, BDSNAP_SERVE, BDSNAP_SESSION, BDSNAP_TLS, NBDKIT_FILE, NBDKIT_TLS, nbdFloor, type RunningTarget, type Target } from './targets.js';
import { BENCH_CHUNK_BYTES } from './workloads.js';

export type Unit = 'MB/s' | 'IOPS' | 'ms' | 'x';

export interface RowContext {
  dir: string;
  /** The 1 GiB (by default) image of random data the measured side of a row serves. */
  imagePath: string;
  /**
   * A second image like it, which the row's other side (nbdkit, the plain server) serves: a
   * user comparing two servers gives each its own image, and neither side then writes over
   * pages the other has just dirtied.
   */
  baselineImagePath: string;
  /** A second filled file of the same size: the source of the copy-into-the-image row. */
  sourcePath: string;
  imageBytes: number;
  /** Length of the timed fio rows. */
  runtimeSec: number;
}

export interface Column {
  name: string;
  unit: Unit;
}

export interface BenchRow {
  /** Short key for --rows. */
  id: string;
  name: string;
  /** One sentence: what the row measures and how. */
  measures: string;
  columns: Column[];
  /** How the row's figure is formed from the columns, e.g. "bdsnap / nbdkit". */
  ratioText: string;
  ratio(values: Record<string, number>): number;
  /** The row's target, e.g. ">= 1.0x", and whether a ratio meets it. */
  targetText: string;
  meets(ratio: number): boolean;
  /** One repetition: every column measured once; `reverse` flips which side goes first. */
  once(context: RowContext, reverse: boolean): Promise<Record<string, number>>;
  /** Why the row cannot run on this machine (printed, the row skipped), or undefined. */
  unavailable?(): string | undefined;
}

/**
 * How a cell starts. 'user': as the next run of fio by hand finds the machine, right after the
 * last server stopped: the image read into the page cache, its pages as the last cell (or
 * makeImage) left them, and no memory got back from the host for the cell (this machine hands
 * free memory back to its host, and a user's server and session store pay to get it again).
 * 'settled': the image written back and an image's worth of memory got back from the host just
 * before the server starts, as copy-floor's passes start (the first-seq row compares with them).
 * Checked against fio run by hand (bench/by-hand.sh, the sides alternating, the same hour):
 * first-rand-4k gave 0.82-0.87 settled, 0.64-0.66 'user', 0.25-0.48 by hand; the gap left is on
 * the plain side (about half the IOPS of the same fio job by hand), not in the page-cache state
 * nor the replayed log (neither changed the by-hand figure).
 */
type CellStart = 'user' | 'settled';

interface CellOptions {
  /** Where a session target makes its snapshot root. */
  snapshotParent?: string;
  start?: CellStart;
  /** Checks what the cell did, once its server has stopped (a session's store is final then). */
  afterStop?: (running: RunningTarget) => void;
}

async function withTarget<T>(target: Target, context: RowContext, fn: (running: RunningTarget) => Promise<T>, options: CellOptions = {}): Promise<T> {
  const { snapshotParent, start = 'user', afterStop } = options;
  if (randomDataProblem(context.imagePath) !== undefined) {
    // An earlier write cell left fio's own buffers in the image (they deflate far below random
    // data once a whole pass has written them): start this cell from random data again.
    makeUserImage(context.imagePath, context.imageBytes, ++remadeImages);
  }
  if (start === 'settled' || process.env.BDSNAP_BENCH_CELL_START === 'settled') {
    settleFile(context.imagePath);
    fillPageCache(context.dir, context.imageBytes);
  } else {
    cacheFile(context.imagePath);
  }
  checkRandomData(context.imagePath);
  const running = await target.start({ imagePath: context.imagePath, ...(snapshotParent !== undefined ? { snapshotParent } : {}) });
  let result: T;
  try {
    result = await fn(running);
  } finally {
    await running.stop();
  }
  afterStop?.(running);
  return result;
}

/**
 * An image of random data as a user's device is when they start: written back to its disk long
 * before, in the page cache. Dirty pages of an image just made would be written back inside the
 * first cell that needs them on disk (a session on XFS clones its originals, which writes the
 * image's dirty range first), a cost no user sees on a device they did not write a moment ago.
 */
export function makeUserImage(imagePath: string, sizeBytes: number, seed = 1): void {
  makeImage(imagePath, sizeBytes, 'random', seed);
  settleFile(imagePath);
}

/** The context of a row's other side: the same, on the second image. */
function baselineSide(context: RowContext): RowContext {
  return { ...context, imagePath: context.baselineImagePath };
}

const RANDOM_CHECK_SAMPLES = 32;
const RANDOM_CHECK_BYTES = 64 * 1024;
/**
 * What fio writes (its default buffers, the same as by hand) deflates to about 0.89 of its size;
 * makeImage's random data to 1.0; a pattern of blocks to well under 0.01.
 */
const RANDOM_CHECK_MIN_RATIO = 0.8;

/**
 * Refuse to measure an image that is not full of random data: blocks sampled across it must not
 * compress below RANDOM_CHECK_MIN_RATIO. Zero blocks, holes or a repeated pattern would let the
 * page cache, the kernel or a server take short cuts a user's data does not allow.
 */
export function checkRandomData(imagePath: string): void {
  const problem = randomDataProblem(imagePath);
  if (problem !== undefined) throw new Error(`${imagePath} is not full of random data: ${problem}; make the image again`);
}

let remadeImages = 100;

function randomDataProblem(imagePath: string): string | undefined {
  const size = fs.statSync(imagePath).size;
  const block = Buffer.alloc(RANDOM_CHECK_BYTES);
  const fd = fs.openSync(imagePath, 'r');
  try {
    for (let i = 0; i < RANDOM_CHECK_SAMPLES; i++) {
      const at = Math.floor(((size - block.length) * i) / (RANDOM_CHECK_SAMPLES - 1) / 4096) * 4096;
      const got = fs.readSync(fd, block, 0, block.length, at);
      const packed = deflateRawSync(block.subarray(0, got), { level: 1 }).length;
      if (got < block.length || packed < RANDOM_CHECK_MIN_RATIO * got) return `the ${got} bytes at ${at} compress to ${packed}`;
    }
  } finally {
    fs.closeSync(fd);
  }
  return undefined;
}

type FioShape = Omit<FioJob, 'uri'>;

async function fioCell(target: Target, context: RowContext, job: FioShape, unit: 'MB/s' | 'IOPS', options: CellOptions = {}): Promise<number> {
  return withTarget(target, context, (running) => fioOn(running, job, unit), options);
}

/** One fio job against a running target: MB/s or IOPS of its reads or writes. */
async function fioOn(running: RunningTarget, job: FioShape, unit: 'MB/s' | 'IOPS'): Promise<number> {
  const result = await runFio({ ...job, uri: running.uri, ...(running.env ? { env: running.env } : {}) });
  if (result.error !== 0) throw new Error(`fio error ${result.error}:\n${result.stderr}`);
  const side = job.rw.includes('write') ? result.write : result.read;
  return unit === 'MB/s' ? side.bandwidthBytesPerSec / 1e6 : side.iops;
}

/** afterStop for a first-write cell: the session preserved `chunks` chunks, one per write, or the cell measured rewrites too. */
function preservedExactly(chunks: number): (running: RunningTarget) => void {
  return (running) => {
    const preserved = running.preservedChunks?.();
    if (preserved !== chunks) {
      throw new Error(`the session preserved ${preserved ?? 'an unknown number of'} chunks, not ${chunks}: some writes of the cell were not first writes`);
    }
  };
}

/**
 * afterStop for a replayed first-write cell, armed before the cell starts: the session preserved
 * one chunk per block of the log that fio changed on the image. fio at times ends a replay with a
 * few writes of the log never sent (under load: 16381 of 16384 blocks changed, the session holding
 * exactly those), so the log's count is not what the session must match; at most `ioDepth` may go
 * unsent, more means the cell measured something else than the log.
 */
export function preservedPerLoggedWrite(imagePath: string, logPath: string, ioDepth: number): (running: RunningTarget) => void {
  const blocks = fs.readFileSync(logPath, 'utf8').split('\n').flatMap((line) => {
    const [, op, offset, length] = line.split(' ');
    return op === 'write' ? [{ offset: Number(offset), length: Number(length) }] : [];
  });
  const readBlocks = (): Buffer[] => {
    const fd = fs.openSync(imagePath, 'r');
    try {
      return blocks.map(({ offset, length }) => {
        const block = Buffer.alloc(length);
        if (fs.readSync(fd, block, 0, length, offset) !== length) throw new Error(`${imagePath} ends before ${offset + length}, a block of ${logPath}`);
        return block;
      });
    } finally {
      fs.closeSync(fd);
    }
  };
  const before = readBlocks();
  return (running) => {
    const after = readBlocks();
    const written = after.filter((block, i) => !block.equals(before[i] as Buffer)).length;
    const preserved = running.preservedChunks?.();
    if (preserved !== written) {
      throw new Error(`the session preserved ${preserved ?? 'an unknown number of'} chunks, but fio changed ${written} blocks of the log, each in its own chunk: some writes were not first writes, or a first write was not preserved`);
    }
    if (written < blocks.length - ioDepth) {
      throw new Error(`fio changed only ${written} of the ${blocks.length} blocks of ${logPath}: the cell did not replay the log`);
    }
  };
}

/**
 * What one side measures: its column's value, or several values by column-name suffix ('' for
 * the side's own column, ' cold' for `<side> cold`...).
 */
type SideValues = number | Record<string, number>;

/** Measure each side in order (reversed when asked) and collect the values by column name. */
async function alternate(reverse: boolean, sides: Array<[string, () => Promise<SideValues>]>): Promise<Record<string, number>> {
  const values: Record<string, number> = {};
  for (const [name, measure] of reverse ? [...sides].reverse() : sides) {
    const measured = await measure();
    if (typeof measured === 'number') values[name] = measured;
    else for (const [suffix, value] of Object.entries(measured)) values[`${name}${suffix}`] = value;
  }
  return values;
}

const ratioOf = (a: string, b: string) => (v: Record<string, number>): number => (v[a] ?? NaN) / (v[b] ?? NaN);
const atLeast = (x: number) => (r: number): boolean => r >= x;

function timedFio(rw: 'read' | 'write', context: RowContext): FioShape {
  return { rw, blockSizeBytes: 1 << 20, ioDepth: 4, sizeBytes: context.imageBytes, runtimeSec: context.runtimeSec };
}

/**
 * A row of bdsnap serve (no session) against nbdkit file, each cell measured by `cell`; the
 * figure compares the sides' own columns, and `extraColumns` (suffixes) are reported beside.
 * `floors` are more servers measured the same way, in columns of their own (no part of the
 * figure): what the least server on the same runtime reaches.
 */
function versusNbdkit(
  id: string, name: string, measures: string, cell: (target: Target, context: RowContext) => Promise<SideValues>, extraColumns: Array<string | [string, Unit]> = [],
  floors: Target[] = [], pair: [Target, Target] = [BDSNAP_SERVE, NBDKIT_FILE],
): BenchRow {
  const sides = [...pair, ...floors];
  const suffixes: Array<[string, Unit]> = [['', 'MB/s'], ...extraColumns.map((c): [string, Unit] => (typeof c === 'string' ? [c, 'MB/s'] : c))];
  return {
    id,
    name,
    measures,
    columns: suffixes.flatMap(([suffix, unit]) => sides.map((side) => ({ name: `${side.name}${suffix}`, unit }))),
    ratioText: 'bdsnap / nbdkit',
    ratio: ratioOf('bdsnap', 'nbdkit'),
    targetText: '>= 1.0x',
    meets: atLeast(1),
    once: (context, reverse) => alternate(reverse, sides.map((side, i) => [side.name, () => cell(side, i === 0 ? context : baselineSide(context))])),
  };
}

/** The same fio job with x509 TLS required on both servers. */
function tlsFioRow(id: string, rw: 'read' | 'write'): BenchRow {
  const verb = rw === 'read' ? 'reads' : 'writes';
  return versusNbdkit(
    id,
    `TLS seq 1 MiB ${verb}, qd 4, vs nbdkit`,
    `fio nbd engine over nbds+unix (x509 TLS required), one connection, sequential 1 MiB ${verb} at depth 4 for the runtime over an image of random data in the page cache, each server its own: bdsnap serve --tls-certificates against nbdkit --tls=require file`,
    (target, context) => fioCell(target, context, timedFio(rw, context), 'MB/s'),
    [], [], [BDSNAP_TLS, NBDKIT_TLS],
  );
}

function fioRow(id: string, rw: 'read' | 'write'): BenchRow {
  const verb = rw === 'read' ? 'reads' : 'writes';
  return versusNbdkit(
    id,
    `plain seq 1 MiB ${verb}, qd 4, vs nbdkit`,
    `fio nbd engine, one connection, sequential 1 MiB ${verb} at depth 4 for the runtime over an image of random data in the page cache, each server its own: bdsnap serve (no session) against nbdkit file`,
    (target, context) => fioCell(target, context, timedFio(rw, context), 'MB/s'),
  );
}

/**
 * `seq-write` as a user runs it by hand (`bash bench/by-hand.sh seq-write`): one pass over the
 * image on a server started for the cell, so the pass includes what a fresh server pays first
 * (V8 compiling the request path while it serves); `seq-write` runs fio for the runtime, most
 * of it on a warm server. Beside it, the same pass into nbd-floor with its writes on the thread
 * pool, the least Node.js server doing what bdsnap serve does for this client.
 */
function onePassRow(id: string): BenchRow {
  return versusNbdkit(
    id,
    'plain seq 1 MiB writes, one pass on a fresh server, qd 4, vs nbdkit',
    'fio nbd engine, one connection, one pass of sequential 1 MiB writes at depth 4 over an image of random data in the page cache (fio number_ios), each server started for its cell: bdsnap serve (no session) against nbdkit file; beside it node-floor-async (nbd-floor on one worker thread, writes on the thread pool), no part of the figure; `CPU per GB`: the CPU time (all threads) each server spent per GB of the pass, from /proc',
    (target, context) => withTarget(target, context, (running) => passWithCpu(running, context)),
    [CPU_COLUMN], [nbdFloor({ async: true })],
  );
}

/** Beside MB/s: the milliseconds of CPU (all its threads) the server spent per GB of the timed pass, steadier than MB/s on a busy machine. */
const CPU_COLUMN: [string, Unit] = [' CPU per GB', 'ms'];

/** One timed pass of onePassSeqWrite: MB/s, and the server's CPU per GB written (CPU_COLUMN). */
async function passWithCpu(running: RunningTarget, context: RowContext): Promise<Record<string, number>> {
  if (running.pid === undefined) throw new Error('the target names no process to read the CPU time of');
  const before = cpuMs(running.pid);
  const mbPerSec = await fioOn(running, onePassSeqWrite(context), 'MB/s');
  return { '': mbPerSec, [CPU_COLUMN[0]]: (cpuMs(running.pid) - before) / (context.imageBytes / 1e9) };
}

let clockTicks: number | undefined;

/** CPU time (user and system, all threads) process `pid` has used, in ms. */
function cpuMs(pid: number): number {
  clockTicks ??= Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout.trim()) || 100;
  // Fields after the command name, which is in parentheses and may hold spaces.
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return ((Number(fields[11]) + Number(fields[12])) * 1000) / clockTicks;
}

/** Longer than V8's memory reducer waits (8 s) before it collects in a quiet process. */
const PAUSE_MS = 10_000;
/** What a server has served before the pause: by then V8 has compiled its request path (about 3 GiB of 1 MiB writes here). */
const WARM_PASSES = 3;

/**
 * A running server's next client after a pause, as a daemon or a long `bdsnap serve` meets
 * every job: WARM_PASSES untimed passes on the fresh server (each its own connection), PAUSE_MS
 * with no client, then the timed pass on a new connection.
 */
function afterPauseRow(id: string): BenchRow {
  return versusNbdkit(
    id,
    'plain seq 1 MiB writes after a pause on a running server, qd 4, vs nbdkit',
    `fio nbd engine, one connection, one pass of sequential 1 MiB writes at depth 4 over an image of random data in the page cache (fio number_ios) on a server that served the same pass ${WARM_PASSES} times (untimed, a connection each) until ${PAUSE_MS / 1000} s before, with no client since: bdsnap serve (no session) against nbdkit file; \`CPU per GB\`: the CPU time (all threads) each server spent per GB of the timed pass, from /proc`,
    (target, context) => withTarget(target, context, async (running) => {
      for (let i = 0; i < WARM_PASSES; i++) await fioOn(running, onePassSeqWrite(context), 'MB/s');
      await delay(PAUSE_MS);
      return passWithCpu(running, context);
    }),
    [CPU_COLUMN],
  );
}

/**
 * nbdcopy with 4 connections, twice on one server: MB/s of each whole copy, process start
 * included on both sides. The first copy on a fresh server is cold (for bdsnap: V8 compiling
 * the request path, the buffer pool's first page faults); the second is what a server that
 * has been running meets, as the daemon's are.
 */
async function nbdcopyCells(target: Target, context: RowContext, direction: 'read' | 'write'): Promise<SideValues> {
  if (direction === 'write') settleFile(context.sourcePath);
  return withTarget(target, context, async (running) => {
    const args = direction === 'read' ? ['-C', '4', running.uri, 'null:'] : ['-C', '4', context.sourcePath, running.uri];
    const copy = async (): Promise<number> => {
      const startedMs = performance.now();
      await run('nbdcopy', args, { timeoutMs: 600_000 });
      return context.imageBytes / 1e6 / ((performance.now() - startedMs) / 1000);
    };
    const cold = await copy();
    return { '': await copy(), ' cold': cold };
  });
}

/** Worker threads of the threaded floor: as many as `bdsnap serve` starts here (one per core, at most 4). */
const NBD_FLOOR_THREADS = Math.min(4, Math.max(2, os.availableParallelism()));

function nbdcopyRow(id: string, direction: 'read' | 'write'): BenchRow {
  return versusNbdkit(
    id,
    `nbdcopy ${direction === 'read' ? 'image -> null:' : 'file -> image'}, 4 connections, vs nbdkit`,
    `${direction === 'read'
      ? 'nbdcopy -C 4 URI null: (the whole image of random data, 4 connections, nbdcopy\'s default requests in flight)'
      : 'nbdcopy -C 4 FILE URI (a file of random data in the page cache copied over the whole image, 4 connections)'}, wall time of the copy: bdsnap serve against nbdkit file. Two copies per server: the figure compares the second (a running server); the first, on a freshly started server, is in the cold columns. node-floor*: the same copies ${direction === 'read' ? 'from' : 'into'} nbd-floor.ts, the least NBD server in Node.js (no checks, synchronous file I/O), from one event loop${direction === 'write' ? ', from two processes' : ''} and from ${NBD_FLOOR_THREADS} worker threads as bdsnap serves (-async: file I/O on the thread pool)`,
    (target, context) => nbdcopyCells(target, context, direction),
    [' cold'],
    [
      nbdFloor(), ...(direction === 'write' ? [nbdFloor({ processes: 2 })] : []),
      nbdFloor({ threads: NBD_FLOOR_THREADS }), nbdFloor({ threads: NBD_FLOOR_THREADS, async: true }),
    ],
  );
}

const RANDOM_FIRST_WRITES = 16_384;

/**
 * A fio iolog (version 2) of `count` 4 KiB writes, each in a different chunk picked at random
 * (fixed seed), at a random 4 KiB block inside it: every write of the pass is the first one in
 * its chunk. fio's own random offsets cannot promise that (its random map works per block, and
 * `blockalign` turns the map off).
 */
export function writeFirstWriteLog(logPath: string, imageBytes: number, chunkBytes: number, count: number): void {
  const chunks = Math.floor(imageBytes / chunkBytes);
  if (count > chunks) throw new Error(`${count} first writes need ${count} chunks; the image has ${chunks}`);
  let state = 0x9e3779b9;
  const next = (n: number): number => {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    return (state >>> 0) % n;
  };
  // Partial Fisher-Yates: the first `count` entries are distinct random chunks.
  const order = new Uint32Array(chunks);
  for (let i = 0; i < chunks; i++) order[i] = i;
  const lines = ['fio version 2 iolog', 'nbd add', 'nbd open'];
  const blocksPerChunk = chunkBytes / 4096;
  for (let i = 0; i < count; i++) {
    const j = i + next(chunks - i);
    const chunk = order[j] as number;
    order[j] = order[i] as number;
    order[i] = chunk;
    lines.push(`nbd write ${chunk * chunkBytes + next(blocksPerChunk) * 4096} 4096`);
  }
  lines.push('nbd close', '');
  fs.writeFileSync(logPath, lines.join('\n'));
}

/**
 * A row of `measured` (a session target) against the plain server: ratio measured / plain,
 * target at least `target`; `extraColumns` are reported beside (no part of the figure).
 */
function versusPlain(
  row: Pick<BenchRow, 'id' | 'name' | 'measures' | 'once' | 'unavailable'>, measured: string, unit: 'MB/s' | 'IOPS', target: number, ratioText = 'session / plain',
  extraColumns: BenchRow['columns'] = [],
): BenchRow {
  return {
    ...row,
    columns: [{ name: measured, unit }, { name: 'bdsnap', unit }, ...extraColumns],
    ratioText,
    ratio: ratioOf(measured, 'bdsnap'),
    targetText: `>= ${target}x`,
    meets: atLeast(target),
  };
}

const COW_FLOOR = nbdFloor({ cow: true });
const PLAIN_FLOOR = nbdFloor();

const FIRST_RANDOM: BenchRow = versusPlain({
  id: 'first-rand-4k',
  name: 'session random 4 KiB first writes, qd 16, vs plain',
  measures: `one pass of ${RANDOM_FIRST_WRITES} random 4 KiB writes at depth 16 over an image of random data (each side its own), each in a different ${BENCH_CHUNK_BYTES / 1024} KiB chunk (replayed fio iolog, so every write is a first write, checked from the session's manifest): a fresh bdsnap serve --snapshot-root session against bdsnap serve without one. ${COW_FLOOR.name} / ${PLAIN_FLOOR.name}: the same pass on nbd-floor.ts from one event loop, keeping each chunk's original before its first write (read, CRC-32, appended to a store file; nothing else) against serving plainly: the ratio a session cannot be expected to pass here (no part of the figure)`,
  once: async (context, reverse) => {
    const logPath = path.join(context.dir, 'first-writes.iolog');
    if (!fs.existsSync(logPath)) writeFirstWriteLog(logPath, context.imageBytes, BENCH_CHUNK_BYTES, RANDOM_FIRST_WRITES);
    const job: FioShape = { rw: 'randwrite', blockSizeBytes: 4096, ioDepth: 16, sizeBytes: context.imageBytes, extraArgs: [`--read_iolog=${logPath}`] };
    const v = await alternate(reverse, [
      ['bdsnap+session', () => fioCell(BDSNAP_SESSION, context, job, 'IOPS', { afterStop: preservedPerLoggedWrite(context.imagePath, logPath, job.ioDepth) })],
      ['bdsnap', () => fioCell(BDSNAP_SERVE, baselineSide(context), job, 'IOPS')],
      [COW_FLOOR.name, () => fioCell(COW_FLOOR, context, job, 'IOPS')],
      [PLAIN_FLOOR.name, () => fioCell(PLAIN_FLOOR, baselineSide(context), job, 'IOPS')],
    ]);
    return { ...v, 'floor cow / plain': (v[COW_FLOOR.name] ?? NaN) / (v[PLAIN_FLOOR.name] ?? NaN) };
  },
}, 'bdsnap+session', 'IOPS', 0.5, undefined, [
  { name: COW_FLOOR.name, unit: 'IOPS' }, { name: PLAIN_FLOOR.name, unit: 'IOPS' }, { name: 'floor cow / plain', unit: 'x' },
]);

/** How many chunks of the session targets the image holds: what one pass over it preserves. */
function chunksOf(context: RowContext): number {
  return Math.ceil(context.imageBytes / BENCH_CHUNK_BYTES);
}

function onePassSeqWrite(context: RowContext): FioShape {
  // One pass: fio stops after the image's worth of 1 MiB requests, so nothing is written twice.
  return { rw: 'write', blockSizeBytes: 1 << 20, ioDepth: 4, sizeBytes: context.imageBytes, extraArgs: [`--number_ios=${context.imageBytes / (1 << 20)}`] };
}

const FIRST_SEQUENTIAL: BenchRow = {
  id: 'first-seq',
  name: 'session seq 1 MiB first writes, qd 4, vs plain and copy-floor',
  measures: 'one pass of sequential 1 MiB writes at depth 4 over an image of random data (each side its own; every chunk preserved once, checked): a fresh session against the plain server, and that ratio against copy-floor\'s (the same pass done by a program that only reads the original, stores it in a file already in the page cache and writes, no server; the best of three passes each). copy-floor new store: MB/s of the same program\'s pass into a new store file, which takes new memory as a session\'s store does; copy cost / new-store floor: the time per MB copying adds to the session (over the plain server) against what it adds to that pass (over the program\'s plain pass), below 1 when the session\'s copies cost less (neither is part of the figure)',
  columns: [
    { name: 'bdsnap+session', unit: 'MB/s' }, { name: 'bdsnap', unit: 'MB/s' }, { name: 'copy-floor', unit: 'x' }, { name: 'copy-floor new store', unit: 'MB/s' },
    { name: 'copy cost / new-store floor', unit: 'x' },
  ],
  ratioText: '(session / plain) / copy-floor',
  ratio: (v) => (v['bdsnap+session'] ?? NaN) / (v.bdsnap ?? NaN) / (v['copy-floor'] ?? NaN),
  targetText: '>= 0.9x',
  meets: atLeast(0.9),
  once: async (context, reverse) => {
    let floorPlain = NaN;
    const v = await alternate(reverse, [
      ['bdsnap+session', () => fioCell(BDSNAP_SESSION, context, onePassSeqWrite(context), 'MB/s', { start: 'settled', afterStop: preservedExactly(chunksOf(context)) })],
      ['bdsnap', () => fioCell(BDSNAP_SERVE, baselineSide(context), onePassSeqWrite(context), 'MB/s', { start: 'settled' })],
      ['copy-floor', async () => {
        // copyFloorRound writes the image back and reads it in before each of its passes.
        const round = await copyFloorRound(context.imagePath, path.join(context.dir, 'copy-floor.store'));
        floorPlain = round.plain;
        return { '': round.ratio, ' new store': round.newStore };
      }],
    ]);
    // Time per MB that copying adds, the session's over the plain server's against the floor
    // program's into a new store over its plain pass: below 1, the session's copies cost less.
    const sessionCost = 1 / (v['bdsnap+session'] ?? NaN) - 1 / (v.bdsnap ?? NaN);
    const floorCost = 1 / (v['copy-floor new store'] ?? NaN) - 1 / floorPlain;
    return { ...v, 'copy cost / new-store floor': sessionCost / floorCost };
  },
};

const FIRST_SEQUENTIAL_XFS: BenchRow = versusPlain({
  id: 'first-seq-xfs',
  name: 'session seq 1 MiB first writes on XFS (reflink), qd 4, vs plain',
  measures: 'one pass of sequential 1 MiB writes at depth 4 over an image of random data on an XFS (reflink=1) made in a loop-mounted file, per repetition: a fresh session whose store is on the same XFS (originals kept by cloning) against the plain server of a second such image',
  unavailable: () => {
    const missing = missingNeeds(scratchFsNeeds('xfs'));
    return missing.length > 0 ? `needs ${missing.join(', ')} to make an XFS in a loop-mounted file` : undefined;
  },
  once: async (context, reverse) => {
    const cleanup = new CleanupStack();
    try {
      const mnt = await mountScratchFs(cleanup, context.dir, 'xfs', 4 * context.imageBytes + MIN_SCRATCH_FS_BYTES);
      const onXfs: RowContext = { ...context, imagePath: path.join(mnt, 'bench.img'), baselineImagePath: path.join(mnt, 'baseline.img') };
      for (const image of [onXfs.imagePath, onXfs.baselineImagePath]) {
        makeUserImage(image, context.imageBytes);
        cleanup.after(() => fs.rmSync(image, { force: true }));
      }
      return await alternate(reverse, [
        ['bdsnap+session', () => fioCell(BDSNAP_SESSION, onXfs, onePassSeqWrite(onXfs), 'MB/s', { snapshotParent: mnt, afterStop: preservedExactly(chunksOf(onXfs)) })],
        ['bdsnap', () => fioCell(BDSNAP_SERVE, baselineSide(onXfs), onePassSeqWrite(onXfs), 'MB/s')],
      ]);
    } finally {
      await cleanup.run();
    }
  },
}, 'bdsnap+session', 'MB/s', 0.7);

const REWRITES: BenchRow = versusPlain({
  id: 'rewrite',
  name: 'session rewrites seq 1 MiB, qd 4, vs plain',
  measures: 'sequential 1 MiB writes at depth 4 for the runtime into a session whose every chunk is already preserved (a first pass ended by a FLUSH), against the plain server',
  once: (context, reverse) => alternate(reverse, [
    ['bdsnap+rewrite', () => fioCell(BDSNAP_REWRITE, context, timedFio('write', context), 'MB/s')],
    ['bdsnap', () => fioCell(BDSNAP_SERVE, baselineSide(context), timedFio('write', context), 'MB/s')],
  ]),
}, 'bdsnap+rewrite', 'MB/s', 0.9, 'rewrite / plain');

const STATUS_RUNS = 10;

/** Median wall time of `runs` whole-process runs of each command, alternating the two. */
function wallTimesMs(commands: Array<[string, string[]]>, runs: number, env: NodeJS.ProcessEnv): number[] {
  const times: number[][] = commands.map(() => []);
  for (let i = 0; i < runs; i++) {
    for (const [k, [cmd, args]] of commands.entries()) {
      const startedMs = performance.now();
      const result = spawnSync(cmd, args, { env, stdio: ['ignore', 'ignore', 'pipe'] });
      const elapsedMs = performance.now() - startedMs;
      if (result.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${result.stderr.toString()}`);
      times[k]?.push(elapsedMs);
    }
  }
  return times.map((t) => [...t].sort((a, b) => a - b)[Math.floor(t.length / 2)] ?? NaN);
}

const STATUS: BenchRow = {
  id: 'status',
  name: 'bdsnap status wall time vs node -e 0',
  measures: `whole-process wall time, median of ${STATUS_RUNS} runs alternating the two commands: bdsnap status against a running daemon, and node -e 0`,
  columns: [{ name: 'bdsnap status', unit: 'ms' }, { name: 'node -e 0', unit: 'ms' }],
  ratioText: 'status / node',
  ratio: ratioOf('bdsnap status', 'node -e 0'),
  targetText: '<= 1.5x',
  meets: (r) => r <= 1.5,
  once: async (_context, reverse) => {
    const daemon = await startDaemon(undefined);
    try {
      const env = { ...process.env, BDSNAP_RUN_DIR: daemon.runDir };
      const sides: Array<[string, string, string[]]> = [
        ['bdsnap status', process.execPath, [BDSNAP_MAIN, 'status']],
        ['node -e 0', process.execPath, ['-e', '0']],
      ];
      const ordered = reverse ? [...sides].reverse() : sides;
      const medians = wallTimesMs(ordered.map(([, cmd, args]) => [cmd, args]), STATUS_RUNS, env);
      const values: Record<string, number> = {};
      ordered.forEach(([name], k) => (values[name] = medians[k] ?? NaN));
      return values;
    } finally {
      await daemon.server.stop();
    }
  },
};

const RESTORE: BenchRow = {
  id: 'restore',
  name: 'restore of the image vs dd with fdatasync',
  measures: 'restore() of a session that preserved the whole image (every record checksum and end digest checked, final fdatasync) against dd bs=1M conv=notrunc,fdatasync of the same bytes; the image is filled again afterwards. ceiling: dd / (check floor + dd), the check floor being two threads that only read and CRC the store and the image at once (restore-floor.ts): the most restore / dd can be when every check comes before the first write',
  columns: [{ name: 'restore', unit: 'MB/s' }, { name: 'dd', unit: 'MB/s' }, { name: 'ceiling', unit: 'x' }],
  ratioText: 'restore / dd',
  ratio: ratioOf('restore', 'dd'),
  targetText: '>= 0.8x',
  meets: atLeast(0.8),
  once: async (context) => {
    settleFile(context.imagePath);
    try {
      const result = await measureRestore(context.imagePath, 1);
      return { restore: result.restoreMBps, dd: result.plainWriteMBps, ceiling: result.ceiling };
    } finally {
      // dd wrote zeroes: fill the image again so that no later row reads zero blocks.
      makeUserImage(context.imagePath, context.imageBytes);
    }
  },
};

/**
 * fio on ext4 in a mounted 2 GiB image, one 512 MiB file, for 5 s: bdsnap mount of an active
 * device against nbdkit attached by hand; nbdkit attached by bdsnap's own code, and a plain
 * loop device, are reported beside (the server alone, and the floor of every route).
 */
function mountRow(id: string, name: string, job: MountJob, target: number, withFlushFloor = false): BenchRow {
  const fio = `fio --size=512M --runtime=5 --time_based --rw=${job.rw} --bs=${job.blockSizeBytes >= 1 << 20 ? `${job.blockSizeBytes >> 20}M` : `${job.blockSizeBytes >> 10}k`}${job.ioDepth > 1 ? ` --iodepth=${job.ioDepth}` : ''} ${job.fioArgs.join(' ')}`;
  const unit = job.measure === 'write MB/s' ? 'MB/s' as const : 'IOPS' as const;
  return {
    id,
    name,
    measures: `${fio} in a fresh ext4 (mkfs before each cell) on a 2 GiB image filled with data: ${MOUNT_ROUTES.map((r) => `${r.name}: ${r.description}`).join('; ')}${withFlushFloor
      ? '. flush floor: bench/flush-floor.ts, the same cycle\'s disk work done by one program on an image file (plain, and copy-before-write: originals into a store, fdatasync of the store on each flush), no server and no route: an upper bound for any route (plain) and for a session (copy-before-write)'
      : ''}`,
    columns: [
      ...MOUNT_ROUTES.map((r) => ({ name: r.name, unit })), { name: 'bdsnap / loop', unit: 'x' as const },
      ...(withFlushFloor ? [{ name: 'flush floor plain', unit }, { name: 'flush floor copy-before-write', unit }] : []),
    ],
    ratioText: 'bdsnap / nbdkit',
    ratio: ratioOf('bdsnap', 'nbdkit'),
    targetText: `>= ${target}x`,
    meets: atLeast(target),
    unavailable: mountUnavailable,
    once: async (context, reverse) => {
      const sides: Array<[string, () => Promise<SideValues>]> = MOUNT_ROUTES.map((route) => [route.name, () => mountCell(route, context.dir, job)]);
      if (withFlushFloor) {
        sides.push(['flush floor', async () => {
          const round = flushFloorRound(context.dir, MOUNT_RUNTIME_SEC, reverse);
          return { ' plain': round.plain, ' copy-before-write': round.copying };
        }]);
      }
      const v = await alternate(reverse, sides);
      return { ...v, 'bdsnap / loop': (v.bdsnap ?? NaN) / (v.loop ?? NaN) };
    },
  };
}

const LIBAIO_DIRECT = ['--direct=1', '--ioengine=libaio'];
const RANDOM_READS: MountJob = { rw: 'randread', blockSizeBytes: 4096, ioDepth: 16, fioArgs: LIBAIO_DIRECT, measure: 'read IOPS' };

/**
 * What mount-rr4k can reach at most with the loop device over the FUSE file in direct I/O (as
 * bdsnap mount attaches it, for the writes): every 4 KiB read then travels loop -> FUSE ->
 * nbdfuse -> NBD -> server, where the nbdkit route's buffered loop device answers the reads of
 * the file fio has just laid out from the FUSE file's page cache. nbdkit attached by bdsnap's
 * code against nbdkit attached by hand is that ceiling for any server; bdsnap against the
 * former is what is left to the server on this route.
 */
const MOUNT_RR4K_FLOOR: BenchRow = {
  id: 'mount-rr4k-floor',
  name: 'mounted ext4, random 4 KiB direct reads, qd 16, vs the most the route allows',
  measures: `the mount-rr4k cell (fio on ext4 in a fresh 2 GiB image) for three routes, alternating: ${[BDSNAP_MOUNT, NBDKIT_BDSNAP_ATTACH, NBDKIT_BY_HAND].map((r) => `${r.name}: ${r.description}`).join('; ')}. route ceiling: ${NBDKIT_BDSNAP_ATTACH.name} / ${NBDKIT_BY_HAND.name}, the most mount-rr4k can be with the loop device in direct I/O`,
  columns: [
    { name: BDSNAP_MOUNT.name, unit: 'IOPS' }, { name: NBDKIT_BDSNAP_ATTACH.name, unit: 'IOPS' }, { name: NBDKIT_BY_HAND.name, unit: 'IOPS' },
    { name: 'route ceiling', unit: 'x' },
  ],
  ratioText: `${BDSNAP_MOUNT.name} / ${NBDKIT_BDSNAP_ATTACH.name}`,
  ratio: ratioOf(BDSNAP_MOUNT.name, NBDKIT_BDSNAP_ATTACH.name),
  targetText: '>= 1.0x',
  meets: atLeast(1),
  unavailable: mountUnavailable,
  once: async (context, reverse) => {
    const routes = [BDSNAP_MOUNT, NBDKIT_BDSNAP_ATTACH, NBDKIT_BY_HAND];
    const v = await alternate(reverse, routes.map((route) => [route.name, () => mountCell(route, context.dir, RANDOM_READS)]));
    return { ...v, 'route ceiling': (v[NBDKIT_BDSNAP_ATTACH.name] ?? NaN) / (v[NBDKIT_BY_HAND.name] ?? NaN) };
  },
};

/** Every row, in table order. */
export const ROWS: BenchRow[] = [
  fioRow('seq-read', 'read'),
  fioRow('seq-write', 'write'),
  onePassRow('seq-write-pass'),
  afterPauseRow('seq-write-after-pause'),
  tlsFioRow('tls-seq-read', 'read'),
  tlsFioRow('tls-seq-write', 'write'),
  nbdcopyRow('nbdcopy-read', 'read'),
  nbdcopyRow('nbdcopy-write', 'write'),
  FIRST_RANDOM,
  FIRST_SEQUENTIAL,
  FIRST_SEQUENTIAL_XFS,
  REWRITES,
  STATUS,
  RESTORE,
  mountRow('mount-seq', 'mounted ext4, seq 1 MiB direct writes, qd 4, vs nbdkit route', { rw: 'write', blockSizeBytes: 1 << 20, ioDepth: 4, fioArgs: LIBAIO_DIRECT, measure: 'write MB/s' }, 1.0),
  mountRow('mount-rw4k', 'mounted ext4, random 4 KiB direct writes, qd 16, vs nbdkit route', { rw: 'randwrite', blockSizeBytes: 4096, ioDepth: 16, fioArgs: LIBAIO_DIRECT, measure: 'write IOPS' }, 1.2),
  mountRow('mount-rr4k', 'mounted ext4, random 4 KiB direct reads, qd 16, vs nbdkit route', RANDOM_READS, 1.0),
  MOUNT_RR4K_FLOOR,
  mountRow('mount-fsync', 'mounted ext4, seq 1 MiB writes with fsync every 8, vs nbdkit route', { rw: 'write', blockSizeBytes: 1 << 20, ioDepth: 1, fioArgs: ['--fsync=8'], measure: 'write MB/s' }, 1.2, true),
];
