/**
 * Serving image files or block devices over NBD without the daemon (`bdsnap serve`, and code
 * that wants the same server with each device wrapped in another layer, copy-before-write
 * say, before it is served). Each image is exported under its absolute real path; the first
 * is the default export.
 */

import fs from 'node:fs';
import os from 'node:os';
import type { BlockDevice } from '../device/block-device.js';
import { FileDevice } from '../device/file-device.js';
import { BdsnapError } from '../errors.js';
import { refuseInterruptedBackupRestore } from '../device/interrupted-restore.js';
import { DEFAULT_STATE_DIR } from './paths.js';
import { checkNoOtherWriters, checkNotInUse } from '../host/in-use.js';
import { checkTcpPolicy, listenOn } from '../nbd/listen.js';
import type { NbdServer, NbdServerOptions } from '../nbd/server.js';
import { loadTls, type NbdTls, type TlsSettings } from '../nbd/tls.js';
import type { ServeWorkerExport } from './serve-worker.js';
import { warmUpOnScratch } from './warm-scratch.js';

export interface ServeOptions {
  images: string[];
  /** Unix socket path; undefined means none (then `listen` must be given). */
  socketPath?: string;
  /** TCP listener; refused unless TLS is required or `insecureTcp`. */
  listen?: { host: string; port: number };
  /** Accept TCP that a client may use without TLS: anyone who can connect can read and write the exports. */
  insecureTcp?: boolean;
  /** TLS on every listener (credentials are read and checked before anything is opened). */
  tls?: TlsSettings;
  readOnly?: boolean;
  /**
   * The daemon's state directory (default /var/lib/bdsnap): an image its instant restore has not
   * finished is refused (see refuseUnfinishedInstantRestore).
   */
  stateDir?: string;
  /** Wrap each opened device before it is served. */
  wrap?: (device: BlockDevice, devicePath: string) => BlockDevice | Promise<BlockDevice>;
  log?: (event: Record<string, unknown>) => void;
}

export interface RunningServe {
  server: NbdServer;
  /** Export names, in order (the first is the default). */
  exportNames: string[];
  /** Where it listens, e.g. `unix:/run/x.sock` and `tcp:127.0.0.1:10809`. */
  endpoints: string[];
  /** TLS as loaded, or undefined when off. */
  tls: NbdTls | undefined;
  /** Finish requests in flight, flush, close every device. */
  stop(): Promise<void>;
}
/** Most threads plain image files are served on (beyond, the page cache's copies are the limit). */
export const MAX_SERVE_THREADS = 4;

/**
 * Threads for plain images (no session: connections share nothing but the files): one per
 * core, at most MAX_SERVE_THREADS; BDSNAP_NBD_THREADS=N sets the count (1: this thread only).
 */
function serveThreads(devices: FileDevice[], count: number): NbdServerOptions['threads'] {
  if (count <= 1) return undefined;
  const threads = Math.min(count, MAX_SERVE_THREADS);
  const exports: ServeWorkerExport[] = devices.map((d) => ({ name: d.path, identity: d.identity, readOnly: d.readOnly }));
  return { count: threads, script: new URL('./serve-worker.js', import.meta.url), exports };
}

/** BDSNAP_NBD_THREADS, or one thread per core; anything but a whole number is refused. */
export function threadCountAsked(): number {
  const asked = process.env.BDSNAP_NBD_THREADS;
  if (asked === undefined || asked === '') return os.availableParallelism();
  if (!/^\d+$/.test(asked)) throw new BdsnapError('EINVAL', `BDSNAP_NBD_THREADS=${asked} is not a whole number of threads (1: serve every connection on one thread)`);
  return Number(asked);
}

/** Open every image and listen. Errors: EINVAL (no image, no listener, TCP refused), ENOENT, EBUSY. */
export async function startServe(options: ServeOptions): Promise<RunningServe> {
  if (options.images.length === 0) throw new BdsnapError('EINVAL', 'no image to serve');
  if (options.socketPath === undefined && options.listen === undefined) throw new BdsnapError('EINVAL', 'no listener');
  const threadCount = threadCountAsked();
  const tls = await loadTls(options.tls ?? {});
  if (options.listen) checkTcpPolicy(options.listen, tls, options.insecureTcp ?? false, 'the images');
  const opened: FileDevice[] = [];
  const closeAll = async (): Promise<void> => {
    await Promise.allSettled(opened.map((d) => d.close()));
  };
  try {
    const exports: Array<{ name: string; device: BlockDevice }> = [];
    for (const image of options.images) {
      let real: string;
      try {
        real = await fs.promises.realpath(image);
      } catch (err) {
        throw new BdsnapError('ENOENT', `cannot open ${image}: no such file`, { cause: err });
      }
      if (exports.some((e) => e.name === real)) throw new BdsnapError('EINVAL', `${image} is given twice`);
      // EBUSY (another server has it) says who holds it, and the CLI adds what frees it.
      const device = await FileDevice.open(real, { readOnly: options.readOnly ?? false });
      opened.push(device);
      // The file is open, its lock held: one that a restore left half way (killed in place, or an
      // instant restore the daemon has not finished) holds neither its old content nor a backup's.
      await refuseInterruptedBackupRestore(real, device.identity);
      if (device.identity.kind === 'file') {
        const { refuseUnfinishedInstantRestore } = await import('./instant-restore.js');
        await refuseUnfinishedInstantRestore(options.stateDir ?? DEFAULT_STATE_DIR, real, device.identity);
      }
      // Sessions restore exactly only what went through them: a mount, a loop device or another
      // process writing the image would write around them. (A block device is held O_EXCL now.)
      if (options.wrap !== undefined && !options.readOnly) {
        await checkNotInUse(real, {}, { exclusiveProbe: false, writers: false });
        await checkNoOtherWriters(real);
      }
      exports.push({ name: real, device: options.wrap ? await options.wrap(device, real) : device });
    }
    const threads = options.wrap === undefined ? serveThreads(opened, threadCount) : undefined;
    const warmUp = warmUpOnScratch();
    const { server, endpoints } = await listenOn(exports, options, tls, {
      ...(threads !== undefined ? { threads } : {}), ...(warmUp !== undefined ? { warmUp } : {}),
    });
    let stopping: Promise<void> | undefined;
    return {
      server,
      exportNames: exports.map((e) => e.name),
      endpoints,
      tls,
      stop: () => {
        stopping ??= (async () => {
          await server.close();
          const served = exports.map((e) => e.device);
          // Flushed even when no client ever connected; wrapping layers first, so what they
          // write below lands before the files are synced and closed.
          await Promise.allSettled(served.map((d) => d.flush()));
          await Promise.allSettled(served.filter((d) => !opened.includes(d as FileDevice)).map((d) => d.close()));
          await Promise.allSettled(opened.map((d) => d.flush()));
          await closeAll();
        })();
        return stopping;
      },
    };
  } catch (err) {
    await closeAll();
    throw err;
  }
}
