/**
 * CPU cost of random 4 KiB first writes through the copy-before-write engine, in process (no
 * NBD, no fio): what a first write costs the daemon, as CPU time per write (process.cpuUsage,
 * user + system, every thread) and the main thread's own time on a CPU (the event loop's), which
 * a loaded machine disturbs less than wall time. The device stack is opened as the daemon opens an active device: FileDevice ->
 * SnapshotLayer -> CowDevice (variant `session`), and with one snapshot's point added under
 * the barrier (variant `snapshot`: every first write hands its original to both points).
 *
 * Each run makes a fresh session (and storage) over the same image and issues `--writes`
 * 4 KiB writes at depth 16, each in a chunk not written before, in random order. `--src` may
 * name several built trees (a `dist/src` each, e.g. an older commit's build, with the same
 * module names): their runs alternate within the process, so each sees the same machine. One more run per tree, after
 * the timed ones, counts the promises made per write (async_hooks; not timed).
 *
 * Run: node dist/bench/first-write-cpu.js [--src DIR[,DIR...]] [--variant session|snapshot] [--runs N] [--writes N]
 */

import { createHook } from 'node:async_hooks';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath, pathToFileURL } from 'node:url';
import type { BlockDevice } from '../src/device/block-device.js';
import { DEFAULT_CHUNK_SIZE } from '../src/snapshot/format.js';
import { benchOptions } from './options.js';
import { median } from './workloads.js';

const USAGE = 'node dist/bench/first-write-cpu.js [--src DIR[,DIR...]] [--variant session|snapshot] [--runs N] [--writes N] [--durability process|strict]';
const DEPTH = 16;
const WRITE_BYTES = 4096;

/** The parts of a tree's engine the driver uses; the same names at every commit it was run on. */
interface Engine {
  label: string;
  FileDevice: { open(path: string): Promise<BlockDevice> };
  SnapshotLayer: new (base: BlockDevice, options: { chunkSize: number }) => BlockDevice & {
    hold(): Promise<void>;
    release(): void;
    addPoint(storage: unknown, deviceKey: number): unknown;
    removePoint(image: unknown): Promise<void>;
  };
  CowDevice: { create(base: BlockDevice, options: Record<string, unknown>): BlockDevice };
  DiffStorage: { create(options: Record<string, unknown>): Promise<{ close(): Promise<void> }> };
}

async function loadEngine(srcDir: string): Promise<Engine> {
  const at = (file: string): Promise<Record<string, unknown>> => import(pathToFileURL(path.resolve(srcDir, file)).href) as Promise<Record<string, unknown>>;
  const [file, layer, cow, diff] = await Promise.all([at('device/file-device.js'), at('snapshot/snapshot-layer.js'), at('snapshot/cow-device.js'), at('snapshot/diff-storage.js')]);
  return {
    label: srcDir,
    FileDevice: file.FileDevice as Engine['FileDevice'],
    SnapshotLayer: layer.SnapshotLayer as Engine['SnapshotLayer'],
    CowDevice: cow.CowDevice as Engine['CowDevice'],
    DiffStorage: diff.DiffStorage as Engine['DiffStorage'],
  };
}

interface RunResult {
  cpuUsPerWrite: number;
  userUsPerWrite: number;
  /** The main thread's own time on a CPU (the event loop's), without GC helpers and the thread pool. */
  loopUsPerWrite: number;
  wallUsPerWrite: number;
  promisesPerWrite?: number;
}

/** One chunk per write, a random 4 KiB block inside it, in random order. */
function firstWriteOffsets(count: number, chunkBytes: number): number[] {
  const order = Array.from({ length: count }, (_, i) => i);
  for (let i = order.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [order[i], order[j]] = [order[j]!, order[i]!];
  }
  return order.map((c) => c * chunkBytes + Math.floor(Math.random() * (chunkBytes / WRITE_BYTES)) * WRITE_BYTES);
}

