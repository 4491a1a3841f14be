/**
 * NbdServer: listens on unix sockets and/or TCP and runs one ServerConnection per client.
 * It knows nothing of files or sessions: exports come from an ExportProvider.
 *
 * close() stops accepting, lets every connection finish its requests in flight, flushes
 * each device, closes the connections and waits until every export handle is released.
 *
 * Limits, so that a few bytes from many clients cannot take the server's memory or its
 * descriptors (every default is far above what nbdcopy, qemu-img or the kernel through
 * nbdfuse ever use, so a real client never meets one):
 * - one in-flight byte budget shared by all connections (requests wait for it, never refused);
 * - a connection limit. A connection beyond it is not left in the kernel's backlog (where it
 *   would wait for a slot that idle clients may hold forever): it takes the slot of the oldest
 *   connection still in its handshake, which is closed, or is closed at once when every
 *   connection is past its handshake. A real client finishes its handshake in milliseconds, so
 *   a flood of connections that never finish theirs cannot lock it out.
 * - a handshake deadline and a send-stall deadline per connection (see server-connection.ts).
 */

import fs from 'node:fs';
import nodePath from 'node:path';
import net from 'node:net';
import { BdsnapError } from '../errors.js';
import { listenServer, listenUnixSocket, socketFd } from '../unix-socket.js';
import type { ExportProvider, LogFn } from './exports.js';
import { connectionOn, ServerConnection, type ConnectionContext } from './server-connection.js';
import { InFlightBudget } from './in-flight-budget.js';
import { BufferPool } from '../device/buffer-pool.js';
import { loadLibc, trimHeapSoon } from '../host/libc.js';
import type { NbdTls } from './tls.js';
import { LISTENER_OPTIONS, SOCKET_HIGH_WATER_MARK_BYTES } from './adopted-socket.js';
import { ConnectionThreads, type HandedConnection } from './connection-threads.js';
import { ExportHost } from './remote-exports.js';
import { runWarmUp } from './warm-up.js';

export { adoptWithReadBuffer, type ReadSink } from './adopted-socket.js';

export interface NbdServerOptions {
  exports: ExportProvider;
  log?: LogFn;
  /** Bytes of requests and unsent replies per connection before reading pauses. Default 64 MiB. */
  maxInFlightBytesPerConnection?: number;
  /** The same, for all connections together (a request larger than it is served alone). Default 256 MiB. */
  maxInFlightBytes?: number;
  /** Connections open at once (handshaking or serving). Default 256. */
  maxConnections?: number;
  /** Time a client has from connecting to the end of its handshake. Default 10 s. */
  handshakeTimeoutMs?: number;
  /** Time a reply may wait with none of it taken by the client before it is cut off. Default 120 s. */
  sendStallTimeoutMs?: number;
  /**
   * Serve plain (non-TLS) connections on `count` worker threads running `script`, which opens
   * the exports from `exports` and calls serveHandedConnections (see connection-threads.ts).
   * Only for exports whose connections share nothing but the file. Default: this thread.
   * `{ count, owner: true }` instead keeps the exports on this thread, which applies every
   * request, and has the workers do only the wire's byte work (remote-exports.ts).
   */
  threads?: { count: number; script: URL; exports: unknown } | { count: number; owner: true };
  /**
   * Run this thread's request path on a scratch device before the first listener takes a
   * client (see warm-up.ts), when its connections are served here; given this thread's
   * context. A failure is logged and the server serves anyway.
   */
  warmUp?: (context: ConnectionContext) => Promise<void>;
}

const DEFAULT_MAX_IN_FLIGHT_BYTES_PER_CONNECTION = 64 * 1024 * 1024;
export const DEFAULT_MAX_IN_FLIGHT_BYTES = 256 * 1024 * 1024;
export const DEFAULT_MAX_CONNECTIONS = 256;
export const DEFAULT_HANDSHAKE_TIMEOUT_MS = 10_000;
export const DEFAULT_SEND_STALL_TIMEOUT_MS = 120_000;
/**
 * Send buffer asked for on unix-socket connections. With the default (208 KiB) a 1 MiB read
 * reply leaves in five or more writes, each waiting for the client to drain the last; with
 * 4 MiB it leaves in one (measured: fio's sequential 1 MiB reads at depth 4 went from about
 * 2,700 to 4,000-4,300 MB/s). The kernel caps it at net.core.wmem_max. TCP keeps the
 * kernel's autotuning.
 */
const UNIX_SEND_BUFFER_BYTES = 4 * 1024 * 1024;
/** In-flight bytes that make a burst whose memory is handed back to the system afterwards. */
const BURST_BYTES = 16 * 1024 * 1024;
const TRIM_DELAY_MS = 2000;
/** Connections in their handshake closed at most for one new connection before it is refused. */
const MAX_SHED_ATTEMPTS = 4;

