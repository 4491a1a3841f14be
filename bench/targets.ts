/**
 * What the benchmark can measure: each target starts one NBD server on its own socket over
 * the shared image and stops it again. Targets never run at the same time. A new variant
 * (bdsnap with a snapshot session open, a point-in-time view...) is one more entry here.
 */

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { listSessions } from '../src/snapshot/index.js';
import { launchServer, makePki, type NbdServer, runFio, startServer } from './helpers.js';
import { BENCH_CHUNK_BYTES } from './workloads.js';

export interface RunningTarget {
  /** NBD URI fio connects to. */
  uri: string;
  /** The client's environment, when it needs one (where libnbd finds TLS certificates). */
  env?: NodeJS.ProcessEnv;
  /** The server's process, whose CPU time a row may read (/proc/PID/stat). */
  pid?: number;
  stop(): Promise<void>;
  /**
   * For a session target, once stopped: how many chunks the session preserved, read from its
   * manifest (what lets a first-write row check that every write was a first one).
   */
  preservedChunks?(): number;
}

export interface TargetContext {
  /** The benchmark image (in the page cache). */
  imagePath: string;
  /** Where a session target makes its snapshot root (default: the system temp dir). */
  snapshotParent?: string;
}

export interface Target {
  /** Column name in the table and key in the JSON. */
  name: string;
  description: string;
  start(context: TargetContext): Promise<RunningTarget>;
}

async function fromServer(server: NbdServer, exportName: string): Promise<RunningTarget> {
  return {
    uri: server.uri(exportName),
    pid: server.pid,
    stop: async () => {
      const stopped = await server.stop();
      if (stopped.killed || stopped.exitCode !== 0) {
        throw new Error(`${server.kind} did not stop cleanly (${JSON.stringify(stopped)}):\n${server.stderr()}`);
      }
    },
  };
}

export const BDSNAP_SERVE: Target = {
  name: 'bdsnap',
  description: 'bdsnap serve IMAGE (no session)',
  start: async ({ imagePath }) => fromServer(await startServer(undefined, { kind: 'bdsnap', images: [imagePath] }), imagePath),
};

export const NBDKIT_FILE: Target = {
  name: 'nbdkit',
  // The file plugin with nbdkit's defaults: 16 worker threads, parallel thread model,
  // multi-conn, page-cache I/O: its fastest configuration for a cached image.
  description: 'nbdkit file file=IMAGE (defaults: 16 threads, parallel)',
  start: async ({ imagePath }) => fromServer(await startServer(undefined, { kind: 'nbdkit', images: [imagePath] }), ''),
};

/** `bdsnap serve --snapshot-root`: one session for as long as the server runs, removed at stop. */
async function startSessionServer(imagePath: string, snapshotParent = os.tmpdir()): Promise<{ server: NbdServer; root: string }> {
  const root = fs.mkdtempSync(path.join(snapshotParent, 'bdsnap-bench-snap-'));
  try {
    const server = await startServer(undefined, {
      kind: 'bdsnap',
      images: [imagePath],
      extraArgs: ['--snapshot-root', root, '--chunk-size', String(BENCH_CHUNK_BYTES)],
    });
    return { server, root };
  } catch (err) {
    fs.rmSync(root, { recursive: true, force: true });
    throw err;
  }
}

async function fromSessionServer(server: NbdServer, root: string, exportName: string): Promise<RunningTarget> {
  const running = await fromServer(server, exportName);
  let preserved: number | undefined;
  return {
    uri: running.uri,
    pid: running.pid,
    stop: async () => {
      try {
        await running.stop();
        const sessions = await listSessions(root);
        if (sessions.length !== 1 || sessions[0]?.state !== 'complete') {
          throw new Error(`the session server left ${JSON.stringify(sessions.map((s) => s.state))} in its snapshot root, not one complete session`);
        }
        preserved = sessions[0].preservedChunks;
      } finally {
        fs.rmSync(root, { recursive: true, force: true });
      }
    },
    preservedChunks: () => {
      if (preserved === undefined) throw new Error('preservedChunks() is known once the session target has stopped');
      return preserved;
    },
  };
}

export const BDSNAP_SESSION: Target = {
  name: 'bdsnap+session',
  // Each cell starts a fresh session: writes pay for the first copy of every chunk they
  // touch; in the timed rows later writes to the same chunk are rewrites (a mix), the
  // one-pass "first write" rows are first writes only.
  description: `bdsnap serve --snapshot-root (a fresh copy-before-write session per cell, ${BENCH_CHUNK_BYTES / 1024} KiB chunks)`,
  start: async ({ imagePath, snapshotParent }) => {
    const { server, root } = await startSessionServer(imagePath, snapshotParent);
    return fromSessionServer(server, root, server.exportNames[0] as string);
  },
};

