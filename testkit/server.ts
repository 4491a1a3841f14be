/**
 * Start and stop an NBD server as a real child process on a fresh unix socket: `bdsnap
 * serve` (the product) or `nbdkit file` (the reference, to check a test recipe and to
 * compare speed). Tests and the benchmark go through here, so which server a test talks to
 * is decided in one place: the `kind` option, or BDSNAP_TEST_SERVER=nbdkit to run the
 * interop suite against the reference server.
 */

import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { AfterHook } from './files.js';
import { BDSNAP_MAIN } from './bdsnap-cli.js';
import { cleanupOf } from './cleanup.js';
import { requireTool } from './process.js';

export type ServerKind = 'bdsnap' | 'nbdkit';

export interface ServerOptions {
  /** Image files (or block devices) to serve; bdsnap exports each under its absolute path. */
  images: string[];
  readOnly?: boolean;
  /** Default: serverKind(). */
  kind?: ServerKind;
  /** Default: a fresh socket in a fresh temp dir. */
  socketPath?: string;
  /** Fail if the socket does not accept connections within this time; default 15 s. */
  readyTimeoutMs?: number;
  /** Extra arguments placed before the images (bdsnap) or the plugin name (nbdkit). */
  extraArgs?: string[];
  env?: NodeJS.ProcessEnv;
}

export interface StopResult {
  exitCode: number | null;
  signal: NodeJS.Signals | null;
  /** True when SIGTERM was not enough and the server had to be killed. */
  killed: boolean;
}

export interface NbdServer {
  readonly kind: string;
  readonly socketPath: string;
  /** Export names in the order of `images` (absolute paths). */
  readonly exportNames: string[];
  readonly pid: number;
  /** NBD URI for libnbd tools, fio and qemu; '' selects the default export. */
  uri(exportName?: string): string;
  /** Everything the server printed on stderr so far. */
  stderr(): string;
  /** True while the process runs. */
  running(): boolean;
  /** Wait for the process to end by itself; undefined if it still runs after `timeoutMs`. */
  waitForExit(timeoutMs: number): Promise<{ exitCode: number | null; signal: NodeJS.Signals | null } | undefined>;
  /** SIGTERM, wait, SIGKILL after `graceMs` (default 10 s). Idempotent. */
  stop(graceMs?: number): Promise<StopResult>;
  /** Send `signal` and return at once (a crash on purpose); waitForExit() or stop() wait for the end. */
  kill(signal: NodeJS.Signals): void;
}

const DEFAULT_READY_TIMEOUT_MS = 15_000;
const DEFAULT_GRACE_MS = 10_000;
const MAX_KEPT_STDERR_CHARS = 64 * 1024;

/** The compiled CLI entry point, found relative to this file (dist/testkit). */
export { BDSNAP_MAIN };

/** Which server the interop tests talk to: bdsnap unless BDSNAP_TEST_SERVER says otherwise. */
export function serverKind(): ServerKind {
  const wanted = process.env.BDSNAP_TEST_SERVER ?? 'bdsnap';
  if (wanted !== 'bdsnap' && wanted !== 'nbdkit') {
    throw new Error(`BDSNAP_TEST_SERVER must be 'bdsnap' or 'nbdkit', got '${wanted}'`);
  }
  return wanted;
}

/**
 * The NBD URI of an export on a unix socket. libnbd and qemu take the URI path minus its
 * first slash as the export name, so the absolute path /a/b.img becomes nbd+unix:////a/b.img.
 */
export function nbdUri(socketPath: string, exportName = ''): string {
  const encodedName = exportName.split('/').map(encodeURIComponent).join('/');
  return `nbd+unix:///${encodedName}?socket=${encodeURIComponent(socketPath)}`;
}

function commandFor(kind: ServerKind, socketPath: string, images: string[], options: ServerOptions): [string, string[]] {
  const extra = options.extraArgs ?? [];
  if (kind === 'bdsnap') {
    return [process.execPath, [BDSNAP_MAIN, 'serve', '--socket', socketPath, ...(options.readOnly ? ['--read-only'] : []), ...extra, ...images]];
  }
  if (images.length !== 1) throw new Error(`the nbdkit file plugin serves one image, got ${images.length}`);
  return [
    requireTool('nbdkit'),
    ['--foreground', '--exit-with-parent', '--unix', socketPath, ...(options.readOnly ? ['--readonly'] : []), ...extra, 'file', `file=${images[0]}`],
  ];
}

