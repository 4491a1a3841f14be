/**
 * The daemon's control socket: `<run-dir>/control.sock`, mode 0600 in a 0700 directory, so
 * the kernel lets only root (the owner) connect: that is the first line. The second is the
 * peer's effective uid, read from the kernel (SO_PEERCRED, see peer-cred.ts) when the
 * connection is accepted: a peer that is neither root nor the daemon's own user is refused.
 *
 * Fail closed: where the peer's credentials cannot be read (the optional koffi binding is
 * missing or does not load), every request but `ping` is refused with EPERM and the reason,
 * rather than trusting the socket permission alone. Requests carry no uid of their own.
 *
 * A handler learns who asked (the kernel's record of the peer) and can tie something to the
 * connection's lifetime (onClose): a `backup create` keeps its connection open while it reads
 * its snapshot, so the connection closing (the process ended, killed or not) is its end.
 *
 * Requests on a connection run one at a time, in order. Nothing a client sends can crash the
 * daemon: bad JSON, unknown operations, wrong types and overlong lines all get error answers,
 * and a client that does not read its answers is no longer read (test/fuzz/ checks all this).
 */

import net from 'node:net';
import type { Logger } from 'pino';
import { BdsnapError, toBdsnapError } from '../errors.js';
import { listenUnixSocket } from '../unix-socket.js';
import { ensurePrivateDir } from '../host/private-dir.js';
import { LineDecoder, requestSchema, type LineEvent, type Request, type Response } from './control-protocol.js';
import { peerCredentials, type PeerCheck, type PeerCredentialSource } from './peer-cred.js';
import path from 'node:path';

/** The connection a request came on. */
export interface Caller {
  readonly peer: PeerCheck;
  /**
   * Run `fn` once the connection has closed (the peer closed it or ended, or the server
   * stopped); at once if it has already.
   */
  onClose(fn: () => void): void;
}

export type RequestHandler = (request: Request, caller: Caller) => Promise<unknown>;

/** Largest number of answers queued on one connection before it is dropped (a client not reading). */
const MAX_QUEUED_REQUESTS = 64;

export class ControlServer {
  readonly socketPath: string;
  readonly #server: net.Server;
  readonly #handler: RequestHandler;
  readonly #log: Logger;
  readonly #sockets = new Set<net.Socket>();
  readonly #allowedUids: Set<number>;
  readonly #peerSource: PeerCredentialSource;
  #warnedUnknownPeer = false;

  private constructor(socketPath: string, handler: RequestHandler, log: Logger, peerSource: PeerCredentialSource) {
    this.socketPath = socketPath;
    this.#handler = handler;
    this.#log = log;
    this.#peerSource = peerSource;
    const self = process.geteuid?.() ?? 0;
    this.#allowedUids = new Set([0, self]);
    this.#server = net.createServer((socket) => this.#accept(socket));
  }

