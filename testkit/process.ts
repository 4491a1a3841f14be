/**
 * Running real programs from tests: capture stdout, stderr and the exit status, and fail
 * with all three in the message, so a broken interop run explains itself in the test log.
 * Whether a test may run without a tool is decided once, in needs.ts; the require* functions
 * here are the last guard inside helpers and always throw.
 */

import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { processStartTimeSync } from '../src/host/processes.js';
import { cleanupOf } from './cleanup.js';
import type { AfterHook } from './files.js';

export interface RunOptions {
  /** Bytes or text written to the child's stdin, which is then closed. */
  input?: string | Buffer;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** Kill the child (SIGKILL) and fail after this long; default 120 s. */
  timeoutMs?: number;
  /** Resolve instead of throwing when the exit code is not 0. */
  allowFailure?: boolean;
}

export interface RunResult {
  command: string;
  stdout: string;
  stderr: string;
  /** Exit code, or null when the child ended by a signal. */
  exitCode: number | null;
  signal: NodeJS.Signals | null;
  durationMs: number;
}

export class RunError extends Error {
  readonly result: RunResult;

  constructor(message: string, result: RunResult) {
    super(message);
    this.name = 'RunError';
    this.result = result;
  }
}

const DEFAULT_TIMEOUT_MS = 120_000;
/** Keep failure messages readable: the tail of a long output is what explains it. */
const MAX_SHOWN_CHARS = 4000;

function tail(text: string): string {
  return text.length > MAX_SHOWN_CHARS ? `...${text.slice(-MAX_SHOWN_CHARS)}` : text;
}

export function quoteCommand(cmd: string, args: readonly string[]): string {
  return [cmd, ...args].map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replaceAll("'", "'\\''")}'`)).join(' ');
}

export function describeRun(result: RunResult): string {
  const status = result.signal ? `signal ${result.signal}` : `exit ${result.exitCode}`;
  return `${result.command}: ${status}\n--- stdout ---\n${tail(result.stdout)}\n--- stderr ---\n${tail(result.stderr)}`;
}

/**
 * Run `cmd args` to completion. Throws RunError (with stdout, stderr and status in the
 * message) on a non-zero exit, a signal, a spawn failure or the timeout.
 */
export function run(cmd: string, args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
  const command = quoteCommand(cmd, args);
  const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  const startedMs = Date.now();
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      env: options.env ?? process.env,
      cwd: options.cwd,
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    // A child that exits without reading its stdin must not crash the test with EPIPE.
    child.stdin.on('error', () => undefined);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(new RunError(`${command}: cannot start: ${e.message}`, {
        command, stdout: '', stderr: '', exitCode: null, signal: null, durationMs: Date.now() - startedMs,
      }));
    });
    child.on('close', (exitCode, signal) => {
      clearTimeout(timer);
      const result: RunResult = {
        command,
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
        exitCode,
        signal,
        durationMs: Date.now() - startedMs,
      };
      if (timedOut) {
        reject(new RunError(`timed out after ${timeoutMs} ms: ${describeRun(result)}`, result));
      } else if ((exitCode !== 0 || signal !== null) && options.allowFailure !== true) {
        reject(new RunError(`command failed: ${describeRun(result)}`, result));
      } else {
        resolve(result);
      }
    });
    if (options.input !== undefined) child.stdin.end(options.input);
    else child.stdin.end();
  });
}

/**
 * Run a command to completion, synchronously, for test steps that cannot await (cleanup of a
 * mount, setup before a daemon starts). Throws with the command and its stderr unless it exits 0.
 */
export function runSync(cmd: string, args: readonly string[], timeoutMs = 120_000): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: timeoutMs });
  if (r.status !== 0) throw new Error(`${quoteCommand(cmd, args)}: ${r.stderr || r.error?.message}`);
  return r.stdout;
}

/** Where a program is on PATH, or undefined. */
export function findOnPath(name: string, envPath = process.env.PATH ?? ''): string | undefined {
  for (const dir of envPath.split(path.delimiter)) {
    if (dir === '') continue;
    const candidate = path.join(dir, name);
    try {
      fs.accessSync(candidate, fs.constants.X_OK);
      if (fs.statSync(candidate).isFile()) return candidate;
    } catch {
      // not in this directory
    }
  }
  return undefined;
}

