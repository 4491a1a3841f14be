/**
 * Connections served on worker threads: one event loop cannot take in more than about one
 * core's worth of requests, and a client with several connections (nbdcopy opens four) or
 * several clients at once can send more. The server accepts every connection on its own thread
 * (so the connection limit stays one count per process) and hands each one to the worker
 * thread with the fewest, which serves it whole: handshake, requests, replies, until it closes.
 *
 * Invariants:
 * - A socket is owned by exactly one thread: the accepting thread duplicates the descriptor,
 *   closes its own and posts the copy; the worker wraps it in a socket of its own. Nothing on
 *   the accepting thread reads or writes a connection once it is handed over.
 * - Each worker serves with its own buffer pool and an in-flight budget of its share of the
 *   server's: the shares add up to the server's budget, so the process holds no more in
 *   flight than one thread would (a request larger than a share is served alone, as it would
 *   be on one thread).
 * - The connection limit counts descriptors: a handed connection holds its slot until its
 *   worker has closed it, and one shed for the limit is closed before the accepting thread
 *   goes on (it waits on a shared counter the worker sets once the socket is destroyed), as a
 *   connection on the accepting thread would be. Otherwise a flood accepted faster than the
 *   workers read their messages holds far more descriptors than the limit.
 * - Exports with no state shared between connections beyond the file itself are served whole
 *   on the worker (each worker opens its own descriptor of the same file; fdatasync on any of
 *   them makes every completed write durable, so FLUSH on one connection covers the others, as
 *   NBD_FLAG_CAN_MULTI_CONN promises). Exports with shared state (copy-before-write sessions)
 *   stay on the accepting thread, which applies every request; the worker only does the wire's
 *   byte work, through a port to it (remote-exports.ts).
 * - Shutdown: every worker finishes its requests in flight, flushes, closes its connections and
 *   devices, then ends; close() resolves after the last worker has ended.
 */

import net from 'node:net';
import { Worker, parentPort, threadId, workerData, type MessagePort } from 'node:worker_threads';
import { BufferPool } from '../device/buffer-pool.js';
import { InFlightBudget } from './in-flight-budget.js';
import type { ExportProvider, LogFn } from './exports.js';
import { connectionOn, type ServerConnection, type ConnectionContext } from './server-connection.js';
import { SOCKET_HIGH_WATER_MARK_BYTES } from './adopted-socket.js';
import v8 from 'node:v8';
import vm from 'node:vm';
import { loadLibc } from '../host/libc.js';
import { runWarmUp } from './warm-up.js';

/** How long after its last connection closed a worker hands free memory back (its buffers collected by then). */
const TRIM_DELAY_MS = 2000;

/** What the server gives each worker: its limits, and what the worker script needs to open its exports. */
export interface WorkerSettings {
  /** Bytes of free buffers the worker's pool keeps: its share of what one thread would keep. */
  maxPooledBytes: number;
  /**
   * Two Int32s: the last abort the worker answered, and whether it closed that connection (1)
   * or found it past its handshake or already ending (0). The accepting thread waits on the
   * first, so a connection shed for the limit has closed before another is taken.
   */
  aborted: SharedArrayBuffer;
  maxInFlightBytes: number;
  maxInFlightBytesPerConnection: number;
  handshakeTimeoutMs: number;
  sendStallTimeoutMs: number;
  /** The worker script's own data (which files to open...). */
  exports: unknown;
  /** Where the worker's exports are applied, when they live on the accepting thread. */
  ownerPort?: MessagePort;
  /** One Int32: the connections the server has handed to its workers and not yet seen closed (see loneConnection). */
  handedConnections: SharedArrayBuffer;
}

/** Messages from the server to a worker. */
type ToWorker =
  | { type: 'connection'; id: number; fd: number }
  | { type: 'abort'; id: number; reason: string; seq: number }
  | { type: 'shutdown' };

/** Messages from a worker to the server. */
type FromWorker =
  | { type: 'ready' }
  | { type: 'transmission'; id: number }
  | { type: 'closed'; id: number }
  | { type: 'log'; event: Record<string, unknown> }
  | { type: 'failed'; message: string };

