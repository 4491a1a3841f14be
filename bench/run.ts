/**
 * `npm run bench`: the rows of bench/rows.ts, each comparing bdsnap with its baseline on
 * this machine in the same run (nbdkit's file plugin, the plain server, copy-floor, dd,
 * `node -e 0`), with the target of each row. Servers run one at a time, each on its own
 * socket; within a row the sides alternate which goes first from one repetition to the next,
 * so that drift (page cache, CPU frequency, neighbours) hits both alike.
 *
 *   node dist/bench/run.js [--repeat N] [--rows id,id] [--quick] [--runtime SEC]
 *                          [--size-mib N] [--json FILE] [--list]
 *
 * BDSNAP_BENCH_RUNTIME_SEC sets the default time of the timed rows (10 s; --quick: 3 s);
 * BDSNAP_BENCH_CELL_START=settled starts each cell as the bench did before it was checked
 * against fio run by hand (bench/by-hand.sh; see CellStart in rows.ts).
 */

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { makeImage } from './helpers.js';
import { describeMachine, formatTable, spread, type Report, type RowResult } from './report.js';
import { ROWS, makeUserImage, type BenchRow, type RowContext } from './rows.js';

const DEFAULT_RUNTIME_SEC = 10;
const QUICK_RUNTIME_SEC = 3;
const DEFAULT_IMAGE_MIB = 1024;

interface Options {
  runtimeSec: number;
  imageBytes: number;
  repeat: number;
  jsonPath: string | undefined;
  rows: BenchRow[];
}

function positiveNumber(text: string, what: string): number {
  const value = Number(text);
  if (!Number.isFinite(value) || value <= 0) throw new Error(`${what} must be a positive number, got '${text}'`);
  return value;
}

const USAGE = 'usage: node dist/bench/run.js [--repeat N] [--rows id,id] [--quick] [--runtime SEC] [--size-mib N] [--json FILE] [--list]\n';

function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      quick: { type: 'boolean', default: false },
      runtime: { type: 'string' },
      json: { type: 'string' },
      'size-mib': { type: 'string' },
      repeat: { type: 'string' },
      rows: { type: 'string' },
      list: { type: 'boolean', default: false },
      help: { type: 'boolean', default: false },
    },
    strict: true,
  });
  if (values.help) {
    process.stdout.write(USAGE);
    process.exit(0);
  }
  if (values.list) {
    for (const row of ROWS) process.stdout.write(`${row.id.padEnd(14)} ${row.name} (target ${row.targetText})\n    ${row.measures}\n`);
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
  const repeat = values.repeat !== undefined ? Math.round(positiveNumber(values.repeat, '--repeat')) : 1;
  let rows = ROWS;
  if (values.rows !== undefined) {
    const wanted = values.rows.split(',').map((s) => s.trim()).filter((s) => s.length > 0);
    const unknown = wanted.filter((w) => !ROWS.some((r) => r.id === w));
    if (unknown.length > 0) throw new Error(`unknown row(s) ${unknown.join(', ')}; known: ${ROWS.map((r) => r.id).join(', ')}`);
    rows = ROWS.filter((r) => wanted.includes(r.id));
  }
  return { runtimeSec, imageBytes: Math.round(imageMiB) * 2 ** 20, repeat, jsonPath: values.json, rows };
}

