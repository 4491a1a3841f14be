/**
 * `bdsnap serve [--socket PATH] [--listen HOST:PORT] [--tls ...] [--read-only] IMAGE...`:
 * serve image files or block devices over NBD in the foreground, without the daemon. Each
 * image is exported under its absolute real path; the empty export name selects the first.
 * SIGINT or SIGTERM lets requests in flight finish, flushes, and exits 0.
 *
 * NBD has no authentication of its own: whoever reaches a TCP port can read and write every
 * export, and even a loopback port is open to every local user (a unix socket is mode 0600).
 * So TCP is served only with TLS required (certificates or a PSK: the client must prove it
 * holds them), or, without it, when asked for by name with --insecure-tcp, and then announced
 * on stderr. `--tls on` lets a client choose plaintext, so it counts as plain TCP here.
 *
 * The logic lives in startServe() so other code can run the same server and wrap each
 * device in another layer (copy-before-write, say) before it is served.
 */

import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { Command } from 'commander';
import type { BlockDevice } from '../../device/block-device.js';
import { FileDevice } from '../../device/file-device.js';
import { BdsnapError } from '../../errors.js';
import { NbdServer, type NbdServerOptions } from '../../nbd/server.js';
import type { ServeWorkerExport } from './serve-worker.js';
import { loadTls, TLS_MODES, type NbdTls, type TlsMode, type TlsSettings } from '../../nbd/tls.js';
import { StaticExports, type StaticExport } from '../../nbd/static-exports.js';
import { CowDevice, type SessionEvent, type SessionOptions } from '../../snapshot/index.js';
import { addSessionOptions, parseSessionOptions, type SessionCliOptions } from '../session-options.js';

export const DEFAULT_SOCKET = 'bdsnap.sock';

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
  /** Wrap each opened device before it is served. */
  wrap?: (device: BlockDevice, devicePath: string) => BlockDevice;
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

/** Who can reach a TCP listener on `host`: a loopback address is still open to every local user. */
export function whoCanConnect(host: string): string {
  const loopback = host === 'localhost' || host === '::1' || (net.isIPv4(host) && host.startsWith('127.'));
  return loopback ? 'every local user' : `every host that can reach ${host.includes(':') ? `[${host}]` : host} (and every local user)`;
}

/**
 * TCP is served with TLS required, or else only when plaintext was accepted by name: `--tls on`
 * lets a client skip TLS, so it counts as plaintext here.
 */
export function checkTcpPolicy(listen: { host: string; port: number }, tls: NbdTls | undefined, insecureTcp: boolean, what: string): void {
  if (tls?.mode === 'require' || insecureTcp) return;
  const how = tls ? 'with --tls on a client may skip TLS, so' : 'without TLS';
  throw new BdsnapError('EINVAL',
    `refusing plain TCP on ${listen.host}:${listen.port}: ${how} ${whoCanConnect(listen.host)} could read and write ${what}; `
    + 'give --tls-certificates DIR or --tls-psk FILE (TLS required), pass --insecure-tcp to accept that, or use the unix socket');
}

/** The warning printed when TCP is served without TLS required, or undefined when it is. */
export function plainTcpWarning(endpoint: string, host: string, tls: NbdTls | undefined, what: string): string | undefined {
  if (tls?.mode === 'require') return undefined;
  const without = tls ? 'with TLS optional (--tls on) and no other authentication' : 'without TLS or authentication';
  return `plain TCP on ${endpoint}, ${without}: ${whoCanConnect(host)} can connect and ${what}`;
}

/** Parse `HOST:PORT`, `[V6]:PORT` or a bare `PORT` (which means 127.0.0.1). */
export function parseListen(text: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]:|([^:]*):)?(\d{1,5})$/.exec(text);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) throw new BdsnapError('EINVAL', `bad --listen "${text}": expected HOST:PORT or PORT`);
  return { host: m[1] ?? (m[2] || '127.0.0.1'), port };
}

/** An NBD server of `exports` listening where `where` says (TLS as loaded). */
export async function listenOn(
  exports: StaticExport[], where: { socketPath?: string; listen?: { host: string; port: number }; log?: (event: Record<string, unknown>) => void }, tls: NbdTls | undefined,
  threads?: NbdServerOptions['threads'],
): Promise<{ server: NbdServer; endpoints: string[] }> {
  const server = new NbdServer({ exports: new StaticExports(exports), log: where.log, ...(threads !== undefined ? { threads } : {}) });
  const endpoints: string[] = [];
  try {
    if (where.socketPath !== undefined) {
      const socketPath = path.resolve(where.socketPath);
      await server.listenUnix(socketPath, tls);
      endpoints.push(`unix:${socketPath}`);
    }
    if (where.listen) {
      const { port } = await server.listenTcp(where.listen.host, where.listen.port, tls);
      endpoints.push(`tcp:${where.listen.host}:${port}`);
    }
  } catch (err) {
    await server.close();
    throw err;
  }
  return { server, endpoints };
}

