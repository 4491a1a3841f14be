/** Shared fixtures for the NBD tests: a served temp image, and a raw socket speaking bytes by hand. */

import net from 'node:net';
import path from 'node:path';
import type { BlockDevice } from '../../src/device/block-device.js';
import { FileDevice } from '../../src/device/file-device.js';
import { NbdServer, type NbdServerOptions } from '../../src/nbd/server.js';
import { StaticExports } from '../../src/nbd/static-exports.js';
import type { MetaContextSource } from '../../src/nbd/exports.js';
import type { NbdTls } from '../../src/nbd/tls.js';
import { NbdClient, type NbdClientOptions } from '../../src/nbd/client.js';
import * as C from '../../src/nbd/constants.js';
import { encodeClientFlags, encodeOption } from '../../src/nbd/encoders.js';
import { cleanupOf } from '../../testkit/cleanup.js';
import { makeImage, makeTempDir, type AfterHook } from '../../testkit/files.js';
import { until } from '../helpers/poll.js';

export interface TestContext {
  after: (fn: () => unknown) => void;
}

export interface Served {
  dir: string;
  image: string;
  socketPath: string;
  device: FileDevice;
  exports: StaticExports;
  server: NbdServer;
  events: Array<Record<string, unknown>>;
  connect(options?: Partial<NbdClientOptions>): Promise<NbdClient>;
}

/** A temporary directory removed after the test (the one implementation is testkit/files.ts). */
export function tempDir(t: AfterHook, prefix = 'bdsnap-nbd-'): string {
  return makeTempDir(t, prefix);
}

/**
 * A FileDevice on a temp image of `sizeBytes` (filled by `fill`), served on a fresh unix socket,
 * with `metaContexts` offered besides base:allocation.
 */
export async function serveImage(
  t: TestContext,
  options: {
    sizeBytes?: number; readOnly?: boolean; fill?: (b: Buffer) => void; maxInFlightBytesPerConnection?: number; metaContexts?: MetaContextSource[];
    /** The server's other limits (budget, connections, deadlines). */
    limits?: Pick<NbdServerOptions, 'maxInFlightBytes' | 'maxConnections' | 'handshakeTimeoutMs' | 'sendStallTimeoutMs'>;
    /** Serve a wrapper of the file device instead of the device itself. */
    wrap?: (device: FileDevice) => BlockDevice;
    /** Serve connections on this many worker threads, the requests applied on this one (as the daemon does). */
    ownerThreads?: number;
    /** Serve with TLS as loaded (clients then connect with `tls` options). */
    tls?: NbdTls;
  } = {},
): Promise<Served> {
  const dir = tempDir(t);
  const image = makeImage(path.join(dir, 'disk.img'), options.sizeBytes ?? 1 << 20, options.fill ?? 0);
  const device = await FileDevice.open(image, { readOnly: options.readOnly ?? false });
  const exports = new StaticExports([{ name: image, device: options.wrap?.(device) ?? device, description: 'test image', ...(options.metaContexts ? { metaContexts: options.metaContexts } : {}) }]);
  const events: Array<Record<string, unknown>> = [];
  const server = new NbdServer({
    exports, log: (e) => events.push(e), maxInFlightBytesPerConnection: options.maxInFlightBytesPerConnection, ...options.limits,
    ...(options.ownerThreads !== undefined ? { threads: { count: options.ownerThreads, owner: true } } : {}),
  });
  const socketPath = path.join(dir, 'nbd.sock');
  await server.listenUnix(socketPath, options.tls);
  const clients: NbdClient[] = [];
  // On the test's cleanup stack, so the server stops before its directory is removed.
  cleanupOf(t).after(async () => {
    for (const c of clients) c.close().catch(() => undefined);
    await server.close();
    await device.close();
  });
  return {
    dir, image, socketPath, device, exports, server, events,
    connect: async (o = {}) => {
      const c = await NbdClient.connect({ socketPath, ...o });
      clients.push(c);
      return c;
    },
  };
}

/** A socket that collects every byte received, for speaking the protocol by hand. */
export class RawPeer {
  readonly socket: net.Socket;
  #received: Buffer[] = [];
  #length = 0;
  #waiters: Array<() => void> = [];
  closed: Promise<void>;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.on('data', (c: Buffer) => {
      this.#received.push(c);
      this.#length += c.length;
      for (const w of this.#waiters.splice(0)) w();
    });
    socket.on('error', () => undefined);
    this.closed = new Promise((resolve) => socket.once('close', () => {
      for (const w of this.#waiters.splice(0)) w();
      resolve();
    }));
  }

  static async connect(socketPath: string): Promise<RawPeer> {
    const socket = net.connect(socketPath);
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    return new RawPeer(socket);
  }

  /** Read exactly n bytes (rejects if the socket closes first). */
  async read(n: number, timeoutMs = 5000): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.#length < n) {
      if (this.socket.destroyed || this.socket.readableEnded) throw new Error(`socket closed after ${this.#length} of ${n} bytes`);
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${n} bytes (have ${this.#length})`);
      await new Promise<void>((resolve) => {
        this.#waiters.push(resolve);
        setTimeout(resolve, 50);
      });
    }
    const all = Buffer.concat(this.#received);
    this.#received = [all.subarray(n)];
    this.#length -= n;
    return all.subarray(0, n);
  }

  write(b: Buffer): void {
    this.socket.write(b);
  }

  /** Greeting, client flags with NO_ZEROES, then NBD_OPT_EXPORT_NAME: ready for requests. */
  async enterTransmission(exportName = ''): Promise<{ sizeBytes: number; flags: number }> {
    await this.read(18);
    this.write(encodeClientFlags(C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES));
    this.write(encodeOption(C.NBD_OPT_EXPORT_NAME, Buffer.from(exportName)));
    const r = await this.read(10);
    return { sizeBytes: Number(r.readBigUInt64BE(0)), flags: r.readUInt16BE(8) };
  }

  destroy(): void {
    this.socket.destroy();
  }
}

/** Poll until `cond` holds (or fail after timeoutMs). */
export function waitFor(cond: () => boolean, timeoutMs = 5000, what = 'condition'): Promise<void> {
  return until(what, cond, timeoutMs);
}