async function oneRun(engine: Engine, options: { image: string; dir: string; variant: string; writes: number; durability: string; countPromises: boolean }): Promise<RunResult> {
  const runDir = fs.mkdtempSync(path.join(options.dir, 'run-'));
  const file = await engine.FileDevice.open(options.image);
  const layer = new engine.SnapshotLayer(file, { chunkSize: DEFAULT_CHUNK_SIZE });
  let storage: { close(): Promise<void> } | undefined;
  let image: unknown;
  if (options.variant === 'snapshot') {
    fs.mkdirSync(path.join(runDir, 'diff'), { mode: 0o700 });
    storage = await engine.DiffStorage.create({ id: 'bench', dirs: [path.join(runDir, 'diff')], chunkSize: DEFAULT_CHUNK_SIZE, durability: options.durability });
    await layer.hold();
    try {
      image = layer.addPoint(storage, 0);
    } finally {
      layer.release();
    }
  }
  const cow = engine.CowDevice.create(layer, { devicePath: options.image, snapshotRoot: path.join(runDir, 'sessions'), durability: options.durability });
  // The session starts (directory, manifest) on its first write: not part of what is measured.
  await cow.write(randomBytes(WRITE_BYTES), (options.writes + 1) * DEFAULT_CHUNK_SIZE);
  const offsets = firstWriteOffsets(options.writes, DEFAULT_CHUNK_SIZE);
  const data = randomBytes(WRITE_BYTES);
  let promises = 0;
  const hook = options.countPromises ? createHook({ init: (_id, type) => { if (type === 'PROMISE') promises++; } }) : undefined;
  hook?.enable();
  const cpu = process.cpuUsage();
  const loop0 = threadRunNs();
  const t0 = performance.now();
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < offsets.length) await cow.write(data, offsets[next++]!);
  };
  await Promise.all(Array.from({ length: DEPTH }, worker));
  const wallMs = performance.now() - t0;
  const used = process.cpuUsage(cpu);
  const loopNs = threadRunNs() - loop0;
  hook?.disable();
  await cow.close();
  if (storage) {
    await layer.removePoint(image);
    await storage.close();
  }
  await layer.close();
  await file.close();
  fs.rmSync(runDir, { recursive: true, force: true });
  const result: RunResult = { cpuUsPerWrite: (used.user + used.system) / options.writes, userUsPerWrite: used.user / options.writes, loopUsPerWrite: loopNs / 1000 / options.writes, wallUsPerWrite: (wallMs * 1000) / options.writes };
  if (options.countPromises) result.promisesPerWrite = promises / options.writes;
  return result;
}

/** Nanoseconds the calling thread has run on a CPU (Linux schedstat), NaN where unknown. */
function threadRunNs(): number {
  try {
    return Number(fs.readFileSync('/proc/thread-self/schedstat', 'utf8').split(' ')[0]);
  } catch {
    return NaN;
  }
}

function spread(values: number[]): string {
  return `${median(values).toFixed(1)} (${Math.min(...values).toFixed(1)}-${Math.max(...values).toFixed(1)})`;
}

async function main(): Promise<void> {
  const values = benchOptions(USAGE, {
    src: { type: 'string' },
    variant: { type: 'string' },
    runs: { type: 'string' },
    writes: { type: 'string' },
    durability: { type: 'string' },
  });
  const here = path.dirname(fileURLToPath(import.meta.url));
  const srcDirs = (values.src ?? path.join(here, '..', 'src')).split(',');
  const variant = values.variant ?? 'session';
  const durability = values.durability ?? 'process';
  const runs = Number(values.runs ?? 5);
  const writes = Number(values.writes ?? 8192);
  if (!['session', 'snapshot'].includes(variant) || !['process', 'strict'].includes(durability) || !(runs >= 1) || !(writes >= 1)) {
    process.stderr.write(`usage: ${USAGE}\n`);
    process.exit(2);
  }
  const engines = await Promise.all(srcDirs.map(loadEngine));
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-fwcpu-'));
  try {
    const image = path.join(dir, 'disk.img');
    fs.writeFileSync(image, randomBytes((writes + 2) * DEFAULT_CHUNK_SIZE));
    const results = engines.map(() => [] as RunResult[]);
    // Alternate the trees run by run (starting with a different one each round), after two
    // untimed warm-up runs each.
    for (let w = 0; w < 2; w++) for (const e of engines) await oneRun(e, { image, dir, variant, writes, durability, countPromises: false });
    for (let round = 0; round < runs; round++) {
      for (let k = 0; k < engines.length; k++) {
        const i = (k + round) % engines.length;
        results[i]!.push(await oneRun(engines[i]!, { image, dir, variant, writes, durability, countPromises: false }));
      }
    }
    const counted: RunResult[] = [];
    for (const e of engines) counted.push(await oneRun(e, { image, dir, variant, writes, durability, countPromises: true }));
    process.stdout.write(`variant ${variant}, durability ${durability}, ${writes} first writes of 4 KiB at depth ${DEPTH}, ${runs} runs; load ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}\n`);
    const cpuMedians = results.map((r) => median(r.map((x) => x.cpuUsPerWrite)));
    const loopMedians = results.map((r) => median(r.map((x) => x.loopUsPerWrite)));
    engines.forEach((e, i) => {
      const r = results[i]!;
      process.stdout.write(`${e.label}\n  cpu us/write ${spread(r.map((x) => x.cpuUsPerWrite))}  user ${spread(r.map((x) => x.userUsPerWrite))}  main thread ${spread(r.map((x) => x.loopUsPerWrite))}  wall us/write ${spread(r.map((x) => x.wallUsPerWrite))}`
        + `  promises/write ${counted[i]!.promisesPerWrite!.toFixed(1)}  cpu vs first ${(cpuMedians[i]! / cpuMedians[0]!).toFixed(3)}, main thread ${(loopMedians[i]! / loopMedians[0]!).toFixed(3)}\n`
        + `  cpu runs ${r.map((x) => x.cpuUsPerWrite.toFixed(1)).join(' ')}; main thread runs ${r.map((x) => x.loopUsPerWrite.toFixed(1)).join(' ')}\n`);
    });
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

await main();
