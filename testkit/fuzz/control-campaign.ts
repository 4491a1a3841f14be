/**
 * A fuzz campaign against the daemon's control socket: random bytes, oversized lines, valid
 * JSON with wrong types, extra and missing fields, floods of requests without reading the
 * answers, all split at random points. While it runs a well-behaved client keeps asking
 * `ping` and `status`. What must hold: the daemon stays up, every answer is one JSON object
 * with a boolean `ok`, a half-closed connection is closed by the daemon, the well-behaved
 * client is answered in time, and descriptors come back to where they were.
 */

import net from 'node:net';
import path from 'node:path';
import { BdsnapClient } from '../../src/service/client.js';
import { gauge, type ProcessGauge } from './nbd-campaign.js';
import { Rng, splitRandomly } from './traffic.js';

export interface ControlCampaignOptions {
  runDir: string;
  pid: number;
  /** Stop after this many messages (lines or junk blocks)... */
  messages: number;
  /** ...or after this long. */
  maxDurationMs?: number;
  seed: number;
  concurrency?: number;
  closeDeadlineMs?: number;
  progress?: (line: string) => void;
}

export interface ControlCampaignResult {
  messages: number;
  connections: number;
  answers: number;
  checkerRounds: number;
  maxCheckerLatencyMs: number;
  before: ProcessGauge;
  after: ProcessGauge;
  durationMs: number;
  failures: string[];
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

const TEMPLATES: Array<Record<string, unknown>> = [
  { id: 1, op: 'ping' },
  { id: 1, op: 'status' },
  { id: 1, op: 'list', device: '/no/such.img' },
  { id: 1, op: 'activate', device: '/no/such.img', password: 'not it' },
  { id: 1, op: 'deactivate', device: '/no/such.img', password: 'not it' },
  { id: 1, op: 'passwd', newPassword: 'x', currentPassword: 'not it' },
  { id: 1, op: 'mount', device: '/no/such.img', mountpoint: '/no/such/dir', type: 'ext4', options: 'ro' },
  { id: 1, op: 'umount', mountpoint: '/no/such/dir' },
];

function randomJsonValue(rng: Rng, depth = 0): unknown {
  switch (rng.int(depth > 2 ? 6 : 8)) {
    case 0: return null;
    case 1: return rng.chance(0.5);
    case 2: return rng.pick([0, -1, 1.5, 2 ** 53, -(2 ** 63), 1e308, Number.MAX_SAFE_INTEGER + 2]);
    case 3: return rng.pick(['', 'x', '/', '\u0000', 'é'.repeat(100), 'ping', '../../etc/passwd']);
    case 4: return 'y'.repeat(rng.pick([1000, 5000, 60_000]));
    case 5: return rng.int(1000);
    case 6: return Array.from({ length: rng.int(4) }, () => randomJsonValue(rng, depth + 1));
    default: return Object.fromEntries(Array.from({ length: rng.int(4) }, (_, i) => [`k${i}`, randomJsonValue(rng, depth + 1)]));
  }
}

/** A request shape with one thing wrong (or, now and then, nothing wrong). */
function typedLine(rng: Rng): string {
  const request: Record<string, unknown> = { ...rng.pick(TEMPLATES), id: rng.int(1 << 30) };
  const keys = Object.keys(request);
  switch (rng.int(5)) {
    case 0: request[rng.pick(keys)] = randomJsonValue(rng); break;
    case 1: delete request[rng.pick(keys)]; break;
    case 2: request[rng.pick(['euid', 'extra', '__proto__', 'constructor'])] = randomJsonValue(rng); break;
    case 3: request.op = randomJsonValue(rng); break;
    default: break;
  }
  return JSON.stringify(request);
}

/** The lines (or junk) of one connection, and how many messages they count for. */
function controlScript(rng: Rng): { bytes: Buffer; messages: number; flood: boolean } {
  const parts: Buffer[] = [];
  let messages = 0;
  const kind = rng.int(10);
  const flood = kind === 9;
  const count = flood ? 70 + rng.int(60) : 1 + rng.int(12);
  for (let i = 0; i < count; i++, messages++) {
    const what = flood ? 0 : rng.int(10);
    if (what <= 5) parts.push(Buffer.from(`${typedLine(rng)}\n`));
    else if (what === 6) parts.push(Buffer.concat([rng.bytes(rng.int(512)), Buffer.from('\n')]));
    else if (what === 7) parts.push(Buffer.from(`{"id":1,"op":"ping","pad":"${'z'.repeat(rng.pick([65 * 1024, 200 * 1024, 1 << 20]))}"}\n`));
    else if (what === 8) parts.push(Buffer.from(`${'['.repeat(rng.pick([100, 10_000, 60_000]))}\n`));
    else parts.push(rng.bytes(rng.int(256)));
  }
  if (rng.chance(0.3)) parts.push(Buffer.from('{"id":7,"op":"sta')); // a half line at the end
  return { bytes: Buffer.concat(parts), messages, flood };
}

async function controlConnection(socketPath: string, seed: number, closeDeadlineMs: number): Promise<{ messages: number; answers: number; failure?: string }> {
  const rng = new Rng(seed);
  const script = controlScript(rng);
  const socket = net.connect(socketPath);
  socket.on('error', () => undefined);
  let text = '';
  let answers = 0;
  let failure: string | undefined;
  socket.on('data', (d: Buffer) => {
    text += d.toString('utf8');
    let nl: number;
    while ((nl = text.indexOf('\n')) >= 0) {
      const line = text.slice(0, nl);
      text = text.slice(nl + 1);
      answers++;
      try {
        const a = JSON.parse(line) as { ok?: unknown };
        if (typeof a !== 'object' || a === null || typeof a.ok !== 'boolean') failure ??= `seed ${seed}: an answer without a boolean ok: ${line.slice(0, 200)}`;
      } catch {
        failure ??= `seed ${seed}: an answer that is not JSON: ${line.slice(0, 200)}`;
      }
    }
  });
  const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
  const connected = await new Promise<boolean>((resolve) => {
    socket.once('connect', () => resolve(true));
    socket.once('error', () => resolve(false));
  });
  if (!connected) return { messages: 0, answers: 0, failure: `seed ${seed}: cannot connect` };
  if (script.flood) socket.pause(); // never read the answers
  for (const piece of splitRandomly(rng, script.bytes)) {
    if (socket.destroyed) break;
    socket.write(piece);
    if (rng.chance(0.1)) await new Promise((resolve) => setImmediate(resolve));
  }
  if (script.flood) {
    // The daemon may drop us or stop reading (backpressure); either way it must not buffer
    // answers without bound, which the campaign's memory and descriptor checks watch.
    await Promise.race([closed, sleep(rng.int(50))]);
    socket.destroy();
    return { messages: script.messages, answers, failure };
  }
  // Wait a moment for answers, then half-close: the daemon must close its side.
  await sleep(rng.int(30));
  socket.end();
  const outcome = await Promise.race([closed.then(() => 'closed' as const), sleep(closeDeadlineMs).then(() => 'timeout' as const)]);
  socket.destroy();
  if (outcome === 'timeout') failure ??= `seed ${seed}: connection not closed ${closeDeadlineMs} ms after the client's end`;
  return { messages: script.messages, answers, failure };
}

export async function runControlCampaign(options: ControlCampaignOptions): Promise<ControlCampaignResult> {
  const startedMs = Date.now();
  const socketPath = path.join(options.runDir, 'control.sock');
  const closeDeadlineMs = options.closeDeadlineMs ?? 10_000;
  const maxDurationMs = options.maxDurationMs ?? Number.POSITIVE_INFINITY;
  const warm = await BdsnapClient.connect(options.runDir);
  await warm.ping();
  warm.close();
  await sleep(100);
  const before = gauge(options.pid);
  const result: ControlCampaignResult = {
    messages: 0, connections: 0, answers: 0, checkerRounds: 0, maxCheckerLatencyMs: 0, before, after: before, durationMs: 0, failures: [],
  };
  let done = false;
  const checker = (async () => {
    while (!done) {
      const started = Date.now();
      try {
        const client = await BdsnapClient.connect(options.runDir);
        try {
          const answered = await Promise.race([Promise.all([client.ping(), client.status()]).then(() => true), sleep(10_000).then(() => false)]);
          if (!answered) throw new Error('ping and status took more than 10 s');
        } finally {
          client.close();
        }
      } catch (err) {
        result.failures.push(`well-behaved client: ${(err as Error).message}`);
        return;
      }
      result.maxCheckerLatencyMs = Math.max(result.maxCheckerLatencyMs, Date.now() - started);
      result.checkerRounds++;
      await sleep(20);
    }
  })();
  let nextSeed = options.seed;
  let warmedUp = false;
  const worker = async (): Promise<void> => {
    while (!done) {
      if (result.messages >= options.messages || Date.now() - startedMs > maxDurationMs || result.failures.length > 20) {
        done = true;
        break;
      }
      const seed = nextSeed++;
      const r = await controlConnection(socketPath, seed, closeDeadlineMs);
      // Memory is measured from the end of a warm-up (a fifth of the messages): the daemon's
      // heap, code and allocator grow to their working size first, and that is not a leak.
      if (!warmedUp && result.messages + r.messages >= options.messages / 5) {
        warmedUp = true;
        result.before = { ...gauge(options.pid), fds: before.fds };
      }
      result.messages += r.messages;
      result.answers += r.answers;
      result.connections++;
      if (r.failure) result.failures.push(r.failure);
      if (options.progress && result.connections % 2000 === 0) {
        const g = gauge(options.pid);
        options.progress(`${result.messages} messages, ${result.connections} connections, fds ${g.fds}, rss ${g.rssKiB} KiB, failures ${result.failures.length}`);
      }
    }
  };
  await Promise.all(Array.from({ length: options.concurrency ?? 4 }, () => worker()));
  done = true;
  await checker;
  const deadline = Date.now() + 5000;
  let after = gauge(options.pid);
  while (after.fds > before.fds && Date.now() < deadline) {
    await sleep(50);
    after = gauge(options.pid);
  }
  result.after = after;
  if (after.fds > before.fds) result.failures.push(`descriptors: ${before.fds} before, ${after.fds} after the campaign`);
  result.durationMs = Date.now() - startedMs;
  return result;
}
