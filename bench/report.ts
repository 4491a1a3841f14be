/**
 * The benchmark's results as a text table (and the same data as JSON): one row per
 * comparison, each column as median (min to max) over the repetitions, the row's figure
 * (a ratio) with its spread, and the target.
 */

import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import type { Unit } from './rows.js';

export interface Spread {
  min: number;
  median: number;
  max: number;
}

export interface RowResult {
  id: string;
  name: string;
  measures: string;
  /** Column name -> unit and the value of each repetition. */
  columns: Array<{ name: string; unit: Unit; values: number[] }>;
  ratioText: string;
  /** The row's figure for each repetition. */
  ratios: number[];
  targetText: string;
  /** Whether the median figure meets the target. */
  met: boolean;
  /** Why repetitions failed, if any did. */
  errors: string[];
  /** Why the row was not measured on this machine (then nothing else is set). */
  skipped?: string;
}

export interface Machine {
  cpuModel: string;
  cpus: number;
  memoryGiB: number;
  kernel: string;
  node: string;
  fio: string;
  /** 1-minute load average when the machine was described: other work skews the figures. */
  loadAverage1m: number;
}

export interface Report {
  date: string;
  command: string;
  machine: Machine;
  loadAverageAtStart: number;
  runtimeSec: number;
  imageBytes: number;
  repeat: number;
  rows: RowResult[];
}

export function spread(values: number[]): Spread {
  const sorted = values.filter((v) => Number.isFinite(v)).sort((a, b) => a - b);
  if (sorted.length === 0) return { min: NaN, median: NaN, max: NaN };
  const mid = sorted.length / 2;
  const median = sorted.length % 2 === 1 ? (sorted[Math.floor(mid)] as number) : ((sorted[mid - 1] as number) + (sorted[mid] as number)) / 2;
  return { min: sorted[0] as number, median, max: sorted[sorted.length - 1] as number };
}

function toolVersion(cmd: string): string {
  try {
    return execFileSync(cmd, ['--version'], { encoding: 'utf8' }).split('\n')[0]?.trim() ?? 'unknown';
  } catch {
    return 'unknown';
  }
}

export function describeMachine(): Machine {
  let cpuModel = os.cpus()[0]?.model ?? 'unknown';
  try {
    const match = /^model name\s*:\s*(.+)$/m.exec(fs.readFileSync('/proc/cpuinfo', 'utf8'));
    if (match?.[1]) cpuModel = match[1].trim();
  } catch {
    // not Linux; os.cpus() is good enough
  }
  return {
    cpuModel,
    cpus: os.cpus().length,
    memoryGiB: Math.round(os.totalmem() / 2 ** 30),
    kernel: `${os.type()} ${os.release()}`,
    node: process.version,
    fio: toolVersion('fio'),
    loadAverage1m: Math.round((os.loadavg()[0] ?? 0) * 100) / 100,
  };
}

function formatNumber(value: number, unit: Unit): string {
  if (!Number.isFinite(value)) return '-';
  switch (unit) {
    case 'IOPS':
      return Math.round(value).toLocaleString('en-US');
    case 'x':
      return value.toFixed(2);
    case 'ms':
      return value.toFixed(0);
    default:
      return value.toFixed(0);
  }
}

/** "median (min-max) unit", or just the value for one repetition. */
function formatSpread(values: number[], unit: Unit): string {
  const s = spread(values);
  if (values.length <= 1) return `${formatNumber(s.median, unit)} ${unit}`;
  return `${formatNumber(s.median, unit)} (${formatNumber(s.min, unit)}-${formatNumber(s.max, unit)}) ${unit}`;
}

/** Markdown table: row, its columns, its figure with spread, target, met. */
export function formatTable(report: Report): string {
  const header = ['row', 'measured', 'figure', 'median (min-max)', 'target', 'met'];
  const lines = report.rows.map((row) => {
    if (row.skipped !== undefined) return [row.name, `skipped: ${row.skipped}`, row.ratioText, '-', row.targetText, '-'];
    const cells = row.columns.map((c) => `${c.name} ${formatSpread(c.values, c.unit)}`).join('; ');
    const r = spread(row.ratios);
    const figure = report.repeat <= 1 || row.ratios.length <= 1 ? `${r.median.toFixed(2)}x` : `${r.median.toFixed(2)}x (${r.min.toFixed(2)}-${r.max.toFixed(2)})`;
    const failed = row.errors.length > 0 ? ` (${row.errors.length} failed)` : '';
    return [row.name, cells + failed, row.ratioText, figure, row.targetText, row.met ? 'yes' : 'no'];
  });
  const widths = header.map((h, i) => Math.max(h.length, ...lines.map((l) => (l[i] ?? '').length)));
  const render = (cells: string[]): string => `| ${cells.map((c, i) => c.padEnd(widths[i] ?? 0)).join(' | ')} |`;
  const rule = `|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`;
  return [render(header), rule, ...lines.map(render)].join('\n');
}