async function measureRow(row: BenchRow, context: RowContext, repeat: number): Promise<RowResult> {
  const columns = row.columns.map((c) => ({ ...c, values: [] as number[] }));
  const skipped = row.unavailable?.();
  if (skipped !== undefined) {
    process.stderr.write(`bench: ${row.id} skipped: ${skipped}\n`);
    return { id: row.id, name: row.name, measures: row.measures, columns, ratioText: row.ratioText, ratios: [], targetText: row.targetText, met: false, errors: [], skipped };
  }
  const ratios: number[] = [];
  const errors: string[] = [];
  for (let i = 0; i < repeat; i++) {
    const reverse = i % 2 === 1;
    process.stderr.write(`bench: ${row.id} ${i + 1}/${repeat}${reverse ? ' (reversed)' : ''}... `);
    try {
      const values = await row.once(context, reverse);
      for (const c of columns) c.values.push(values[c.name] ?? NaN);
      const ratio = row.ratio(values);
      ratios.push(ratio);
      process.stderr.write(`${row.columns.map((c) => `${c.name} ${(values[c.name] ?? NaN).toFixed(c.unit === 'x' ? 2 : 0)}`).join(', ')}: ${ratio.toFixed(2)}x\n`);
    } catch (err) {
      // One broken repetition must not cost the other measurements.
      const message = err instanceof Error ? err.message : String(err);
      errors.push(message);
      process.stderr.write(`FAILED: ${message}\n`);
    }
  }
  const median = spread(ratios).median;
  return {
    id: row.id, name: row.name, measures: row.measures, columns, ratioText: row.ratioText, ratios,
    targetText: row.targetText, met: Number.isFinite(median) && row.meets(median), errors,
  };
}

async function main(): Promise<void> {
  const options = parseOptions(process.argv.slice(2));
  const loadAverageAtStart = Math.round((os.loadavg()[0] ?? 0) * 100) / 100;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-bench-'));
  const cleanupDir = (): void => fs.rmSync(dir, { recursive: true, force: true });
  process.once('SIGINT', () => {
    cleanupDir();
    process.exit(130);
  });
  try {
    const context: RowContext = {
      dir,
      imagePath: path.join(dir, 'bench.img'),
      baselineImagePath: path.join(dir, 'baseline.img'),
      sourcePath: path.join(dir, 'source.img'),
      imageBytes: options.imageBytes,
      runtimeSec: options.runtimeSec,
    };
    process.stderr.write(`bench: writing two ${options.imageBytes / 2 ** 20} MiB images of random data\n`);
    makeUserImage(context.imagePath, options.imageBytes, 1);
    makeUserImage(context.baselineImagePath, options.imageBytes, 2);
    if (options.rows.some((r) => r.id === 'nbdcopy-write')) makeImage(context.sourcePath, options.imageBytes, 'random', 3);

    const rows: RowResult[] = [];
    for (const row of options.rows) rows.push(await measureRow(row, context, options.repeat));

    const report: Report = {
      date: new Date().toISOString(),
      command: `node dist/bench/run.js ${process.argv.slice(2).join(' ')}`.trim(),
      machine: describeMachine(),
      loadAverageAtStart,
      runtimeSec: options.runtimeSec,
      imageBytes: options.imageBytes,
      repeat: options.repeat,
      rows,
    };
    const m = report.machine;
    process.stdout.write(`${report.date}: ${report.command}\n`);
    process.stdout.write(`${m.cpus} CPUs (${m.cpuModel}), ${m.memoryGiB} GiB RAM, ${m.kernel}, node ${m.node}, ${m.fio}, load average at start ${loadAverageAtStart}, at end ${m.loadAverage1m}\n`);
    process.stdout.write(`two ${options.imageBytes / 2 ** 20} MiB images of random data in the page cache (one per side), timed rows ${options.runtimeSec} s, ${options.repeat} repetition(s) per row\n\n`);
    process.stdout.write(`${formatTable(report)}\n\n`);
    for (const row of rows) process.stdout.write(`- ${row.name}: ${row.measures}\n`);
    if (options.jsonPath !== undefined) {
      fs.writeFileSync(options.jsonPath, `${JSON.stringify(report, null, 2)}\n`);
      process.stderr.write(`bench: wrote ${options.jsonPath}\n`);
    }
    if (rows.some((r) => r.errors.length > 0)) process.exitCode = 1;
  } finally {
    cleanupDir();
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exitCode = 1;
});