export class NbdServer {
  #log: LogFn | undefined;
  #context: ConnectionContext;
  #maxConnections: number;
  #listeners: net.Server[] = [];
  /** In the order they were accepted, so the first handshaking one is the oldest. */
  #connections = new Set<ServerConnection | HandedConnection>();
  #threadOptions: NbdServerOptions['threads'];
  #warmUp: NbdServerOptions['warmUp'];
  #threads: Promise<ConnectionThreads> | undefined;
  #nextConnectionId = 1;
  #closing = false;
  #atLimit = false;

  constructor(options: NbdServerOptions) {
    this.#log = options.log;
    const perConnection = positive('maxInFlightBytesPerConnection', options.maxInFlightBytesPerConnection ?? DEFAULT_MAX_IN_FLIGHT_BYTES_PER_CONNECTION);
    const total = positive('maxInFlightBytes', options.maxInFlightBytes ?? DEFAULT_MAX_IN_FLIGHT_BYTES);
    this.#maxConnections = positive('maxConnections', options.maxConnections ?? DEFAULT_MAX_CONNECTIONS);
    this.#context = {
      exports: options.exports,
      pool: new BufferPool(perConnection),
      budget: new InFlightBudget(total, { bytes: BURST_BYTES, over: () => this.#trimSoon() }),
      maxInFlightBytes: perConnection,
      handshakeTimeoutMs: positive('handshakeTimeoutMs', options.handshakeTimeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT_MS),
      sendStallTimeoutMs: positive('sendStallTimeoutMs', options.sendStallTimeoutMs ?? DEFAULT_SEND_STALL_TIMEOUT_MS),
      socketHighWaterMarkBytes: SOCKET_HIGH_WATER_MARK_BYTES,
      log: options.log,
    };
    if (options.threads !== undefined && options.threads.count > 1) this.#threadOptions = options.threads;
    this.#warmUp = options.warmUp;
  }

  /** This thread's warm-up, once, before its first listener whose connections it serves itself. */
  async #warmedUp(): Promise<void> {
    const warmUp = this.#warmUp;
    if (warmUp === undefined) return;
    this.#warmUp = undefined;
    await runWarmUp(warmUp, this.#context, (event) => this.#log?.(event));
  }

  /** The worker threads, started with the first listener (so that a failure to start is the caller's). */
  #startThreads(): Promise<ConnectionThreads> | undefined {
    const t = this.#threadOptions;
    if (t === undefined || loadLibc() === undefined) return undefined;
    if (this.#threads !== undefined) return this.#threads;
    const host = 'owner' in t ? new ExportHost(this.#context.exports, this.#log) : undefined;
    this.#threads = ConnectionThreads.start(t.count, 'owner' in t ? new URL('./remote-worker.js', import.meta.url) : t.script, {
      maxInFlightBytes: this.#context.budget.limitBytes,
      maxInFlightBytesPerConnection: this.#context.maxInFlightBytes,
      handshakeTimeoutMs: this.#context.handshakeTimeoutMs,
      sendStallTimeoutMs: this.#context.sendStallTimeoutMs,
      exports: 'owner' in t ? undefined : t.exports,
    }, this.#log, (c) => this.#closed(c), host ? () => host.connect() : undefined);
    return this.#threads;
  }

  /**
   * A burst's buffers are freed to malloc, which keeps their pages: small ones come from the heap
   * that only shrinks from its top, and a fuzz run of a million frames left 36 MB there for good.
   * Once a burst is over, or the last client has gone (and their buffers were collected, given
   * a moment), the pages go back.
   */
  #trimSoon(): void {
    trimHeapSoon(TRIM_DELAY_MS);
  }

  get connectionCount(): number {
    return this.#connections.size;
  }

  /** Bytes all connections hold from the in-flight budget now. */
  get inFlightBytes(): number {
    return this.#context.budget.usedBytes;
  }

  /**
   * Listen on a unix socket, created mode 0600. A stale socket file (nobody listening) is
   * replaced; a live one is EBUSY; any other file there is EINVAL. With `tls`, its clients
   * may (or, in `require` mode, must) start TLS.
   */
  async listenUnix(path: string, tls?: NbdTls): Promise<void> {
    const dir = nodePath.dirname(path);
    if (!fs.existsSync(dir)) throw new BdsnapError('ENOENT', `cannot listen on ${path}: the directory ${dir} does not exist`);
    const threads = tls === undefined ? await this.#startThreads() : undefined;
    if (threads === undefined) await this.#warmedUp();
    const server = this.#createServer(true, tls, threads);
    await listenUnixSocket(server, path);
    this.#log?.({ event: 'listening', unix: path, tls: tls?.mode ?? 'off' });
  }