export const BDSNAP_REWRITE: Target = {
  name: 'bdsnap+rewrite',
  // A first sequential pass preserves every chunk of the session; the measured run then only
  // rewrites chunks already preserved, which must cost nothing extra.
  description: 'bdsnap serve --snapshot-root with every chunk already preserved (rewrites)',
  start: async ({ imagePath }) => {
    const { server, root } = await startSessionServer(imagePath);
    const exportName = server.exportNames[0] as string;
    try {
      const size = fs.statSync(imagePath).size;
      // end_fsync: a FLUSH at the end makes the store durable, so that the measured run does
      // not share the disk with the write-back of the pass that preserved everything.
      await runFio({ uri: server.uri(exportName), rw: 'write', blockSizeBytes: 1 << 20, ioDepth: 4, sizeBytes: size, extraArgs: ['--end_fsync=1'] });
    } catch (err) {
      await server.stop();
      fs.rmSync(root, { recursive: true, force: true });
      throw err;
    }
    return fromSessionServer(server, root, exportName);
  },
};

const NBD_FLOOR_MAIN = fileURLToPath(new URL('./nbd-floor.js', import.meta.url));

/**
 * How nbd-floor.ts serves: from `processes` processes, or one process with `threads` worker
 * threads; `async`: file I/O on the thread pool; `cow`: one event loop keeping the original of
 * each chunk (the sessions' chunk size) in a store before its first write, and nothing more.
 */
export interface NbdFloorShape { processes?: number; threads?: number; async?: boolean; cow?: boolean; /** With `cow`: where the store goes (default: in the server's own temp dir). */ cowStore?: string }

/** nbd-floor.ts: the least a Node.js server does to serve the image. */
export function nbdFloor({ processes = 1, threads = 1, async = false, cow = false, cowStore }: NbdFloorShape = {}): Target {
  const from = threads > 1 ? `${threads} worker threads` : processes > 1 ? `${processes} processes` : 'one event loop';
  const name = threads > 1 ? 'node-floor-threads' : processes > 1 ? `node-floor-${processes}p` : 'node-floor';
  return {
    name: `${name}${async ? '-async' : ''}${cow ? '-cow' : ''}`,
    description: `nbd-floor (Node.js, no checks, ${async ? 'file I/O on the thread pool' : 'synchronous file I/O'}) from ${from}${cow ? `, each first write to a ${BENCH_CHUNK_BYTES / 1024} KiB chunk keeping its original (read, CRC-32, appended to a store file)` : ''}`,
    start: async ({ imagePath }) => {
      const ownDir = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-floor-'));
      const socketPath = path.join(ownDir, 'nbd.sock');
      const cowArgs = cow ? ['--cow-store', cowStore ?? path.join(ownDir, 'store'), '--chunk-size', String(BENCH_CHUNK_BYTES)] : [];
      const args = [NBD_FLOOR_MAIN, '--processes', String(processes), '--threads', String(threads), ...(async ? ['--async'] : []), ...cowArgs, socketPath, imagePath];
      return fromServer(await launchServer(undefined, {
        kind: 'nbd-floor', command: process.execPath, args, socketPath, exportNames: [''], ownDir, readyPattern: /^nbd-floor: serving /m,
      }), '');
    },
  };
}

/**
 * A server with x509 TLS required on its unix socket (same socket as the plain rows, so the
 * row compares the cost of TLS alone); fio and nbdcopy connect through libnbd with an
 * `nbds+unix://` URI that trusts the test CA. Certificates are made fresh for each cell.
 */
function tlsTarget(kind: 'bdsnap' | 'nbdkit'): Target {
  return {
    name: `${kind}`,
    description: kind === 'bdsnap'
      ? 'bdsnap serve --tls-certificates DIR IMAGE (TLS required, P-256 certificates)'
      : 'nbdkit --tls=require --tls-certificates=DIR file file=IMAGE (same certificates)',
    start: async ({ imagePath }) => {
      const pkiDir = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-bench-tls-'));
      try {
        const pki = makePki(pkiDir);
        const extraArgs = kind === 'bdsnap' ? ['--tls-certificates', pki.server] : ['--tls=require', `--tls-certificates=${pki.server}`];
        const server = await startServer(undefined, { kind, images: [imagePath], extraArgs });
        const running = await fromServer(server, kind === 'bdsnap' ? imagePath : '');
        // fio's libnbd refuses file paths in a URI: it finds the CA in $HOME/.pki/libnbd instead.
        const home = path.join(pkiDir, 'home');
        fs.mkdirSync(path.join(home, '.pki'), { recursive: true });
        fs.cpSync(pki.trusting, path.join(home, '.pki', 'libnbd'), { recursive: true });
        return {
          uri: running.uri.replace(/^nbd\+unix:/, 'nbds+unix:'),
          env: { ...process.env, HOME: home },
          pid: running.pid,
          stop: async () => {
            try {
              await running.stop();
            } finally {
              fs.rmSync(pkiDir, { recursive: true, force: true });
            }
          },
        };
      } catch (err) {
        fs.rmSync(pkiDir, { recursive: true, force: true });
        throw err;
      }
    },
  };
}

export const BDSNAP_TLS = tlsTarget('bdsnap');
export const NBDKIT_TLS = tlsTarget('nbdkit');