  /** `peerSource` is for tests (the fail-closed path); the daemon uses the kernel's answer. */
  static async listen(socketPath: string, handler: RequestHandler, log: Logger, peerSource: PeerCredentialSource = peerCredentials): Promise<ControlServer> {
    await ensurePrivateDir(path.dirname(socketPath), 0o700);
    const server = new ControlServer(socketPath, handler, log, peerSource);
    await listenUnixSocket(server.#server, socketPath);
    return server;
  }

  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.#server.close(() => resolve()));
    for (const s of this.#sockets) s.destroy();
    await closed;
  }

  #accept(socket: net.Socket): void {
    this.#sockets.add(socket);
    const decoder = new LineDecoder();
    // Read once, at accept: the kernel's record of who connected does not change afterwards.
    const peer = this.#readPeer(socket);
    const closeHooks: Array<() => void> = [];
    let closed = false;
    const caller: Caller = {
      peer,
      onClose: (fn) => {
        if (closed) fn();
        else closeHooks.push(fn);
      },
    };
    // Requests not started yet. A client that leaves takes them with it: nobody would read the
    // answers, and running them would keep the connection's lines (up to 64 KiB each) alive
    // behind a slow request such as a password check.
    const waiting: LineEvent[] = [];
    let running = false;
    const runWaiting = async (): Promise<void> => {
      running = true;
      try {
        for (let event = waiting.shift(); event !== undefined && !socket.destroyed; event = waiting.shift()) {
          const response = await this.#answer(event.kind === 'line' ? event.text : undefined, event.kind === 'oversized' ? event.bytes : 0, caller);
          if (socket.destroyed) break;
          // Backpressure: a client that does not read its answers stops being read, so the daemon
          // holds at most one socket buffer of answers for it instead of an unbounded queue.
          if (!socket.write(`${JSON.stringify(response)}\n`)) socket.pause();
        }
      } finally {
        waiting.length = 0;
        running = false;
      }
    };
    socket.on('drain', () => socket.resume());
    socket.on('data', (chunk: Buffer) => {
      for (const event of decoder.push(chunk)) {
        if (waiting.length + (running ? 1 : 0) >= MAX_QUEUED_REQUESTS) {
          this.#log.warn({ event: 'control-flood' }, 'control client sent too many requests without reading answers; dropped');
          socket.destroy();
          return;
        }
        waiting.push(event);
      }
      if (!running && waiting.length > 0) void runWaiting();
    });
    socket.on('error', () => socket.destroy());
    socket.on('close', () => {
      waiting.length = 0;
      this.#sockets.delete(socket);
      closed = true;
      for (const fn of closeHooks.splice(0)) fn();
    });
  }

  #readPeer(socket: net.Socket): PeerCheck {
    try {
      return this.#peerSource(socket);
    } catch (err) {
      return { kind: 'unknown', reason: String(err) };
    }
  }

  async #answer(line: string | undefined, oversizedBytes: number, caller: Caller): Promise<Response> {
    if (line === undefined) {
      return fail(null, new BdsnapError('EINVAL', `request line too long (${oversizedBytes}+ bytes; the limit is 64 KiB)`));
    }
    let json: unknown;
    try {
      json = JSON.parse(line);
    } catch {
      return fail(null, new BdsnapError('EINVAL', 'request is not valid JSON'));
    }
    const id = typeof (json as { id?: unknown })?.id === 'number' ? (json as { id: number }).id : null;
    const parsed = requestSchema.safeParse(json);
    if (!parsed.success) {
      const issue = parsed.error.issues[0];
      const where = issue?.path.length ? ` at ${issue.path.join('.')}` : '';
      return fail(id, new BdsnapError('EINVAL', `malformed request${where}: ${issue?.message ?? 'invalid'}`));
    }
    const request = parsed.data;
    const denied = this.#checkCaller(request, caller.peer);
    if (denied) return fail(request.id, denied);
    try {
      return { id: request.id, ok: true, result: await this.#handler(request, caller) };
    } catch (err) {
      const e = toBdsnapError(err);
      return fail(request.id, e);
    }
  }

  #checkCaller(request: Request, peer: PeerCheck): BdsnapError | undefined {
    if (peer.kind === 'known') {
      if (this.#allowedUids.has(peer.cred.uid)) return undefined;
      this.#log.warn({ event: 'control-refused', op: request.op, peerPid: peer.cred.pid, euid: peer.cred.uid }, 'control request from a non-root process refused');
      return new BdsnapError('EPERM', 'permission denied: bdsnap control operations need root');
    }
    if (!this.#warnedUnknownPeer) {
      this.#warnedUnknownPeer = true;
      this.#log.error({ event: 'peer-unknown', reason: peer.reason }, 'cannot read control peers\' credentials; refusing every request but ping');
    }
    // Ping answers nothing secret and lets `bdsnap status`-style probes tell "down" from "refused".
    if (request.op === 'ping') return undefined;
    return new BdsnapError('EPERM', `permission denied: the daemon cannot verify the caller's credentials (${peer.reason}); install the optional dependency koffi`);
  }
}

function fail(id: number | null, err: BdsnapError): Response {
  return { id, ok: false, error: { code: err.code, message: err.message } };
}
