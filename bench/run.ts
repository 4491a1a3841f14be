/**
 * `npm run bench`: bdsnap serve against nbdkit's file plugin on the same 1 GiB image in the
 * page cache, with fio's nbd engine. Targets run one at a time, each on its own socket, and
 * their order alternates from one workload to the next so that drift (page cache, CPU
 * frequency, neighbours) hits both sides alike.
 *
 *   node dist/bench/run.js [--quick] [--runtime SEC] [--json FILE] [--size-mib N]
 *                          [--only WORKLOAD-SUBSTRING] [--targets a,b] [--no-restore]
 *
 * BDSNAP_BENCH_RUNTIME_SEC sets the default time per measurement (10 s; --quick: 3 s).
 */

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { makeImage } from '../test/helpers/files.js';
import { runFio } from '../test/helpers/fio.js';
import { describeMachine, formatTable, type Report, type Row } from './report.js';
import { RATIOS, TARGETS, type Target } from './targets.js';
import { WORKLOADS, score, type Workload } from './workloads.js';
import { measureRestore, type RestoreResult } from './restore.js';

const DEFAULT_RUNTIME_SEC = 10;
const QUICK_RUNTIME_SEC = 3;
const DEFAULT_IMAGE_MIB = 1024;

interface Options {
  runtimeSec: number;
  imageBytes: number;
  jsonPath: string | undefined;
  only: string | undefined;
  targets: Target[];
  restore: boolean;
}

function positiveNumber(text: string, what: string): number {
  const value = Number(text);
  if (!Number.isFinite(value) || value <= 0) throw new Error(`${what} must be a positive number, got '${text}'`);
  return value;
}

function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      quick: { type: 'boolean', default: false },
      runtime: { type: 'string' },
      json: { type: 'string' },
      'size-mib': { type: 'string' },
      only: { type: 'string' },
      targets: { type: 'string' },
      'no-restore': { type: 'boolean', default: false },
      help: { type: 'boolean', default: false },
    },
    strict: true,
  });
  if (values.help) {
    process.stdout.write('usage: node dist/bench/run.js [--quick] [--runtime SEC] [--json FILE] [--size-mib N] [--only TEXT] [--targets a,b]\n');
    process.exit(0);
  }
  const envRuntime = process.env.BDSNAP_BENCH_RUNTIME_SEC;
  const runtimeSec = values.runtime !== undefined
    ? positiveNumber(values.runtime, '--runtime')
    : values.quick
      ? QUICK_RUNTIME_SEC
      : envRuntime !== undefined
        ? positiveNumber(envRuntime, 'BDSNAP_BENCH_RUNTIME_SEC')
        : DEFAULT_RUNTIME_SEC;
  const imageMiB = values['size-mib'] !== undefined ? positiveNumber(values['size-mib'], '--size-mib') : DEFAULT_IMAGE_MIB;
  let targets = TARGETS;
  if (values.targets !== undefined) {
    const wanted = values.targets.split(',').map((s) => s.trim());
    const unknown = wanted.filter((w) => !TARGETS.some((t) => t.name === w));
    if (unknown.length > 0) throw new Error(`unknown target(s) ${unknown.join(', ')}; known: ${TARGETS.map((t) => t.name).join(', ')}`);
    targets = TARGETS.filter((t) => wanted.includes(t.name));
  }
  return { runtimeSec, imageBytes: Math.round(imageMiB) * 2 ** 20, jsonPath: values.json, only: values.only, targets, restore: !values['no-restore'] };
}