/** The Debian package that provides each tool, for the failure message. */
const TOOL_PACKAGES: Record<string, string> = {
  radosgw: 'radosgw',
  'ceph-mon': 'ceph-mon',
  'ceph-osd': 'ceph-osd',
  uuidgen: 'uuid-runtime',
  nbdinfo: 'libnbd-bin',
  nbdcopy: 'libnbd-bin',
  nbdfuse: 'libnbd-bin',
  nbdsh: 'python3-libnbd',
  'qemu-img': 'qemu-utils',
  'qemu-io': 'qemu-utils',
  fio: 'fio',
  nbdkit: 'nbdkit',
  fusermount3: 'fuse3',
  'mkfs.ext4': 'e2fsprogs',
  e2fsck: 'e2fsprogs',
  losetup: 'mount',
  mount: 'mount',
  umount: 'mount',
  jq: 'jq',
  openssl: 'openssl',
  strace: 'strace',
};

/** The Debian package that provides `tool`, when known. */
export function toolPackage(tool: string): string | undefined {
  return TOOL_PACKAGES[tool];
}

let nbdshProbe: { ok: boolean; detail: string } | undefined;

/** nbdsh runs `python3 -m nbd`; the Python found first on PATH must have the binding. Probed once. */
export function nbdshWorks(): boolean {
  if (nbdshProbe === undefined) {
    const probe = spawnSync('nbdsh', ['-c', 'pass'], { env: nbdshEnv(), encoding: 'utf8' });
    nbdshProbe = { ok: probe.status === 0, detail: probe.stderr || probe.error?.message || '' };
  }
  return nbdshProbe.ok;
}

/**
 * The path of `name`, or throw with a clear message if it is not installed. Helpers call
 * it as a last guard; tests decide whether to run with needs() (needs.ts).
 */
export function requireTool(name: string): string {
  const found = findOnPath(name);
  if (found === undefined) {
    const pkg = TOOL_PACKAGES[name];
    throw new Error(`required tool '${name}' is not installed${pkg ? ` (Debian package ${pkg})` : ''}`);
  }
  if (name === 'nbdsh' && !nbdshWorks()) {
    throw new Error(`required tool 'nbdsh' does not start (python3-libnbd missing for the python3 on PATH?): ${nbdshProbe?.detail}`);
  }
  return found;
}

/** Throw unless root (loop devices, mounts); the last guard inside helpers. */
export function requireRoot(): void {
  if (process.getuid?.() !== 0) throw new Error('this needs root (loop devices and mounts)');
}

/**
 * The environment for nbdsh: the distribution's python3 first, because a user-level Python
 * (pyenv, venv) found earlier on PATH lacks the libnbd binding that nbdsh imports.
 */
export function nbdshEnv(): NodeJS.ProcessEnv {
  return { ...process.env, PATH: ['/usr/bin', '/bin', process.env.PATH ?? ''].join(path.delimiter) };
}

/** Whether `pid` is a process that runs (a zombie has exited); see src/host/processes.ts. */
export function alive(pid: number): boolean {
  return processStartTimeSync(pid) !== null;
}

/** Field 3 (state) and field 22 (start time) of /proc/<pid>/stat, read raw, or null once the pid is gone. */
export function rawProcStat(pid: number): { state: string; startTime: string } | null {
  let stat: string;
  try {
    stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return null;
  }
  const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return { state: rest[0] ?? '', startTime: rest[19] ?? '' };
}

/**
 * A zombie: a child that has exited while its parent does not reap it. The parent is `sh`,
 * which starts the child and then execs `sleep`, a program that never waits. Returns the
 * zombie's pid and the start time it had, once /proc shows it in state Z. After the test the
 * parent is killed, and init reaps the zombie.
 */
export async function spawnZombie(t: AfterHook, timeoutMs = 5000): Promise<{ pid: number; startTime: string; parentPid: number }> {
  // The child outlives the shell's own part (echo, exec): a shell still running reaps a child
  // that exited, `sleep` never does.
  const parent = spawn('sh', ['-c', '(exec sleep 0.5) & echo $!; exec sleep 60'], { stdio: ['ignore', 'pipe', 'ignore'] });
  cleanupOf(t).after(() => parent.kill('SIGKILL'));
  const line = await new Promise<string>((resolve, reject) => {
    let out = '';
    parent.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      if (out.includes('\n')) resolve(out.trim());
    });
    parent.once('error', reject);
    parent.once('exit', () => reject(new Error('the zombie\'s parent exited early')));
  });
  const pid = Number(line);
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const stat = rawProcStat(pid);
    if (stat?.state === 'Z') return { pid, startTime: stat.startTime, parentPid: parent.pid as number };
    if (Date.now() > deadline) throw new Error(`process ${pid} did not become a zombie (state ${stat?.state ?? 'gone'})`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}
