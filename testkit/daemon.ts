/**
 * `bdsnap daemon` as a real child process, for every test (and the benchmark) that needs the
 * whole service. A sandbox holds its run, state and snapshot directories; the daemon counts as
 * ready once its NBD and control sockets both accept connections; with a test context it is
 * stopped (SIGTERM, SIGKILL after a grace period) when the test ends, before the sandbox is
 * removed (both go on the test's one cleanup stack). The CLI runs against it as a real process:
 * `cli`/`ok` synchronously, `RunningDaemon.cli` asynchronously.
 */

import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BDSNAP_MAIN } from './bdsnap-cli.js';
import { makeTempDir, type AfterHook } from './files.js';
import { run, type RunResult } from './process.js';
import { launchServer, nbdUri, type NbdServer } from './server.js';

/** The service password of test daemons. */
export const TEST_PASSWORD = 'correct horse battery staple';
/** The repository password every sandbox's commands get (BDSNAP_REPO_PASSWORD). */
export const TEST_REPO_PASSWORD = 'sandbox repository password';

export interface Sandbox {
  /** Readable by every user, so the CLI can run as an unprivileged one; the run dir stays private. */
  top: string;
  runDir: string;
  stateDir: string;
  snapshotRoot: string;
  /** The environment for the CLI: BDSNAP_RUN_DIR names runDir. */
  env: NodeJS.ProcessEnv;
}

/** The daemon's directories inside `top` (the daemon makes them, private). */
function sandboxIn(top: string): Sandbox {
  fs.chmodSync(top, 0o755);
  const runDir = path.join(top, 'run');
  return {
    top,
    runDir,
    stateDir: path.join(top, 'state'),
    snapshotRoot: path.join(top, 'snapshots'),
    // Backup repositories made in a sandbox are encrypted with this password. An in-place
    // `backup restore` keeps its journal in the state directory's restores/, as by default.
    env: { ...process.env, BDSNAP_RUN_DIR: runDir, BDSNAP_REPO_PASSWORD: TEST_REPO_PASSWORD, BDSNAP_RESTORE_DIR: path.join(top, 'state', 'restores') },
  };
}

/** A fresh sandbox, removed after the test (after the daemons and mounts set up in it). */
export function sandbox(t: AfterHook, prefix = 'bdsnap-svc-'): Sandbox {
  return sandboxIn(makeTempDir(t, prefix));
}

/** The NBD URI of an export of the sandbox's daemon. */
export function daemonUri(box: Sandbox, exportName: string): string {
  return nbdUri(path.join(box.runDir, 'nbd.sock'), exportName);
}

export interface CliResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** `bdsnap ARGS` against the sandbox's daemon. `prefix` runs it under another program (setpriv); `main` is another copy of the CLI. */
export function cli(box: Sandbox, args: string[], input = '', prefix: readonly string[] = [], main = BDSNAP_MAIN): CliResult {
  const [cmd, ...rest] = [...prefix, process.execPath, main, ...args];
  const r = spawnSync(cmd as string, rest, { encoding: 'utf8', env: box.env, input, timeout: 120_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Run and insist on success, with the output in the failure message. */
export function ok(box: Sandbox, args: string[], input = ''): string {
  const r = cli(box, args, input);
  if (r.status !== 0) throw new Error(`bdsnap ${args.join(' ')} exited ${r.status}: ${r.stderr}`);
  return r.stdout;
}

export interface DaemonOptions {
  /** The directories to run in; default a fresh one, removed when the daemon stops. */
  sandbox?: Sandbox;
  /** Set as the service password once the daemon is up (default TEST_PASSWORD); false sets none. */
  password?: string | false;
  /** Devices (image paths) to activate with the password once the daemon is up. */
  activate?: string[];
  /** 'process' (the daemon's default) or 'strict'. */
  durability?: 'process' | 'strict';
  /** Default 'warn'; a test that reads info events from logLines() asks for 'info'. */
  logLevel?: 'debug' | 'info' | 'warn' | 'error';
  /** Fail (and kill the daemon) if its sockets do not accept within this time; default 15 s. */
  readyTimeoutMs?: number;
  /** More `bdsnap daemon` arguments, after the directories (--no-change-tracking, session options). */
  extraArgs?: string[];
}

export interface RunningDaemon {
  /** The daemon process and its NBD endpoint (<run-dir>/nbd.sock): stop(), kill(), running(). */
  server: NbdServer;
  sandbox: Sandbox;
  runDir: string;
  stateDir: string;
  snapshotRoot: string;
  /** Run a client command (`bdsnap ARGS`) against this daemon. */
  cli(args: string[], input?: string, allowFailure?: boolean): Promise<RunResult>;
  /** The daemon's log so far (JSON lines on stdout), parsed. */
  logLines(): Array<Record<string, unknown>>;
}

/**
 * Start `bdsnap daemon` and wait until its NBD and control sockets accept; then set the
 * password and activate `options.activate`. On any failure the daemon is stopped and the
 * error names what it printed.
 */
export async function startDaemon(t: AfterHook | undefined, options: DaemonOptions = {}): Promise<RunningDaemon> {
  const password = options.password ?? TEST_PASSWORD;
  if (password === false && options.activate?.length) throw new Error('activating devices needs a password');
  const ownDir = options.sandbox === undefined ? fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-daemon-')) : undefined;
  const box = options.sandbox ?? sandboxIn(ownDir as string);
  let stdout = '';
  const server = await launchServer(t, {
    kind: 'bdsnap-daemon',
    command: process.execPath,
    args: [
      BDSNAP_MAIN, 'daemon', '--run-dir', box.runDir, '--state-dir', box.stateDir, '--snapshot-root', box.snapshotRoot,
      '--log-level', options.logLevel ?? 'warn', ...(options.durability ? ['--durability', options.durability] : []), ...(options.extraArgs ?? []),
    ],
    socketPath: path.join(box.runDir, 'nbd.sock'),
    // The control socket is bound after the NBD socket; a stale one from a killed daemon refuses.
    alsoAccepting: [path.join(box.runDir, 'control.sock')],
    exportNames: (options.activate ?? []).map((p) => path.resolve(p)),
    ownDir,
    readyTimeoutMs: options.readyTimeoutMs,
    env: box.env,
    onStdout: (chunk) => {
      stdout += chunk.toString('utf8');
    },
  });
  const daemonCli = (args: string[], input?: string, allowFailure = false): Promise<RunResult> =>
    run(process.execPath, [BDSNAP_MAIN, ...args], { env: box.env, input, allowFailure, timeoutMs: 60_000 });
  try {
    if (password !== false) {
      await daemonCli(['passwd', '--password-stdin'], `${password}\n${password}\n`);
      for (const device of options.activate ?? []) await daemonCli(['activate', path.resolve(device), '--password-stdin'], `${password}\n`);
    }
  } catch (err) {
    await server.stop();
    throw err;
  }
  return {
    server,
    sandbox: box,
    runDir: box.runDir,
    stateDir: box.stateDir,
    snapshotRoot: box.snapshotRoot,
    cli: daemonCli,
    logLines: () => stdout.split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l) as Record<string, unknown>),
  };
}