/**
 * Start a server and keep it in the foreground: print its TLS state and the ready line on
 * stderr, then at SIGINT or SIGTERM stop it (requests in flight finish) and return.
 * `what` says what a client of a plain TCP listener could do, for the warning.
 */
export async function serveInForeground(start: () => Promise<RunningServe>, listen: { host: string; port: number } | undefined, what: string): Promise<void> {
  // Signals are caught before the server listens, so a SIGTERM that arrives right after
  // the ready line still gets an orderly stop (the default action would leave the socket).
  let signalled = false;
  let wake: (() => void) | undefined;
  const onSignal = (): void => {
    signalled = true;
    wake?.();
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  try {
    const running = await start();
    if (listen) {
      const tcp = running.endpoints.find((e) => e.startsWith('tcp:'))!.slice('tcp:'.length);
      const warning = plainTcpWarning(tcp, listen.host, running.tls, what);
      if (warning) process.stderr.write(`bdsnap: WARNING: ${warning}\n`);
    }
    if (running.tls) process.stderr.write(`bdsnap: TLS ${running.tls.mode === 'require' ? 'required' : 'offered'}: ${running.tls.description}\n`);
    const n = running.exportNames.length;
    process.stderr.write(`bdsnap: serving ${n} export${n === 1 ? '' : 's'} on ${running.endpoints.join(', ')}\n`);
    if (!signalled) await new Promise<void>((resolve) => (wake = resolve));
    try {
      await running.stop();
    } catch (err) {
      throw new BdsnapError('EIO', `error while stopping: ${(err as Error).message}`, { cause: err });
    }
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}

/** Most threads plain image files are served on (beyond, the page cache's copies are the limit). */
const MAX_SERVE_THREADS = 4;

/**
 * Threads for plain images (no session: connections share nothing but the files), one per core
 * up to MAX_SERVE_THREADS; BDSNAP_NBD_THREADS sets the count (1: serve on the main thread).
 */
function serveThreads(devices: FileDevice[]): NbdServerOptions['threads'] {
  const asked = process.env.BDSNAP_NBD_THREADS;
  const count = asked !== undefined && /^\d+$/.test(asked) ? Number(asked) : Math.min(os.availableParallelism(), MAX_SERVE_THREADS);
  if (count <= 1) return undefined;
  const exports: ServeWorkerExport[] = devices.map((d) => ({ name: d.path, identity: d.identity, readOnly: d.readOnly }));
  return { count, script: new URL('./serve-worker.js', import.meta.url), exports };
}

export async function startServe(options: ServeOptions): Promise<RunningServe> {
  if (options.images.length === 0) throw new BdsnapError('EINVAL', 'no image to serve');
  if (options.socketPath === undefined && options.listen === undefined) throw new BdsnapError('EINVAL', 'no listener');
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
      exports.push({ name: real, device: options.wrap ? options.wrap(device, real) : device });
    }
    const { server, endpoints } = await listenOn(exports, options, tls, options.wrap === undefined ? serveThreads(opened) : undefined);
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

export function register(program: Command): void {
  const base = program
    .command('serve')
    .description('serve image files or block devices over NBD in the foreground, without the daemon (--snapshot-root adds a session)')
    .argument('<image...>', 'image files or block devices; each is exported under its absolute real path, and the empty export name selects the first')
    .option('--socket <path>', `unix socket to listen on (default: ./${DEFAULT_SOCKET} unless --listen is given)`)
    .option('--listen <host:port>', 'also listen on TCP; a bare port means 127.0.0.1 (TCP is off by default; needs TLS required, or --insecure-tcp)');
  const command = addTlsOptions(base)
    .option('--insecure-tcp', 'allow --listen without TLS required: whoever can connect (every local user, even on 127.0.0.1) can read and write the images')
    .option('--read-only', 'refuse writes (clients see a read-only export)')
    .option('--snapshot-root <dir>', 'open a copy-before-write session per image under DIR for as long as it is served');
  addSessionOptions(command)
    .addHelpText('after', `
Prints "bdsnap: serving N export(s) on ENDPOINTS" on stderr once ready. SIGINT or SIGTERM
finishes the requests in flight, flushes every image and exits 0. NBD has no authentication
of its own, so --listen needs TLS required (certificates or a PSK) or --insecure-tcp, which
prints a warning. TLS, when given, applies to the unix socket too.

Examples:
  bdsnap serve --socket /tmp/nbd.sock disk.img &
  nbdinfo 'nbd+unix:///?socket=/tmp/nbd.sock'
  bdsnap serve --listen 0.0.0.0:10809 --tls-certificates /etc/bdsnap/tls disk.img &
  nbdinfo 'nbds://server/?tls-certificates=/etc/bdsnap/client-tls'
  bdsnap serve --listen 10809 --tls-psk keys.psk disk.img &
  nbdinfo 'nbds://alice@127.0.0.1/?tls-psk-file=keys.psk'`)
    .action(async (images: string[], opts: ServeCliOptions) => {
      const listen = opts.listen !== undefined ? parseListen(opts.listen) : undefined;
      const socketPath = opts.socket ?? (listen ? undefined : DEFAULT_SOCKET);
      const wrap = sessionWrapper(opts);
      await serveInForeground(() => startServe({
        images, socketPath, listen, insecureTcp: opts.insecureTcp ?? false, readOnly: opts.readOnly ?? false, wrap, log: printWarnings,
        tls: tlsSettings(opts),
      }), listen, `${opts.readOnly ? 'read' : 'read and write'} the images`);
    });
}

/** The server's events that an operator must see (a limit reached); the rest stay silent. */
export function printWarnings(event: Record<string, unknown>): void {
  if (event.level === 'warn') process.stderr.write(`bdsnap: warning: ${String(event.message)}\n`);
}

/** The --tls* options, as `serve` and `daemon` take them (nbdkit's names). */
export function addTlsOptions(command: Command): Command {
  return command
    .option('--tls <mode>', 'off, on (the client chooses) or require (every option before STARTTLS is refused); default: require with credentials, else off')
    .option('--tls-certificates <dir>', 'x509: DIR holds server-cert.pem, server-key.pem (mode 600), ca-cert.pem and optionally ca-crl.pem')
    .option('--tls-psk <file>', 'pre-shared keys: username:hexkey lines as psktool writes them (mode 600)')
    .option('--tls-verify-peer', 'demand a client certificate signed by ca-cert.pem');
}

/** The --tls* options as settings; loadTls() checks how they combine. */
export function tlsSettings(opts: TlsCliOptions): TlsSettings {
  if (opts.tls !== undefined && !TLS_MODES.includes(opts.tls as TlsMode)) {
    throw new BdsnapError('EINVAL', `bad --tls "${opts.tls}": expected off, on or require`);
  }
  return { mode: opts.tls as TlsMode | undefined, certificatesDir: opts.tlsCertificates, pskFile: opts.tlsPsk, verifyPeer: opts.tlsVerifyPeer ?? false };
}

export interface TlsCliOptions {
  tls?: string;
  tlsCertificates?: string;
  tlsPsk?: string;
  tlsVerifyPeer?: boolean;
}

interface ServeCliOptions extends SessionCliOptions, TlsCliOptions {
  socket?: string;
  listen?: string;
  insecureTcp?: boolean;
  readOnly?: boolean;
  snapshotRoot?: string;
}

/**
 * With --snapshot-root, each image is served through a copy-before-write session that lasts
 * as long as the server runs; its directory appears with the first modifying request.
 */
function sessionWrapper(opts: ServeCliOptions): ServeOptions['wrap'] {
  if (opts.snapshotRoot === undefined) {
    if (opts.chunkSize ?? opts.sizeLimit) throw new BdsnapError('EINVAL', '--chunk-size and --size-limit need --snapshot-root');
    return undefined;
  }
  if (opts.readOnly) throw new BdsnapError('EINVAL', '--snapshot-root makes no sense with --read-only: nothing can change');
  const base: Omit<SessionOptions, 'devicePath'> = { snapshotRoot: path.resolve(opts.snapshotRoot), ...parseSessionOptions(opts) };
  const report = (event: SessionEvent): void => {
    const dir = event.sessionDir ?? '';
    if (event.type === 'session-start') process.stderr.write(`bdsnap: session started: ${dir}\n`);
    else if (event.type === 'session-failed') process.stderr.write(`bdsnap: session FAILED (${event.reason}); the device carries on without it: ${dir}\n`);
    else if (event.type === 'session-end') process.stderr.write(`bdsnap: session ended: ${dir}\n`);
  };
  return (device, devicePath) => CowDevice.create(device, {
    ...base,
    devicePath,
    deviceIdentity: device instanceof FileDevice ? { ...device.identity } : undefined,
    onEvent: report,
  });
}