  /** Listen on TCP (port 0 picks a free port). Resolves with the port bound. */
  async listenTcp(host: string, port: number, tls?: NbdTls): Promise<{ port: number }> {
    if (!Number.isInteger(port) || port < 0 || port > 65535) throw new BdsnapError('EINVAL', `bad TCP port ${port}`);
    const threads = tls === undefined ? await this.#startThreads() : undefined;
    if (threads === undefined) await this.#warmedUp();
    const server = this.#createServer(false, tls, threads);
    await listenServer(server, () => server.listen(port, host));
    const address = server.address() as net.AddressInfo;
    this.#log?.({ event: 'listening', host, port: address.port, tls: tls?.mode ?? 'off' });
    return { port: address.port };
  }

  async close(): Promise<void> {
    this.#closing = true;
    const stopped = this.#listeners.map((s) => new Promise<void>((resolve) => s.close(() => resolve())));
    this.#listeners = [];
    await Promise.all([...this.#connections].map((c) => (c instanceof ServerConnection ? c.shutdown() : undefined)));
    if (this.#threads !== undefined) await (await this.#threads).close();
    await Promise.all(stopped);
  }

  #createServer(unix: boolean, tls: NbdTls | undefined, threads: ConnectionThreads | undefined): net.Server {
    if (this.#closing) throw new BdsnapError('ESHUTDOWN', 'the NBD server is closing');
    const server = net.createServer(LISTENER_OPTIONS, (socket) => this.#accept(socket, unix, tls, threads));
    server.on('error', (err) => this.#log?.({ event: 'listener-error', error: err.message }));
    this.#listeners.push(server);
    return server;
  }

  #accept(socket: net.Socket, unix: boolean, tls: NbdTls | undefined, threads: ConnectionThreads | undefined): void {
    if (this.#closing || !this.#makeRoom()) {
      socket.destroy();
      return;
    }
    const fd = socketFd(socket);
    const libc = loadLibc();
    // A hint: where it cannot be set (no libc binding), the connection works as before.
    if (unix && fd !== undefined) libc?.setSendBuffer(fd, UNIX_SEND_BUFFER_BYTES);
    const id = this.#nextConnectionId++;
    this.#log?.({ event: 'connection-opened', connection: id, remote: socket.remoteAddress ?? 'unix' });
    if (threads !== undefined && fd !== undefined && libc !== undefined) {
      this.#connections.add(threads.handOver(id, socket, fd, (n) => libc.duplicate(n)));
      return;
    }
    const { connection, reader } = connectionOn(id, socket, this.#context, tls);
    if (!reader) socket.resume();
    this.#connections.add(connection);
    void connection.closed.then(() => this.#closed(connection));
  }

  #closed(connection: ServerConnection | HandedConnection): void {
    this.#connections.delete(connection);
    if (this.#connections.size === 0) this.#trimSoon();
  }

  /**
   * Whether a new connection may be served: there is a free slot, or the oldest connection
   * still in its handshake gave up its slot. Says so (once per episode) when the limit is met.
   */
  #makeRoom(): boolean {
    // A connection on a worker thread may have left its handshake before the worker reads the
    // abort: it stays, and the next oldest is tried (a few times: each try waits on a worker).
    for (let attempt = 0; attempt < MAX_SHED_ATTEMPTS; attempt++) {
      let open = 0;
      let oldestHandshaking: ServerConnection | HandedConnection | undefined;
      for (const c of this.#connections) {
        if (!c.open) continue;
        open++;
        if (c.inHandshake) oldestHandshaking ??= c;
      }
      if (open < this.#maxConnections) {
        this.#atLimit = false;
        return true;
      }
      if (!this.#atLimit) {
        this.#atLimit = true;
        this.#log?.({
          event: 'connection-limit', level: 'warn', limit: this.#maxConnections,
          message: `${this.#maxConnections} NBD connections are open: a new one now closes the oldest still in its handshake, or is closed at once if there is none`,
        });
      }
      if (oldestHandshaking === undefined) break;
      oldestHandshaking.abort('connection limit: the slot went to a newer connection');
    }
    this.#log?.({ event: 'connection-refused', reason: 'connection limit' });
    return false;
  }
}

function positive(name: string, value: number): number {
  if (!Number.isSafeInteger(value) || value <= 0) throw new BdsnapError('EINVAL', `bad ${name} ${value}`);
  return value;
}
