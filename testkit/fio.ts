/**
 * fio through its `nbd` engine (libnbd inside fio), with JSON results parsed into the few
 * numbers tests and the benchmark need. Used both to verify data (write, then read back
 * with checksums) and to measure throughput.
 */

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { requireTool, run } from './process.js';

export interface FioJob {
  /** NBD URI of the export; with `directory` instead, fio works on a file there (its engine in extraArgs). */
  uri?: string;
  /** A mounted filesystem's directory, for a job on a file instead of an export. */
  directory?: string;
  /** fio's rw: write, read, randwrite, randread, randrw... */
  rw: string;
  blockSizeBytes: number;
  ioDepth: number;
  /** Region of the export to use, from offset 0. */
  sizeBytes: number;
  /** Run for this long (looping over the region) instead of one pass. */
  runtimeSec?: number;
  /** Write, then read back and check with this checksum (e.g. crc32c). */
  verify?: string;
  /** fio random seed, so runs are repeatable. */
  seed?: number;
  extraArgs?: string[];
  /** fio's environment (libnbd finds TLS certificates under $HOME/.pki/libnbd). */
  env?: NodeJS.ProcessEnv;
}

export interface FioDirection {
  ioBytes: number;
  bandwidthBytesPerSec: number;
  iops: number;
  /** Mean completion latency, microseconds. */
  meanLatencyUs: number;
}

export interface FioResult {
  /** fio's own per-job error code (0 = fine). */
  error: number;
  read: FioDirection;
  write: FioDirection;
  /** fio's messages (verify failures land here). */
  stderr: string;
  commandLine: string;
}

interface FioJsonDirection {
  io_bytes: number;
  bw_bytes: number;
  iops: number;
  clat_ns?: { mean: number };
}

function direction(d: FioJsonDirection | undefined): FioDirection {
  return {
    ioBytes: d?.io_bytes ?? 0,
    bandwidthBytesPerSec: d?.bw_bytes ?? 0,
    iops: d?.iops ?? 0,
    meanLatencyUs: (d?.clat_ns?.mean ?? 0) / 1000,
  };
}

/** Run one fio job; throws (with fio's output) if fio exits non-zero. */
export async function runFio(job: FioJob): Promise<FioResult> {
  requireTool('fio');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-fio-'));
  try {
    const output = path.join(dir, 'fio.json');
    const args = [
      '--name=bdsnap',
      ...(job.directory !== undefined ? [`--directory=${job.directory}`] : ['--ioengine=nbd', `--uri=${job.uri ?? ''}`]),
      `--rw=${job.rw}`,
      `--bs=${job.blockSizeBytes}`,
      `--iodepth=${job.ioDepth}`,
      `--size=${job.sizeBytes}`,
      `--randseed=${job.seed ?? 1234}`,
      '--output-format=json',
      `--output=${output}`,
      ...(job.runtimeSec !== undefined ? ['--time_based=1', `--runtime=${job.runtimeSec}`] : []),
      ...(job.verify !== undefined ? [`--verify=${job.verify}`, '--verify_fatal=1', '--do_verify=1'] : []),
      ...(job.extraArgs ?? []),
    ];
    const timeoutMs = ((job.runtimeSec ?? 0) + 120) * 1000;
    // fio writes its verify state files (local-<job>-<n>-verify.state) in the current directory:
    // run it in its own temporary directory, never in the checkout.
    const result = await run('fio', args, { timeoutMs, cwd: dir, ...(job.env ? { env: job.env } : {}) });
    const text = fs.readFileSync(output, 'utf8');
    // fio may print notices ("connected to NBD server") before the JSON document.
    const start = text.indexOf('{');
    if (start < 0) throw new Error(`fio wrote no JSON: ${text}\n${result.stderr}`);
    const parsed = JSON.parse(text.slice(start)) as { jobs: { error: number; read: FioJsonDirection; write: FioJsonDirection }[] };
    const first = parsed.jobs[0];
    if (first === undefined) throw new Error(`fio reported no job: ${text}`);
    return {
      error: first.error,
      read: direction(first.read),
      write: direction(first.write),
      stderr: result.stderr + result.stdout,
      commandLine: result.command,
    };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
