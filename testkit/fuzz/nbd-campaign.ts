/**
 * A fuzz campaign against a live NBD server process: connections carrying random and mutated
 * traffic (traffic.ts) written split at random points, several at once, while a well-behaved
 * client keeps writing and reading back its own export. What must hold throughout:
 *
 * - the server process stays up (no crash);
 * - every fuzz connection whose client half-closes is closed by the server within a deadline
 *   (no hang), whatever state the bytes left it in;
 * - the well-behaved client gets the right bytes back on every round, within a deadline;
 * - once the fuzz connections are gone, the server's open descriptors are back to where they
 *   were, and its resident memory has not kept growing.
 */

import fs from 'node:fs';
import net from 'node:net';
import { NbdClient } from '../../src/nbd/client.js';
import { alive } from '../process.js';
import { Rng, makeScript, splitRandomly, type Phase, type TrafficTarget } from './traffic.js';

export interface ProcessGauge {
  fds: number;
  rssKiB: number;
}

/** Open descriptors and resident memory of a process, from /proc. */
export function gauge(pid: number): ProcessGauge {
  const fds = fs.readdirSync(`/proc/${pid}/fd`).length;
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const rss = /^VmRSS:\s+(\d+)\s+kB/m.exec(status);
  return { fds, rssKiB: rss ? Number(rss[1]) : NaN };
}

export interface NbdCampaignOptions {
  socketPath: string;
  /** The server's process id (for /proc measurements and liveness). */
  pid: number;
  /** The export the fuzz connections aim at. */
  target: TrafficTarget;
  /** A second export, used only by the well-behaved client. */
  checkerExport: string;
  /** Stop after this many frames... */
  frames: number;
  /** ...or after this long, whichever comes first. */
  maxDurationMs?: number;
  seed: number;
  /** Fuzz connections open at once; default 4. */
  concurrency?: number;
  /** Frames per connection at most; default 40. */
  framesPerConnection?: number;
  /** A server that has not closed a half-closed connection by then is hung; default 5 s. */
  closeDeadlineMs?: number;
  /** A round of the well-behaved client slower than this is a failure; default 5 s. */
  checkerDeadlineMs?: number;
  /** Progress lines (the long campaign prints them). */
  progress?: (line: string) => void;
}

