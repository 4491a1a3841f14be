/**
 * The daemon's control socket: `<run-dir>/control.sock`, mode 0600 in a 0700 directory, so
 * the kernel lets only root (the owner) connect. Each connection's peer is also looked up
 * (see peer-cred.ts) and any process whose effective uid is not root's is refused; a request
 * also carries the sender's euid, refused when not 0. Where the peer cannot be identified the
 * socket permission is the guard, and the daemon logs that once.
 *
 * Requests on a connection run one at a time, in order. Nothing a client sends can crash the
 * daemon: bad JSON, unknown operations, wrong types and overlong lines all get error answers.
 */

import net from 'node:net';
import type { Logger } from 'pino';
import { BdsnapError, toBdsnapError } from '../errors.js';
import { listenUnixSocket } from '../unix-socket.js';
import { ensurePrivateDir } from '../host/private-dir.js';
import { LineDecoder, requestSchema, type Request, type Response } from './control-protocol.js';
import { peerCredentials, type PeerCheck } from './peer-cred.js';
import path from 'node:path';

export type RequestHandler = (request: Request) => Promise<unknown>;

/** Largest number of answers queued on one connection before it is dropped (a client not reading). */
const MAX_QUEUED_REQUESTS = 64;

export class ControlServer {
  readonly socketPath: string;
  readonly #server: net.Server;
  readonly #handler: RequestHandler;
  readonly #log: Logger;
  readonly #sockets = new Set<net.Socket>();
  readonly #allowedUids: Set<number>;
  #warnedUnknownPeer = false;

  private constructor(socketPath: string, handler: RequestHandler, log: Logger) {
    this.socketPath = socketPath;
    this.#handler = handler;
    this.#log = log;
    const self = process.geteuid?.() ?? 0;
    this.#allowedUids = new Set([0, self]);
    this.#server = net.createServer((socket) => this.#accept(socket));
  }

  static async listen(socketPath: string, handler: RequestHandler, log: Logger): Promise<ControlServer> {
    await ensurePrivateDir(path.dirname(socketPath), 0o700);
    const server = new ControlServer(socketPath, handler, log);
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
    const peer = peerCredentials(socket).catch((err: unknown): PeerCheck => ({ kind: 'unknown', reason: String(err) }));
    let chain: Promise<void> = Promise.resolve();
    let queued = 0;
    const send = (response: Response): void => {
      if (!socket.destroyed) socket.write(`${JSON.stringify(response)}\n`);
    };
    socket.on('data', (chunk: Buffer) => {
      for (const event of decoder.push(chunk)) {
        if (++queued > MAX_QUEUED_REQUESTS) {
          this.#log.warn({ event: 'control-flood' }, 'control client sent too many requests without reading answers; dropped');
          socket.destroy();
          return;
        }
        chain = chain.then(async () => {
          try {
            send(await this.#answer(event.kind === 'line' ? event.text : undefined, event.kind === 'oversized' ? event.bytes : 0, peer));
          } finally {
            queued--;
          }
        });
      }
    });
    socket.on('error', () => socket.destroy());
    socket.on('close', () => this.#sockets.delete(socket));
  }

  async #answer(line: string | undefined, oversizedBytes: number, peer: Promise<PeerCheck>): Promise<Response> {
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
    const denied = await this.#checkCaller(request, await peer);
    if (denied) return fail(request.id, denied);
    try {
      return { id: request.id, ok: true, result: await this.#handler(request) };
    } catch (err) {
      const e = toBdsnapError(err);
      return fail(request.id, e);
    }
  }

  async #checkCaller(request: Request, peer: PeerCheck): Promise<BdsnapError | undefined> {
    if (peer.kind === 'known') {
      const bad = peer.euids.find((uid) => !this.#allowedUids.has(uid));
      if (bad !== undefined) {
        this.#log.warn({ event: 'control-refused', op: request.op, pids: peer.pids, euid: bad }, 'control request from a non-root process refused');
        return new BdsnapError('EPERM', 'permission denied: bdsnap control operations need root');
      }
    } else if (!this.#warnedUnknownPeer) {
      this.#warnedUnknownPeer = true;
      this.#log.warn({ event: 'peer-unknown', reason: peer.reason }, 'cannot identify control peers; relying on the socket permission (0600, root)');
    }
    if (!this.#allowedUids.has(request.euid)) {
      return new BdsnapError('EPERM', 'permission denied: bdsnap control operations need root');
    }
    return undefined;
  }
}

function fail(id: number | null, err: BdsnapError): Response {
  return { id, ok: false, error: { code: err.code, message: err.message } };
}
