/**
 * The benchmark's results as a text table (and the same data as JSON): one row per
 * workload, one column per target, and the ratio of the measured target to the baseline.
 */

import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import type { Unit } from './workloads.js';

export interface Row {
  workload: string;
  unit: Unit;
  /** Target name -> score; a target that did not run this row is absent. */
  values: Record<string, number>;
  /** "a / b" -> values[a] / values[b], for each ratio whose two targets ran. */
  ratios: Record<string, number>;
  /** Target name -> why that cell has no value. */
  errors: Record<string, string>;
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
  machine: Machine;
  runtimeSec: number;
  imageBytes: number;
  targets: { name: string; description: string; version: string }[];
  ratios: string[];
  rows: Row[];
}

export function describeMachine(): Machine {
  let fio = 'unknown';
  try {
    fio = execFileSync('fio', ['--version'], { encoding: 'utf8' }).trim();
  } catch {
    // reported as unknown; runFio fails loudly later if fio is really missing
  }
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
    fio,
    loadAverage1m: Math.round((os.loadavg()[0] ?? 0) * 100) / 100,
  };
}

function formatValue(value: number | undefined, unit: Unit): string {
  if (value === undefined) return '-';
  return unit === 'MB/s' ? `${value.toFixed(0)} MB/s` : `${Math.round(value).toLocaleString('en-US')} IOPS`;
}

export function formatTable(report: Report): string {
  const names = report.targets.map((t) => t.name);
  const header = ['workload', ...names, ...report.ratios];
  const lines = report.rows.map((row) => [
    row.workload,
    ...names.map((n) => (row.errors[n] !== undefined ? 'failed' : formatValue(row.values[n], row.unit))),
    ...report.ratios.map((r) => (row.ratios[r] === undefined ? '-' : `${(row.ratios[r] as number).toFixed(2)}x`)),
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...lines.map((l) => (l[i] ?? '').length)));
  const render = (cells: string[]): string => `| ${cells.map((c, i) => (i === 0 ? c.padEnd(widths[i] ?? 0) : c.padStart(widths[i] ?? 0))).join(' | ')} |`;
  const rule = `|${widths.map((w, i) => (i === 0 ? `:${'-'.repeat(w + 1)}` : `${'-'.repeat(w + 1)}:`)).join('|')}|`;
  return [render(header), rule, ...lines.map(render)].join('\n');
}
