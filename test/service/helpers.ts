/**
 * Shared fixtures for the service tests: a temp directory per test, the real `bdsnap` binary
 * run as a child process, and a real daemon started and stopped around each test.
 */

import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { TestContext } from 'node:test';
import { BDSNAP_MAIN } from '../helpers/bdsnap-cli.js';

export { BDSNAP_MAIN as MAIN };
export const PASSWORD = 'correct horse battery staple';

export interface Sandbox {
  top: string;
  runDir: string;
  stateDir: string;
  snapshotRoot: string;
  env: NodeJS.ProcessEnv;
}

export function sandbox(t: TestContext, prefix = 'bdsnap-svc-'): Sandbox {
  const top = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  // Readable by an unprivileged user, so the CLI can run as one; the run dir stays private.
  fs.chmodSync(top, 0o755);
  const box = {
    top,
    runDir: path.join(top, 'run'),
    stateDir: path.join(top, 'state'),
    snapshotRoot: path.join(top, 'snapshot'),
    env: { ...process.env, BDSNAP_RUN_DIR: path.join(top, 'run') },
  };
  t.after(() => fs.rmSync(top, { recursive: true, force: true }));
  return box;
}

export interface CliResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** `prefix` runs the command under another program (setpriv); `main` is another copy of the CLI. */
export function cli(box: Sandbox, args: string[], input = '', prefix: readonly string[] = [], main = BDSNAP_MAIN): CliResult {
  const [cmd, ...rest] = [...prefix, process.execPath, main, ...args];
  const r = spawnSync(cmd as string, rest, { encoding: 'utf8', env: box.env, input, timeout: 120000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Run and insist on success, with the output in the failure message. */
export function ok(box: Sandbox, args: string[], input = ''): string {
  const r = cli(box, args, input);
  if (r.status !== 0) throw new Error(`bdsnap ${args.join(' ')} exited ${r.status}: ${r.stderr}`);
  return r.stdout;
}

export interface DaemonProcess {
  child: ChildProcess;
  logLines(): Array<Record<string, unknown>>;
  stop(): Promise<number | null>;
}

/** `extraArgs` go to `bdsnap daemon` after the directories (session options, say). */
export async function startDaemonProcess(t: TestContext, box: Sandbox, extraArgs: string[] = []): Promise<DaemonProcess> {
  const child = spawn(process.execPath, [BDSNAP_MAIN, 'daemon', '--run-dir', box.runDir, '--state-dir', box.stateDir, '--snapshot-root', box.snapshotRoot, ...extraArgs], {
    env: box.env, stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  child.stdout?.on('data', (d: Buffer) => { out += d.toString(); });
  child.stderr?.on('data', (d: Buffer) => { err += d.toString(); });
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const stop = async (): Promise<number | null> => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), 20000);
    const code = await exited;
    clearTimeout(timer);
    return code;
  };
  t.after(async () => { await stop(); });
  const deadline = Date.now() + 15000;
  while (!out.includes('"daemon-started"')) {
    if (child.exitCode !== null) throw new Error(`daemon exited ${child.exitCode}: ${err}${out}`);
    if (Date.now() > deadline) throw new Error(`daemon did not start: ${err}${out}`);
    await new Promise((r) => setTimeout(r, 25));
  }
  return {
    child,
    stop,
    logLines: () => out.split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l) as Record<string, unknown>),
  };
}

export function makeImage(dir: string, name: string, sizeBytes: number, fill?: (buf: Buffer) => void): string {
  const file = path.join(dir, name);
  const buf = Buffer.alloc(sizeBytes);
  fill?.(buf);
  fs.writeFileSync(file, buf);
  return file;
}

export function sha256File(file: string): string {
  return createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

export function sessionDirs(box: Sandbox): string[] {
  if (!fs.existsSync(box.snapshotRoot)) return [];
  return fs.readdirSync(box.snapshotRoot).sort();
}

export function nbdUri(box: Sandbox, exportName: string): string {
  return `nbd+unix:///${encodeURIComponent(exportName)}?socket=${encodeURIComponent(path.join(box.runDir, 'nbd.sock'))}`;
}

/** Run nbdsh with a python snippet against an export; returns the process result. */
export function nbdsh(box: Sandbox, exportName: string, code: string): CliResult {
  const r = spawnSync('nbdsh', ['-u', nbdUri(box, exportName), '-c', code], { encoding: 'utf8', timeout: 60000, env: systemPythonEnv() });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** nbdsh is a python script importing the distribution's libnbd bindings: use the system python. */
export function systemPythonEnv(): NodeJS.ProcessEnv {
  return { ...process.env, PATH: `/usr/bin:/bin:${process.env.PATH ?? ''}` };
}

/** Set the service password for the first time and activate `device` with it, through the CLI. */
export function passwdAndActivate(box: Sandbox, device: string, password: string): void {
  ok(box, ['passwd', '--password-stdin'], `${password}\n`);
  ok(box, ['activate', device, '--password-stdin'], `${password}\n`);
}

/**
 * The sandbox holds exactly one session: return its manifest state after running
 * `bdsnap restore` on it (which must succeed).
 */
export function restoreOnlySession(box: Sandbox): string {
  const dirs = sessionDirs(box);
  assert.equal(dirs.length, 1, `expected one session directory, found ${dirs.join(', ')}`);
  const dir = path.join(box.snapshotRoot, dirs[0] as string);
  const manifest = JSON.parse(fs.readFileSync(path.join(dir, 'manifest.json'), 'utf8')) as { state: string };
  const restored = cli(box, ['restore', dir]);
  assert.equal(restored.status, 0, restored.stderr);
  return manifest.state;
}
