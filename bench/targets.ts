/**
 * What the benchmark can measure: each target starts one NBD server on its own socket over
 * the shared image and stops it again. Targets never run at the same time. A new variant
 * (bdsnap with a snapshot session open, a point-in-time view...) is one more entry here.
 */

import { startDaemon } from '../test/helpers/daemon.js';
import { runFio } from '../test/helpers/fio.js';
import { RawNbdClient } from '../test/helpers/raw-nbd.js';
import { startServer, type NbdServer } from '../test/helpers/server.js';
import { run } from '../test/helpers/process.js';

export interface RunningTarget {
  /** NBD URI fio connects to. */
  uri: string;
  stop(): Promise<void>;
}

export interface TargetContext {
  /** The benchmark image (in the page cache). */
  imagePath: string;
}

export interface Target {
  /** Column name in the table and key in the JSON. */
  name: string;
  description: string;
  start(context: TargetContext): Promise<RunningTarget>;
  /** One line about the software measured (version), for the report. */
  version(): Promise<string>;
}

async function fromServer(server: NbdServer, exportName: string): Promise<RunningTarget> {
  return {
    uri: server.uri(exportName),
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
  version: async () => `bdsnap serve, node ${process.version}`,
};

export const NBDKIT_FILE: Target = {
  name: 'nbdkit',
  // The file plugin with nbdkit's defaults: 16 worker threads, parallel thread model,
  // multi-conn, page-cache I/O: its fastest configuration for a cached image.
  description: 'nbdkit file file=IMAGE (defaults: 16 threads, parallel)',
  start: async ({ imagePath }) => fromServer(await startServer(undefined, { kind: 'nbdkit', images: [imagePath] }), ''),
  version: async () => (await run('nbdkit', ['--version'])).stdout.trim(),
};

export const BDSNAP_SESSION: Target = {
  name: 'bdsnap+session',
  // Each fio run is one attach, so one fresh session: writes pay for the first copy of
  // every chunk they touch (64 KiB chunks by default), rewrites within the run do not.
  description: 'bdsnap daemon, device activated: every fio run is a new copy-before-write session',
  start: async ({ imagePath }) => {
    const daemon = await startDaemon(undefined, { activate: [imagePath] });
    return fromServer(daemon.server, daemon.server.exportNames[0] as string);
  },
  version: async () => `bdsnap daemon (durability process), node ${process.version}`,
};

export const BDSNAP_REWRITE: Target = {
  name: 'bdsnap+rewrite',
  // One connection holds the session open while a first pass preserves every chunk; the
  // measured run then only rewrites chunks already preserved, which must cost nothing extra.
  description: 'bdsnap daemon, session open and every chunk already preserved (rewrites)',
  start: async ({ imagePath }) => {
    const daemon = await startDaemon(undefined, { activate: [imagePath] });
    const exportName = daemon.server.exportNames[0] as string;
    try {
      const holder = await RawNbdClient.connect(daemon.server.socketPath);
      await holder.go(exportName);
      const size = Number(holder.exportSize);
      await runFio({ uri: daemon.server.uri(exportName), rw: 'write', blockSizeBytes: 1 << 20, ioDepth: 4, sizeBytes: size });
      const running = await fromServer(daemon.server, exportName);
      return {
        uri: running.uri,
        stop: async () => {
          await holder.disconnect();
          await running.stop();
        },
      };
    } catch (err) {
      await daemon.server.stop();
      throw err;
    }
  },
  version: async () => `bdsnap daemon (durability process), node ${process.version}`,
};

/** Every known target, in table column order. */
export const TARGETS: Target[] = [BDSNAP_SERVE, BDSNAP_SESSION, BDSNAP_REWRITE, NBDKIT_FILE];

/** Ratio columns [numerator, denominator]: shown when both targets ran. */
export const RATIOS: [string, string][] = [
  ['bdsnap', 'nbdkit'],
  ['bdsnap+session', 'bdsnap'],
  ['bdsnap+rewrite', 'bdsnap'],
];
