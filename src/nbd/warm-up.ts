/**
 * A server thread's request path, run before its first client: a private connection over a
 * unix socket in a directory of the caller's, serving a scratch device the caller made, carries
 * the requests clients send most (large and small writes, then reads, a few in flight, a
 * FLUSH). Measured with nbdcopy's four connections, a thread that served this first then
 * served clients about a quarter faster, on its first copy and on the ones after: what V8
 * compiles for a thread follows what the thread ran first, and a cold thread compiles its
 * path from the first client's opening requests, then deoptimises and compiles it again as
 * other sizes and replies come. It never touches a client's export, and a failure here only
 * leaves the thread cold.
 */

import net from 'node:net';
import nodePath from 'node:path';
import type { BlockDevice } from '../device/block-device.js';
import { withTimeout } from '../timeout.js';
import { NbdClient } from './client.js';
import { connectionOn, type ConnectionContext } from './server-connection.js';
import { StaticExports } from './static-exports.js';
import type { LogFn } from './exports.js';
import { LISTENER_OPTIONS } from './adopted-socket.js';

/** Each size's rounds of WARM_DEPTH writes, then a quarter as many rounds of reads: about 900 requests, 40 ms. */
const WARM_REQUESTS: readonly { sizeBytes: number; writeRounds: number }[] = [
  { sizeBytes: 1024 * 1024, writeRounds: 8 },
  { sizeBytes: 256 * 1024, writeRounds: 16 },
  { sizeBytes: 64 * 1024, writeRounds: 32 },
  { sizeBytes: 4096, writeRounds: 128 },
];
const WARM_DEPTH = 4;
/** The scratch device must hold WARM_DEPTH of the largest requests. */
export const WARM_SCRATCH_BYTES = WARM_DEPTH * 1024 * 1024;
/** A warm-up that has not ended by then is cut off: the thread serves cold rather than late. */
const WARM_TIMEOUT_MS = 10_000;

/** Run a thread's warm-up and log how long it took, or why it failed: the thread serves either way. */
export async function runWarmUp(warmUp: (context: ConnectionContext) => Promise<void>, context: ConnectionContext, log: LogFn): Promise<void> {
  const startedMs = performance.now();
  try {
    await warmUp(context);
    log({ event: 'warmed-up', ms: Math.round(performance.now() - startedMs) });
  } catch (err) {
    const why = err instanceof Error ? err.message : String(err);
    log({ event: 'warm-up-failed', level: 'warn', error: why, message: `a server thread could not warm up (${why}); it serves, slower for its first clients` });
  }
}

/**
 * Serve `device` (at least WARM_SCRATCH_BYTES; its content is overwritten) to one client of
 * this thread's own through `context`'s code, in `dir` (private to this process, where the
 * socket is made), then close both.
 */
export async function warmRequestPath(context: ConnectionContext, device: BlockDevice, dir: string): Promise<void> {
  const socketPath = nodePath.join(dir, 'warm.sock');
  const exports = new StaticExports([{ name: '', device }]);
  const sockets = new Set<net.Socket>();
  const served: Promise<void>[] = [];
  const server = net.createServer(LISTENER_OPTIONS, (socket) => {
    const { connection, reader } = connectionOn(-1, socket, { ...context, exports, log: undefined, onTransmission: undefined });
    sockets.add(reader ?? socket);
    served.push(connection.closed);
    (reader ?? socket).resume();
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(socketPath, () => resolve());
  });
  const run = async (): Promise<void> => {
    const client = await NbdClient.connect({ socketPath, timeoutMs: WARM_TIMEOUT_MS });
    await exercise(client, device.size);
    await client.close();
    await Promise.all(served);
  };
  try {
    await withTimeout(run(), WARM_TIMEOUT_MS, () => new Error(`the warm-up took more than ${WARM_TIMEOUT_MS} ms`));
  } finally {
    for (const s of sockets) s.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
}

async function exercise(client: NbdClient, sizeBytes: number): Promise<void> {
  const span = Math.floor(sizeBytes / WARM_SCRATCH_BYTES) * WARM_SCRATCH_BYTES;
  if (span === 0) throw new Error(`a scratch device of ${sizeBytes} bytes is too small to warm up on`);
  for (const [i, { sizeBytes: size, writeRounds }] of WARM_REQUESTS.entries()) {
    const buffers = Array.from({ length: WARM_DEPTH }, () => Buffer.alloc(size, i + 1));
    let offset = 0;
    // Writes first and most: a copy onto the device is what a cold thread loses most on.
    for (let round = 0; round < writeRounds + writeRounds / 4; round++) {
      await Promise.all(buffers.map((b) => {
        const at = offset;
        offset = (offset + size) % span;
        return round < writeRounds ? client.write(b, at) : client.read(b, at);
      }));
    }
  }
  await client.flush();
}