async function main(): Promise<void> {
  const options = parseOptions(process.argv.slice(2));
  const loadAtStart = Math.round((os.loadavg()[0] ?? 0) * 100) / 100;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-bench-'));
  const cleanupDir = (): void => fs.rmSync(dir, { recursive: true, force: true });
  process.once('SIGINT', () => {
    cleanupDir();
    process.exit(130);
  });
  try {
    const imagePath = path.join(dir, 'bench.img');
    process.stderr.write(`bench: writing a ${options.imageBytes / 2 ** 20} MiB image (stays in the page cache)\n`);
    // Real data everywhere (no holes), so reads cost what they cost on a used disk.
    makeImage(imagePath, options.imageBytes, 'blocks');

    if (options.targets.length === 0) throw new Error('no target selected');
    const selected = new Set(options.targets.map((t) => t.name));
    const ratios = RATIOS.filter(([a, b]) => selected.has(a) && selected.has(b));
    const workloads = WORKLOADS.filter((w) => options.only === undefined || w.name.includes(options.only));
    if (workloads.length === 0) throw new Error(`no workload matches '${options.only}'`);

    const rows: Row[] = [];
    for (const [index, workload] of workloads.entries()) {
      const rowTargets = options.targets.filter((t) => workload.targets === undefined || workload.targets.includes(t.name));
      const order = index % 2 === 0 ? rowTargets : [...rowTargets].reverse();
      const values: Record<string, number> = {};
      const errors: Record<string, string> = {};
      for (const target of order) {
        process.stderr.write(`bench: ${workload.name} on ${target.name} (${options.runtimeSec} s)... `);
        try {
          values[target.name] = await measure(target, imagePath, workload, options);
          process.stderr.write(`${values[target.name]?.toFixed(0)} ${workload.unit}\n`);
        } catch (err) {
          // One broken cell must not cost the other measurements; it shows as "failed".
          errors[target.name] = err instanceof Error ? err.message : String(err);
          process.stderr.write(`FAILED: ${errors[target.name]}\n`);
        }
      }
      const rowRatios: Record<string, number> = {};
      for (const [a, b] of ratios) {
        const va = values[a];
        const vb = values[b];
        if (va !== undefined && vb !== undefined && vb > 0) rowRatios[`${a} / ${b}`] = va / vb;
      }
      rows.push({ workload: workload.name, unit: workload.unit, values, ratios: rowRatios, errors });
    }

    let restoreResult: RestoreResult | undefined;
    if (options.restore) {
      process.stderr.write('bench: restore of a session that preserved the whole image vs dd of the same bytes (3 rounds)... ');
      restoreResult = await measureRestore(imagePath, 3);
      process.stderr.write(`${restoreResult.ratio.toFixed(2)}x\n`);
    }

    const report: Report & { restore?: RestoreResult } = {
      date: new Date().toISOString(),
      machine: describeMachine(),
      runtimeSec: options.runtimeSec,
      imageBytes: options.imageBytes,
      targets: await Promise.all(options.targets.map(async (t) => ({ name: t.name, description: t.description, version: await t.version() }))),
      ratios: ratios.map(([a, b]) => `${a} / ${b}`),
      rows,
      ...(restoreResult ? { restore: restoreResult } : {}),
    };
    const m = report.machine;
    process.stdout.write(`${m.cpus} CPUs (${m.cpuModel}), ${m.memoryGiB} GiB RAM, ${m.kernel}, node ${m.node}, ${m.fio}, load average at start ${loadAtStart}, at end ${m.loadAverage1m}\n`);
    process.stdout.write(`fio nbd engine, unix socket, ${options.imageBytes / 2 ** 20} MiB image in page cache, ${options.runtimeSec} s per cell\n\n`);
    process.stdout.write(`${formatTable(report)}\n`);
    if (restoreResult) {
      const r = restoreResult;
      process.stdout.write(`\nrestore of ${r.bytes / 2 ** 20} MiB (every chunk preserved; checks and final sync included), median of ${r.rounds}:\n`);
      process.stdout.write(`| restore | plain sequential write (dd, fdatasync) | restore / plain write |\n|---:|---:|---:|\n`);
      process.stdout.write(`| ${r.restoreMBps.toFixed(0)} MB/s | ${r.plainWriteMBps.toFixed(0)} MB/s | ${r.ratio.toFixed(2)}x |\n`);
    }
    if (options.jsonPath !== undefined) {
      fs.writeFileSync(options.jsonPath, `${JSON.stringify(report, null, 2)}\n`);
      process.stderr.write(`bench: wrote ${options.jsonPath}\n`);
    }
    if (rows.some((r) => Object.keys(r.errors).length > 0)) process.exitCode = 1;
  } finally {
    cleanupDir();
  }
}

/**
 * Requests in one pass over the image. fio otherwise moves `size` bytes of data, so a job that
 * skips bytes after each write (`write:N`) would wrap around and rewrite what it wrote.
 */
function onePassIos(workload: Workload, imageBytes: number): number {
  const skip = Number(/^write:(\d+)$/.exec(workload.rw)?.[1] ?? 0);
  return Math.floor(imageBytes / (workload.blockSizeBytes + skip));
}

/**
 * Start each cell from the same state: the image's dirty pages written back (so that the
 * write-back of the previous cell's writes does not run during this one), and the whole image
 * read, so that it is in the page cache. Some machines page out file pages that have been idle
 * for a minute or so (DAMON-based reclaim runs here), which would make the first-write rows
 * measure the disk reading the originals.
 */
function settleImage(imagePath: string): void {
  const fd = fs.openSync(imagePath, 'r');
  try {
    fs.fdatasyncSync(fd);
    const buf = Buffer.allocUnsafe(8 * 1024 * 1024);
    for (let pos = 0; ; pos += buf.length) if (fs.readSync(fd, buf, 0, buf.length, pos) === 0) break;
  } finally {
    fs.closeSync(fd);
  }
}

async function measure(target: Target, imagePath: string, workload: Workload, options: Options): Promise<number> {
  settleImage(imagePath);
  const running = await target.start({ imagePath });
  let value: number;
  try {
    const result = await runFio({
      uri: running.uri,
      rw: workload.rw,
      blockSizeBytes: workload.blockSizeBytes,
      ioDepth: workload.ioDepth,
      sizeBytes: options.imageBytes,
      ...(workload.onePass
        ? { extraArgs: [`--runtime=${options.runtimeSec}`, `--number_ios=${onePassIos(workload, options.imageBytes)}`] }
        : { runtimeSec: options.runtimeSec }),
    });
    if (result.error !== 0) throw new Error(`fio error ${result.error}:\n${result.stderr}`);
    value = score(workload, result);
  } finally {
    await running.stop();
  }
  return value;
}

main().catch((err: unknown) => {
  process.stderr.write(`bench: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exitCode = 1;
});
