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
 * The server itself is startServe() (src/service/serve.ts); this module parses and prints,
 * and loads the server and the session engine only when the command runs (not for --help).
 */

import path from 'node:path';
import type { Command } from 'commander';
import { BdsnapError, toBdsnapError } from '../../errors.js';
import { TLS_MODES, type TlsMode, type TlsSettings } from '../../nbd/tls.js';
import type { FileDevice } from '../../device/file-device.js';
import type { RunningServe, ServeOptions } from '../../service/serve.js';
import type { SessionEvent, SessionOptions } from '../../snapshot/index.js';
import { addSessionOptions, parseSessionOptions, type SessionCliOptions } from '../session-options.js';

export const DEFAULT_SOCKET = 'bdsnap.sock';

/** Parse `HOST:PORT`, `[V6]:PORT` or a bare `PORT` (which means 127.0.0.1). */
export function parseListen(text: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]:|([^:]*):)?(\d{1,5})$/.exec(text);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) throw new BdsnapError('EINVAL', `bad --listen "${text}": expected HOST:PORT or PORT`);
  return { host: m[1] ?? (m[2] || '127.0.0.1'), port };
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
      const { plainTcpWarning } = await import('../../nbd/listen.js');
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
    .option('--snapshot-root <dir>', 'open a copy-before-write session per image under DIR for as long as it is served')
    .option('--state-dir <dir>', 'the daemon\'s state directory: an image its instant restore has not finished is refused (default: the daemon\'s, /var/lib/bdsnap)');
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
      const wrap = await sessionWrapper(opts);
      const { startServe } = await import('../../service/serve.js');
      await serveInForeground(() => startServe({
        images, socketPath, listen, insecureTcp: opts.insecureTcp ?? false, readOnly: opts.readOnly ?? false, wrap, log: printWarnings,
        tls: tlsSettings(opts), ...(opts.stateDir !== undefined ? { stateDir: path.resolve(opts.stateDir) } : {}),
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
  stateDir?: string;
}

/**
 * With --snapshot-root, each image is served through a copy-before-write session that lasts
 * as long as the server runs; its directory appears with the first modifying request.
 */
async function sessionWrapper(opts: ServeCliOptions): Promise<ServeOptions['wrap']> {
  if (opts.snapshotRoot === undefined) {
    if (opts.chunkSize ?? opts.sizeLimit) throw new BdsnapError('EINVAL', '--chunk-size and --size-limit need --snapshot-root');
    return undefined;
  }
  if (opts.readOnly) throw new BdsnapError('EINVAL', '--snapshot-root makes no sense with --read-only: nothing can change');
  const snapshotRoot = path.resolve(opts.snapshotRoot);
  const base: Omit<SessionOptions, 'devicePath'> = { snapshotRoot, ...parseSessionOptions(opts) };
  const [{ FileDevice }, { CowDevice }, { refuseUnfinishedRestore }, { ensurePrivateDir }, { WRITE_WATCH_POLL_MS }] = await Promise.all([
    import('../../device/file-device.js'), import('../../snapshot/index.js'), import('../../snapshot/restore/chain.js'), import('../../host/private-dir.js'),
    import('../../host/write-watch.js'),
  ]);
  // As the daemon's: sessions hold the images' original content, and another user who could
  // write here could plant sessions a restore would apply, or read what a session keeps.
  await ensurePrivateDir(snapshotRoot, 0o700).catch((err: unknown) => {
    const e = toBdsnapError(err);
    throw new BdsnapError(e.code, `--snapshot-root: ${e.message}`, { cause: err });
  });
  const report = (event: SessionEvent): void => {
    const dir = event.sessionDir ?? '';
    if (event.type === 'session-start') process.stderr.write(`bdsnap: session started: ${dir}\n`);
    else if (event.type === 'session-failed') process.stderr.write(`bdsnap: session FAILED (${event.reason}); the device carries on without it: ${dir}\n`);
    else if (event.type === 'session-end') process.stderr.write(`bdsnap: session ended: ${dir}\n`);
  };
  // The device is open (its lock held): one an interrupted restore left half way would start
  // a session recording neither state, and serve it.
  return async (device, devicePath) => {
    await refuseUnfinishedRestore(snapshotRoot, devicePath);
    const watch = device instanceof FileDevice ? watchWritesAround(device, devicePath, WRITE_WATCH_POLL_MS) : undefined;
    const cow = CowDevice.create(device, {
      ...base,
      devicePath,
      deviceIdentity: device instanceof FileDevice ? { ...device.identity } : undefined,
      onEvent: report,
      ...(watch !== undefined ? { checkWrittenAround: () => watch.stop() } : {}),
    });
    watch?.start((reason) => cow.writtenAround(reason));
    return cow;
  };
}

/**
 * The session's watch of writes by other processes to `device` (src/host/write-watch.ts): read
 * every `everyMs` and once more when the session closes (stop() returns the reason, if any).
 * Where writes cannot be watched (not root), says so once on stderr.
 */
function watchWritesAround(
  device: FileDevice, devicePath: string, everyMs: number,
): { start: (onFound: (reason: string) => void) => void; stop: () => Promise<string | undefined> } | undefined {
  const watch = device.watchWrites();
  if ('reason' in watch) {
    process.stderr.write(`bdsnap: warning: writes by other processes to ${devicePath} during the session are not watched (${watch.reason}); only the image's stamps tell them\n`);
    return undefined;
  }
  let timer: NodeJS.Timeout | undefined;
  const read = (): Promise<string | undefined> => watch.check(devicePath, 'while bdsnap served it', 'the session');
  return {
    start: (onFound) => {
      timer = setInterval(() => {
        void read().then((reason) => {
          if (reason !== undefined) onFound(reason);
        });
      }, everyMs).unref();
    },
    stop: async () => {
      clearInterval(timer);
      const reason = await read();
      watch.close();
      return reason;
    },
  };
}