export interface NbdCampaignResult {
  frames: number;
  connections: number;
  byPhase: Record<Phase, number>;
  /** Connections the fuzzer half-closed, and how many of those the server closed in time. */
  halfClosed: number;
  checkerRounds: number;
  maxCheckerLatencyMs: number;
  /** Measured after the warm-up (memory) and before the first connection (descriptors). */
  before: ProcessGauge;
  after: ProcessGauge;
  peakRssKiB: number;
  durationMs: number;
  /** Everything that went wrong, with the seed of the connection to replay it. */
  failures: string[];
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** One fuzz connection. Returns a failure description, or undefined. */
async function fuzzConnection(socketPath: string, target: TrafficTarget, seed: number, maxFrames: number, closeDeadlineMs: number):
  Promise<{ failure?: string; frames: number; phase: Phase; halfClosed: boolean }> {
  const rng = new Rng(seed);
  const script = makeScript(rng, target, 1 + rng.int(maxFrames));
  const socket = net.connect(socketPath);
  socket.on('error', () => undefined);
  socket.on('data', () => undefined); // read and drop: a client that never reads would only test backpressure
  const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
  const connected = await new Promise<boolean>((resolve) => {
    socket.once('connect', () => resolve(true));
    socket.once('error', () => resolve(false));
  });
  if (!connected) return { failure: `seed ${seed}: cannot connect`, frames: 0, phase: script.phase, halfClosed: false };
  for (const piece of splitRandomly(rng, script.bytes)) {
    if (socket.destroyed) break;
    socket.write(piece);
    if (rng.chance(0.05)) await sleep(rng.int(3));
    else if (rng.chance(0.2)) await new Promise((resolve) => setImmediate(resolve));
  }
  const ending = rng.pick(['end', 'end', 'end', 'destroy', 'linger'] as const);
  if (ending === 'destroy' || socket.destroyed) {
    socket.destroy();
    return { frames: script.frames, phase: script.phase, halfClosed: false };
  }
  if (ending === 'linger') await sleep(rng.int(20));
  // Half-close: the server must finish what it can and close its side.
  socket.end();
  const timer = sleep(closeDeadlineMs).then(() => 'timeout' as const);
  const outcome = await Promise.race([closed.then(() => 'closed' as const), timer]);
  socket.destroy();
  if (outcome === 'timeout') {
    return {
      failure: `seed ${seed}: ${script.phase} connection (${script.bytes.length} bytes, structured ${script.structured}) not closed ${closeDeadlineMs} ms after the client's end`,
      frames: script.frames, phase: script.phase, halfClosed: true,
    };
  }
  return { frames: script.frames, phase: script.phase, halfClosed: true };
}

/** The well-behaved client: write a random block, read it back, until `stop` says so. */
async function checkerLoop(options: NbdCampaignOptions, stop: () => boolean, result: NbdCampaignResult): Promise<void> {
  const rng = new Rng(options.seed ^ 0x5eed);
  const deadlineMs = options.checkerDeadlineMs ?? 5000;
  let client: NbdClient | undefined;
  try {
    client = await NbdClient.connect({ socketPath: options.socketPath, exportName: options.checkerExport, structuredReplies: rng.chance(0.5) });
    const blocks = Math.floor(client.size / 4096);
    while (!stop()) {
      const started = Date.now();
      const data = rng.bytes(4096 * (1 + rng.int(16)));
      const offsetBytes = 4096 * rng.int(Math.max(1, blocks - 16));
      const round = (async () => {
        await client.write(data, offsetBytes, { fua: rng.chance(0.2) });
        const back = Buffer.alloc(data.length);
        await client.read(back, offsetBytes);
        if (!back.equals(data)) throw new Error(`the well-behaved client read back other bytes at ${offsetBytes}`);
      })();
      const won = await Promise.race([round.then(() => true), sleep(deadlineMs).then(() => false)]);
      if (!won) throw new Error(`a well-behaved round took more than ${deadlineMs} ms`);
      result.maxCheckerLatencyMs = Math.max(result.maxCheckerLatencyMs, Date.now() - started);
      result.checkerRounds++;
      await sleep(5);
    }
  } catch (err) {
    result.failures.push(`well-behaved client: ${(err as Error).message}`);
  } finally {
    await client?.close().catch(() => undefined);
  }
}

/** Wait for the server's descriptor count to come back to `fds` (connections close asynchronously). */
async function settleFds(pid: number, fds: number, timeoutMs: number): Promise<ProcessGauge> {
  const deadline = Date.now() + timeoutMs;
  let now = gauge(pid);
  while (now.fds > fds && Date.now() < deadline) {
    await sleep(50);
    now = gauge(pid);
  }
  return now;
}

/** How long after the campaign its memory is measured (the server trims 2 s after its last client). */
const MEMORY_SETTLE_MS = 3000;

export async function runNbdCampaign(options: NbdCampaignOptions): Promise<NbdCampaignResult> {
  const startedMs = Date.now();
  const concurrency = options.concurrency ?? 4;
  const maxDurationMs = options.maxDurationMs ?? Number.POSITIVE_INFINITY;
  const framesPerConnection = options.framesPerConnection ?? 40;
  const closeDeadlineMs = options.closeDeadlineMs ?? 5000;
  // Warm up (first connections load code and buffers) before the baseline is taken.
  const warm = await NbdClient.connect({ socketPath: options.socketPath, exportName: options.checkerExport });
  await warm.read(Buffer.alloc(4096), 0);
  await warm.close();
  const before = await settleFds(options.pid, 0, 200);
  const result: NbdCampaignResult = {
    frames: 0, connections: 0, byPhase: { handshake: 0, options: 0, transmission: 0 }, halfClosed: 0,
    checkerRounds: 0, maxCheckerLatencyMs: 0, before, after: before, peakRssKiB: before.rssKiB, durationMs: 0, failures: [],
  };
  let done = false;
  const stop = (): boolean => done;
  const checker = checkerLoop(options, stop, result);
  let nextSeed = options.seed;
  let lastProgress = 0;
  let warmedUp = false;
  const worker = async (): Promise<void> => {
    while (!done) {
      if (result.frames >= options.frames || Date.now() - startedMs > maxDurationMs || result.failures.length > 20) {
        done = true;
        break;
      }
      const seed = nextSeed++;
      const r = await fuzzConnection(options.socketPath, options.target, seed, framesPerConnection, closeDeadlineMs);
      // As for the control socket, memory is measured from the end of a warm-up (a fifth of the
      // frames): the heap and the allocator grow to their working size first.
      if (!warmedUp && result.frames + r.frames >= options.frames / 5) {
        warmedUp = true;
        result.before = { ...gauge(options.pid), fds: before.fds };
      }
      result.frames += r.frames;
      result.connections++;
      result.byPhase[r.phase]++;
      if (r.halfClosed) result.halfClosed++;
      if (r.failure) result.failures.push(r.failure);
      if (!alive(options.pid)) {
        result.failures.push(`the server process died during seed ${seed}`);
        done = true;
      }
      if (result.connections % 200 === 0) {
        const g = gauge(options.pid);
        result.peakRssKiB = Math.max(result.peakRssKiB, g.rssKiB);
        if (options.progress && result.frames - lastProgress >= 50_000) {
          lastProgress = result.frames;
          options.progress(`${result.frames} frames, ${result.connections} connections, fds ${g.fds}, rss ${g.rssKiB} KiB, checker rounds ${result.checkerRounds}, failures ${result.failures.length}`);
        }
      }
    }
  };
  await Promise.all(Array.from({ length: concurrency }, () => worker()));
  done = true;
  await checker;
  if (alive(options.pid)) {
    await settleFds(options.pid, before.fds, 5000);
    // The server hands the memory of its clients back a moment after the last one has gone.
    await sleep(MEMORY_SETTLE_MS);
    result.after = gauge(options.pid);
    result.peakRssKiB = Math.max(result.peakRssKiB, result.after.rssKiB);
    if (result.after.fds > before.fds) result.failures.push(`descriptors: ${before.fds} before, ${result.after.fds} after the campaign`);
    // A fresh well-behaved connection is served after it all.
    try {
      const last = await NbdClient.connect({ socketPath: options.socketPath, exportName: options.checkerExport });
      await last.read(Buffer.alloc(4096), 0);
      await last.close();
    } catch (err) {
      result.failures.push(`a new connection after the campaign failed: ${(err as Error).message}`);
    }
  }
  result.durationMs = Date.now() - startedMs;
  return result;
}
