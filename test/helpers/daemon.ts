/**
 * `bdsnap daemon` as a real child process in private run, state and snapshot directories,
 * with a service password set and chosen devices activated, so that every NBD attach to
 * those devices opens a copy-before-write session. Used by the benchmark (cost of first
 * writes) and usable by any test that needs the whole service.
 */

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { AfterHook } from './files.js';
import { run, type RunResult } from './process.js';
import { BDSNAP_MAIN, launchServer, type NbdServer } from './server.js';

export interface DaemonOptions {
  /** Devices (image paths) to activate once the daemon is up. */
  activate?: string[];
  /** 'process' (default) or 'strict'. */
  durability?: 'process' | 'strict';
  password?: string;
  readyTimeoutMs?: number;
  /** More `bdsnap daemon` arguments (e.g. --no-change-tracking). */
  extraArgs?: string[];
}

export interface RunningDaemon {
  /** The daemon's NBD endpoint (<run-dir>/nbd.sock); stop() stops the daemon. */
  server: NbdServer;
  runDir: string;
  stateDir: string;
  snapshotRoot: string;
  /** Run a client command (`bdsnap ARGS`) against this daemon. */
  cli(args: string[], input?: string, allowFailure?: boolean): Promise<RunResult>;
}

export const TEST_PASSWORD = 'correct horse battery staple';

export async function startDaemon(t: AfterHook | undefined, options: DaemonOptions = {}): Promise<RunningDaemon> {
  const base = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-daemon-'));
  const runDir = path.join(base, 'run');
  const stateDir = path.join(base, 'state');
  const snapshotRoot = path.join(base, 'snapshots');
  for (const dir of [runDir, stateDir, snapshotRoot]) fs.mkdirSync(dir, { mode: 0o700 });
  const env = { ...process.env, BDSNAP_RUN_DIR: runDir };
  const server = await launchServer(t, {
    kind: 'bdsnap-daemon',
    command: process.execPath,
    args: [
      BDSNAP_MAIN, 'daemon', '--run-dir', runDir, '--state-dir', stateDir, '--snapshot-root', snapshotRoot,
      '--log-level', 'warn', ...(options.durability ? ['--durability', options.durability] : []), ...(options.extraArgs ?? []),
    ],
    socketPath: path.join(runDir, 'nbd.sock'),
    exportNames: (options.activate ?? []).map((p) => path.resolve(p)),
    ownDir: base,
    readyTimeoutMs: options.readyTimeoutMs,
    env,
  });
  const cli = (args: string[], input?: string, allowFailure = false): Promise<RunResult> =>
    run(process.execPath, [BDSNAP_MAIN, ...args], { env, input, allowFailure, timeoutMs: 60_000 });
  try {
    // The control socket may appear a moment after the NBD socket.
    const controlSocket = path.join(runDir, 'control.sock');
    const deadlineMs = Date.now() + (options.readyTimeoutMs ?? 15_000);
    while (!fs.existsSync(controlSocket)) {
      if (Date.now() > deadlineMs) throw new Error(`no control socket in ${runDir}:\n${server.stderr()}`);
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
    const password = options.password ?? TEST_PASSWORD;
    await cli(['passwd', '--password-stdin'], `${password}\n${password}\n`);
    for (const device of options.activate ?? []) await cli(['activate', path.resolve(device), '--password-stdin'], `${password}\n`);
  } catch (err) {
    await server.stop();
    throw err;
  }
  return { server, runDir, stateDir, snapshotRoot, cli };
}