function tryConnect(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.createConnection(socketPath);
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

/** True when every socket exists and accepts a connection (a stale socket file refuses). */
async function accepting(socketPaths: string[]): Promise<boolean> {
  for (const socketPath of socketPaths) {
    if (!fs.existsSync(socketPath) || !(await tryConnect(socketPath))) return false;
  }
  return true;
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** True if `promise` settles within `timeoutMs`; the timer never keeps the process alive. */
export async function settlesWithin(promise: Promise<unknown>, timeoutMs: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<false>((resolve) => {
    timer = setTimeout(() => resolve(false), timeoutMs);
  });
  try {
    return await Promise.race([promise.then(() => true, () => true), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Start a server and wait until its socket accepts connections. With a test context, the
 * server (and its temp dir) are stopped and removed after the test, whatever happens.
 */
export async function startServer(t: AfterHook | undefined, options: ServerOptions): Promise<NbdServer> {
  const kind = options.kind ?? serverKind();
  // bdsnap names each export by the image's real path (symlinks resolved).
  const images = options.images.map((p) => (fs.existsSync(p) ? fs.realpathSync(p) : path.resolve(p)));
  let ownDir: string | undefined;
  let socketPath = options.socketPath;
  if (socketPath === undefined) {
    ownDir = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-srv-'));
    socketPath = path.join(ownDir, 'nbd.sock');
  }
  let command: string;
  let args: string[];
  try {
    [command, args] = commandFor(kind, socketPath, images, options);
  } catch (err) {
    if (ownDir !== undefined) fs.rmSync(ownDir, { recursive: true, force: true });
    throw err;
  }
  return launchServer(t, {
    kind, command, args, socketPath, exportNames: images, ownDir, readyTimeoutMs: options.readyTimeoutMs, env: options.env,
    // `bdsnap serve --help` promises this line once every listener is up (TCP included).
    readyPattern: kind === 'bdsnap' ? /^bdsnap: serving /m : undefined,
  });
}

export interface LaunchOptions {
  /** Label for messages (and NbdServer.kind). */
  kind: string;
  command: string;
  args: string[];
  /** The NBD socket to wait for. */
  socketPath: string;
  exportNames: string[];
  /** A directory removed once the process has stopped. */
  ownDir?: string;
  readyTimeoutMs?: number;
  env?: NodeJS.ProcessEnv;
  /** Also wait for this on stderr (the server's own "ready" line). */
  readyPattern?: RegExp;
  /** More unix sockets that must accept connections before the server counts as ready. */
  alsoAccepting?: string[];
  /** Sees every chunk of stdout, in full (what stderr() returns is cut to its last 64 KiB). */
  onStdout?: (chunk: Buffer) => void;
}

/** Start any NBD-serving process (bdsnap serve, bdsnap daemon, nbdkit) and wait for its socket. */
export async function launchServer(t: AfterHook | undefined, options: LaunchOptions): Promise<NbdServer> {
  const { kind, command: cmd, args, socketPath, exportNames: images, ownDir } = options;
  const child: ChildProcess = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: options.env ?? process.env });
  let stderrText = '';
  const keep = (b: Buffer): void => {
    stderrText += b.toString('utf8');
    if (stderrText.length > MAX_KEPT_STDERR_CHARS) stderrText = stderrText.slice(-MAX_KEPT_STDERR_CHARS);
  };
  child.stderr?.on('data', keep);
  // stdout is not part of the contract, but kept so that a chatty server never blocks on a full pipe.
  child.stdout?.on('data', keep);
  if (options.onStdout) child.stdout?.on('data', options.onStdout);
  let exit: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  let spawnError: Error | undefined;
  const exited = new Promise<void>((resolve) => {
    child.once('close', (code: number | null, signal: NodeJS.Signals | null) => {
      exit = { code, signal };
      resolve();
    });
    child.once('error', (e) => {
      spawnError = e;
      exit ??= { code: null, signal: null };
      resolve();
    });
  });

  let stopping: Promise<StopResult> | undefined;
  const stop = (graceMs = DEFAULT_GRACE_MS): Promise<StopResult> => {
    stopping ??= (async () => {
      let killed = false;
      if (exit === undefined) {
        child.kill('SIGTERM');
        if (!(await settlesWithin(exited, graceMs))) {
          killed = true;
          child.kill('SIGKILL');
          await exited;
        }
      }
      if (ownDir !== undefined) fs.rmSync(ownDir, { recursive: true, force: true });
      return { exitCode: exit?.code ?? null, signal: exit?.signal ?? null, killed };
    })();
    return stopping;
  };
  if (t !== undefined) cleanupOf(t).after(() => stop());

  const describe = (): string =>
    `${kind} server (${[cmd, ...args].join(' ')})` +
    (exit ? ` exited (${exit.signal ? `signal ${exit.signal}` : `code ${exit.code}`})` : '') +
    (spawnError ? `: cannot start: ${spawnError.message}` : '') +
    `\n--- server stderr ---\n${stderrText}`;

  const deadlineMs = Date.now() + (options.readyTimeoutMs ?? DEFAULT_READY_TIMEOUT_MS);
  for (;;) {
    if (exit !== undefined) {
      await stop();
      throw new Error(`NBD server did not start: ${describe()}`);
    }
    const announced = options.readyPattern === undefined || options.readyPattern.test(stderrText);
    if (announced && (await accepting([socketPath, ...(options.alsoAccepting ?? [])]))) break;
    if (Date.now() > deadlineMs) {
      await stop();
      throw new Error(`NBD server not accepting on ${[socketPath, ...(options.alsoAccepting ?? [])].join(' and ')} after ${options.readyTimeoutMs ?? DEFAULT_READY_TIMEOUT_MS} ms: ${describe()}`);
    }
    await sleep(25);
  }

  const finalSocketPath = socketPath;
  return {
    kind,
    socketPath: finalSocketPath,
    exportNames: images,
    pid: child.pid ?? -1,
    uri: (exportName = '') => nbdUri(finalSocketPath, exportName),
    stderr: () => stderrText,
    running: () => exit === undefined,
    waitForExit: async (timeoutMs) => {
      await settlesWithin(exited, timeoutMs);
      return exit === undefined ? undefined : { exitCode: exit.code, signal: exit.signal };
    },
    stop,
    kill: (signal) => {
      if (exit === undefined) child.kill(signal);
    },
  };
}