/** A connection served on a worker, as the accepting thread sees it. */
export interface HandedConnection {
  readonly id: number;
  /** Handshaking or serving: it holds one of the server's slots. */
  readonly open: boolean;
  readonly inHandshake: boolean;
  abort(reason: string): void;
}

/**
 * How long the accepting thread waits for a worker to close a connection shed for the limit.
 * A worker answers within a turn of its event loop; one that does not (stuck in a long
 * synchronous step) leaves the descriptor open a little longer, and the slot stays taken
 * until it says 'closed'.
 */
const ABORT_WAIT_MS = 1000;

class Remote implements HandedConnection {
  open = true;
  inHandshake = true;
  constructor(readonly id: number, readonly thread: WorkerThread) {}
  #aborted = false;
  abort(reason: string): void {
    if (!this.open || this.#aborted) return;
    this.#aborted = true;
    this.inHandshake = false;
    // The slot goes to a newer connection at once, as on the accepting thread, so its
    // descriptor must be closed first: otherwise a flood accepted faster than the workers
    // read their messages holds far more descriptors than the limit.
    if (this.thread.abortAndWait(this.id, reason)) this.thread.closed(this.id);
  }
}

class WorkerThread {
  readonly worker: Worker;
  readonly connections = new Map<number, Remote>();
  readonly ready: Promise<void>;
  readonly exited: Promise<void>;
  #aborted = new Int32Array(new SharedArrayBuffer(8));
  #abortSeq = 0;
  #onClosed: (c: Remote) => void;
  constructor(script: URL, settings: Omit<WorkerSettings, 'aborted'>, log: LogFn | undefined, onClosed: (c: Remote) => void) {
    this.#onClosed = onClosed;
    const transferList = settings.ownerPort ? [settings.ownerPort] : [];
    this.worker = new Worker(script, { workerData: { ...settings, aborted: this.#aborted.buffer } satisfies WorkerSettings, transferList });
    let ready!: () => void;
    let failed!: (err: Error) => void;
    this.ready = new Promise((resolve, reject) => {
      ready = resolve;
      failed = reject;
    });
    this.worker.on('message', (m: FromWorker) => {
      switch (m.type) {
        case 'ready':
          ready();
          return;
        case 'failed':
          failed(new Error(m.message));
          return;
        case 'log':
          log?.(m.event);
          return;
        case 'transmission': {
          const c = this.connections.get(m.id);
          if (c) c.inHandshake = false;
          return;
        }
        case 'closed':
          this.closed(m.id);
          return;
      }
    });
    this.worker.on('error', (err) => {
      log?.({ event: 'worker-error', level: 'error', error: err.message });
      failed(err);
    });
    this.exited = new Promise((resolve) => {
      this.worker.once('exit', () => {
        failed(new Error('the NBD worker thread ended before it was ready'));
        // A worker that died took its connections with it.
        for (const c of this.connections.values()) {
          c.open = false;
          onClosed(c);
        }
        this.connections.clear();
        resolve();
      });
    });
  }

  post(m: ToWorker): void {
    this.worker.postMessage(m);
  }

  /** The connection's descriptor is closed: its slot is free (once; a later 'closed' is ignored). */
  closed(id: number): void {
    const c = this.connections.get(id);
    if (!c) return;
    this.connections.delete(id);
    c.open = false;
    this.#onClosed(c);
  }

  /**
   * Ask the worker to cut a connection off in its handshake and block until it answers: true
   * when the connection is closed; false when it had gone on to transmission (or is ending, its
   * descriptor still open) or ABORT_WAIT_MS passed.
   */
  abortAndWait(id: number, reason: string): boolean {
    const seq = (this.#abortSeq = (this.#abortSeq + 1) | 0);
    this.post({ type: 'abort', id, reason, seq });
    const deadlineMs = Date.now() + ABORT_WAIT_MS;
    for (;;) {
      const done = Atomics.load(this.#aborted, 0);
      if (((done - seq) | 0) >= 0) return done === seq && Atomics.load(this.#aborted, 1) === 1;
      const leftMs = deadlineMs - Date.now();
      if (leftMs <= 0) return false;
      Atomics.wait(this.#aborted, 0, done, leftMs);
    }
  }
}

/** The accepting thread's side: the workers and the connections handed to them. */
export class ConnectionThreads {
  #threads: WorkerThread[] = [];
  #onClosed: (c: HandedConnection) => void;
  /** The workers read it (loneConnection); only this thread changes it. */
  readonly #handed = new Int32Array(new SharedArrayBuffer(4));

  private constructor(onClosed: (c: HandedConnection) => void) {
    this.#onClosed = (c) => {
      Atomics.sub(this.#handed, 0, 1);
      onClosed(c);
    };
  }

  /**
   * Start `count` workers running `script` (which calls serveHandedConnections) and wait until
   * each is ready. With `ownerPort`, each worker gets a port of its own from it.
   */
  static async start(count: number, script: URL, settings: Omit<WorkerSettings, 'aborted' | 'maxPooledBytes' | 'ownerPort' | 'handedConnections'>, log: LogFn | undefined, onClosed: (c: HandedConnection) => void, ownerPort?: () => MessagePort): Promise<ConnectionThreads> {
    const share = (bytes: number): number => Math.max(1, Math.floor(bytes / count));
    const self = new ConnectionThreads(onClosed);
    const workerSettings = {
      ...settings, maxInFlightBytes: share(settings.maxInFlightBytes), maxPooledBytes: share(settings.maxInFlightBytesPerConnection),
      handedConnections: self.#handed.buffer as SharedArrayBuffer,
    };
    for (let i = 0; i < count; i++) {
      const port = ownerPort?.();
      self.#threads.push(new WorkerThread(script, { ...workerSettings, ...(port ? { ownerPort: port } : {}) }, log, (c) => self.#onClosed(c)));
    }
    try {
      await Promise.all(self.#threads.map((t) => t.ready));
    } catch (err) {
      await Promise.all(self.#threads.map((t) => t.worker.terminate()));
      throw err;
    }
    return self;
  }

  /**
   * Hand an accepted, paused socket to the worker with the fewest connections. Its descriptor
   * is duplicated (by `duplicate`) and this thread's socket destroyed: the worker owns it.
   */
  handOver(id: number, socket: net.Socket, fd: number, duplicate: (fd: number) => number): HandedConnection {
    const thread = this.#threads.reduce((a, b) => (b.connections.size < a.connections.size ? b : a));
    const copy = duplicate(fd);
    socket.destroy();
    const remote = new Remote(id, thread);
    thread.connections.set(id, remote);
    Atomics.add(this.#handed, 0, 1);
    thread.post({ type: 'connection', id, fd: copy });
    return remote;
  }

  /** Let every worker finish its connections (requests in flight, flush) and end. */
  async close(): Promise<void> {
    for (const t of this.#threads) t.post({ type: 'shutdown' });
    await Promise.all(this.#threads.map((t) => t.exited));
  }
}

/**
 * On a worker: whether the server serves one connection alone now (handed to a worker and not
 * closed). Read at each large write (SyncIoPolicy's `queuedWritesOnPool`).
 */
export function loneConnection(settings: WorkerSettings): () => boolean {
  const handed = new Int32Array(settings.handedConnections);
  return () => Atomics.load(handed, 0) === 1;
}

/**
 * The worker's side, called once by the worker script with the exports it opened (from
 * `workerData.exports`), or a function making them with the worker's buffer pool.
 * `closeExports` runs at shutdown, after every connection has ended.
 */
export function serveHandedConnections(
  exports: ExportProvider | ((pool: BufferPool) => ExportProvider), closeExports: () => Promise<void>, warmUp?: (context: ConnectionContext) => Promise<void>,
): void {
  const port = parentPort;
  if (port === null) throw new Error('serveHandedConnections runs on a worker thread');
  const settings = workerData as WorkerSettings;
  const aborted = new Int32Array(settings.aborted);
  const post = (m: FromWorker): void => port.postMessage(m);
  // Which thread served what, for whoever reads the server's log.
  const log: LogFn = (event) => post({ type: 'log', event: { ...event, thread: threadId } });
  const connections = new Map<number, ServerConnection>();
  const pool = new BufferPool(settings.maxPooledBytes);
  const context: ConnectionContext = {
    exports: typeof exports === 'function' ? exports(pool) : exports,
    pool,
    budget: new InFlightBudget(settings.maxInFlightBytes),
    maxInFlightBytes: settings.maxInFlightBytesPerConnection,
    handshakeTimeoutMs: settings.handshakeTimeoutMs,
    sendStallTimeoutMs: settings.sendStallTimeoutMs,
    socketHighWaterMarkBytes: SOCKET_HIGH_WATER_MARK_BYTES,
    log,
    onTransmission: (id) => post({ type: 'transmission', id }),
  };
  let shuttingDown = false;
  let releaseTimer: NodeJS.Timeout | undefined;
  /**
   * What the last clients' requests held goes back to the system, as on the accepting thread.
   * An idle worker allocates nothing, so its garbage (buffers the pool did not keep) would
   * wait for a collection that never comes: it is asked for.
   */
  const releaseMemorySoon = (): void => {
    releaseTimer ??= setTimeout(() => {
      releaseTimer = undefined;
      if (connections.size !== 0) return;
      context.pool.clear();
      collectGarbage();
      loadLibc()?.trimHeap();
    }, TRIM_DELAY_MS).unref();
  };

  const accept = (id: number, fd: number): void => {
    // Paused until adopted, as the server's own accepted sockets are.
    const socket = new net.Socket({ fd, readable: true, writable: true, allowHalfOpen: true, pauseOnCreate: true } as net.SocketConstructorOpts);
    if (shuttingDown) {
      socket.destroy();
      post({ type: 'closed', id });
      return;
    }
    const { connection, reader } = connectionOn(id, socket, context);
    if (reader) {
      reader.resume();
    } else {
      socket.setNoDelay(true);
      socket.resume();
    }
    connections.set(id, connection);
    void connection.closed.then(() => {
      connections.delete(id);
      post({ type: 'closed', id });
      if (connections.size === 0) releaseMemorySoon();
    });
  };

  port.on('message', (m: ToWorker) => {
    switch (m.type) {
      case 'connection':
        accept(m.id, m.fd);
        return;
      case 'abort': {
        // Only in its handshake, as the accepting thread believed: one that went on meanwhile
        // is a client being served. Destroying the socket closes its descriptor before this returns.
        const c = connections.get(m.id);
        const closed = c === undefined || c.inHandshake;
        if (c?.inHandshake) c.abort(m.reason);
        Atomics.store(aborted, 1, closed ? 1 : 0);
        Atomics.store(aborted, 0, m.seq);
        Atomics.notify(aborted, 0);
        return;
      }
      case 'shutdown':
        if (shuttingDown) return;
        shuttingDown = true;
        void Promise.all([...connections.values()].map((c) => c.shutdown()))
          .then(closeExports)
          .catch((err: unknown) => log({ event: 'worker-shutdown-error', level: 'error', error: err instanceof Error ? err.message : String(err) }))
          .finally(() => port.close());
        return;
    }
  });
  void takeLoopReserve()
    .then(() => (warmUp === undefined ? undefined : runWarmUp(warmUp, context, log)))
    .then(() => post({ type: 'ready' }));
}

/**
 * libuv opens a reserve descriptor on an event loop with its first socket (closed to make
 * room when accept() meets EMFILE). Taken before the worker is ready, so that the process's
 * descriptors at rest do not grow by one per thread with the first clients. A listener on a
 * free loopback port, closed at once, is the least that makes one; where it cannot be made
 * the reserve comes with the first connection instead.
 */
function takeLoopReserve(): Promise<void> {
  return new Promise((resolve) => {
    const probe = net.createServer();
    probe.once('error', () => resolve());
    probe.listen({ port: 0, host: '127.0.0.1', exclusive: true }, () => probe.close(() => resolve()));
  });
}

/** A full collection on this thread (V8's gc(), which this flag exposes to contexts made after it is set). */
function collectGarbage(): void {
  v8.setFlagsFromString('--expose-gc');
  (vm.runInNewContext('gc') as () => void)();
}

/** Tell the server this worker could not start (its exports would not open). */
export function failHandedConnections(err: unknown): void {
  parentPort?.postMessage({ type: 'failed', message: err instanceof Error ? err.message : String(err) } satisfies FromWorker);
}
