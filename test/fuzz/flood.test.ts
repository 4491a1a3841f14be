/**
 * Floods from another process against a live `bdsnap serve`, measured from /proc: a few
 * bytes from many clients must not buy the server gigabytes of memory or all its descriptors,
 * and a real client must still be served.
 *
 * - 40 clients finish the handshake and each send eight 32 MiB READs (28 bytes each) without
 *   reading a reply: the server's resident memory stays under the global in-flight budget plus
 *   a margin while they hold on, and comes back down once they are gone.
 * - 1,100 connections that never finish the handshake, against a server whose descriptor limit
 *   is 1,024: nbdinfo is served in the middle of them, and the handshake timeout closes them.
 */

import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { test } from 'node:test';
import { CleanupStack } from '../../testkit/cleanup.js';
import { makeImage, makeTempDir } from '../../testkit/files.js';
import { needs } from '../../testkit/needs.js';
import { run } from '../../testkit/process.js';
import { BDSNAP_MAIN, launchServer, startServer, type NbdServer } from '../../testkit/server.js';
import { gauge } from '../../testkit/fuzz/nbd-campaign.js';

const FLOOD_CLIENT = fileURLToPath(new URL('./flood-client.js', import.meta.url));
const MIB = 1024 * 1024;
/** The server's default global in-flight budget (NbdServer's maxInFlightBytes). */
const BUDGET_BYTES = 256 * MIB;
/** The server's default connection limit. */
const MAX_CONNECTIONS = 256;
/** Resident memory allowed on top of the budget: node itself, sockets, allocator slack. */
const MARGIN_BYTES = 200 * MIB;
/** Resident memory allowed once a flood is gone, over what the server had before it. */
const SETTLED_GROWTH_BYTES = 128 * MIB;
/** How long resident memory must stop growing before the flood counts as absorbed. */
const QUIET_MS = 3000;

interface Flood {
  child: ChildProcess;
  /** Resolves with the flood's report once every connection was tried. */
  ready: Promise<{ opened: number; failed: number }>;
}

function startFlood(cleanup: CleanupStack, args: string[]): Flood {
  const child = spawn(process.execPath, [FLOOD_CLIENT, ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
  cleanup.after(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  let stderr = '';
  child.stderr!.on('data', (b: Buffer) => (stderr += b.toString()));
  const ready = new Promise<{ opened: number; failed: number }>((resolve, reject) => {
    let stdout = '';
    child.stdout!.on('data', (b: Buffer) => {
      stdout += b.toString();
      const line = stdout.split('\n')[0];
      if (stdout.includes('\n') && line !== undefined) resolve(JSON.parse(line) as { opened: number; failed: number });
    });
    child.once('exit', (code) => reject(new Error(`flood client exited (${code}) before it was ready: ${stderr}`)));
  });
  return { child, ready };
}

async function stopFlood(flood: Flood): Promise<void> {
  if (flood.child.exitCode !== null || flood.child.signalCode !== null) return;
  const exited = new Promise((resolve) => flood.child.once('exit', resolve));
  flood.child.kill('SIGKILL');
  await exited;
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Sample the server's resident memory until it has not reached a new peak for QUIET_MS (or
 * `maxMs` passed); returns the peak in bytes.
 */
async function peakRss(pid: number, maxMs: number): Promise<number> {
  const startMs = Date.now();
  let peakKiB = gauge(pid).rssKiB;
  let peakAtMs = startMs;
  while (Date.now() - peakAtMs < QUIET_MS && Date.now() - startMs < maxMs) {
    await sleep(100);
    const { rssKiB } = gauge(pid);
    if (rssKiB > peakKiB) {
      peakKiB = rssKiB;
      peakAtMs = Date.now();
    }
  }
  return peakKiB * 1024;
}

/** Wait until the server holds at most `fds` descriptors; returns the count it got to. */
async function fdsDownTo(pid: number, fds: number, timeoutMs: number): Promise<number> {
  const deadlineMs = Date.now() + timeoutMs;
  let now = gauge(pid).fds;
  while (now > fds && Date.now() < deadlineMs) {
    await sleep(100);
    now = gauge(pid).fds;
  }
  return now;
}

const mib = (bytes: number): string => `${(bytes / MIB).toFixed(0)} MiB`;

test('40 clients each asking for 8 x 32 MiB and reading nothing: memory stays under the budget and comes back', { timeout: 120_000 }, async (t) => {
  if (!needs(t, { tools: ['nbdinfo'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup, 'bdsnap-flood-');
  const image = makeImage(path.join(dir, 'disk.img'), 256 * MIB, 'zero');
  const server = await startServer(cleanup, { kind: 'bdsnap', images: [image], socketPath: path.join(dir, 'nbd.sock') });
  const before = gauge(server.pid);

  const flood = startFlood(cleanup, ['reads', server.socketPath, server.exportNames[0]!, '40', '8', String(32 * MIB)]);
  const report = await flood.ready;
  assert.equal(report.opened, 40, `every flooding client got through the handshake: ${JSON.stringify(report)}`);
  const peakBytes = await peakRss(server.pid, 30_000);
  t.diagnostic(`RSS before ${mib(before.rssKiB * 1024)}, peak during the flood ${mib(peakBytes)}`);
  assert.ok(peakBytes < BUDGET_BYTES + MARGIN_BYTES, `peak RSS ${mib(peakBytes)} is under the budget ${mib(BUDGET_BYTES)} + ${mib(MARGIN_BYTES)}`);
  // Handshake only: it needs none of the budget the flood holds.
  await run('nbdinfo', ['--size', server.uri(server.exportNames[0])], { timeoutMs: 20_000 });

  await stopFlood(flood);
  const fds = await fdsDownTo(server.pid, before.fds, 20_000);
  assert.ok(fds <= before.fds, `the flood's connections are closed: ${fds} descriptors, ${before.fds} before`);
  const settledBytes = await peakRssAfter(server, 10_000);
  t.diagnostic(`RSS after the flood ${mib(settledBytes)}`);
  assert.ok(settledBytes < before.rssKiB * 1024 + SETTLED_GROWTH_BYTES,
    `RSS after the flood ${mib(settledBytes)} is within ${mib(SETTLED_GROWTH_BYTES)} of ${mib(before.rssKiB * 1024)} before`);
  assert.ok(server.running(), server.stderr());
});

/** Wait (up to `timeoutMs`) for resident memory to come down; the last sample in bytes. */
async function peakRssAfter(server: NbdServer, timeoutMs: number): Promise<number> {
  const deadlineMs = Date.now() + timeoutMs;
  let rssKiB = gauge(server.pid).rssKiB;
  let lowestKiB = rssKiB;
  while (Date.now() < deadlineMs) {
    await sleep(250);
    rssKiB = gauge(server.pid).rssKiB;
    lowestKiB = Math.min(lowestKiB, rssKiB);
  }
  return lowestKiB * 1024;
}

test('1,100 connections that never finish the handshake: nbdinfo is served among them, and they are closed', { timeout: 120_000 }, async (t) => {
  if (!needs(t, { tools: ['nbdinfo', 'prlimit'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup, 'bdsnap-flood-');
  const image = makeImage(path.join(dir, 'disk.img'), 4 * MIB, 'zero');
  const socketPath = path.join(dir, 'nbd.sock');
  // The descriptor limit of the report that found this: 1,100 connections are more than it.
  const server = await launchServer(cleanup, {
    kind: 'bdsnap', command: 'prlimit', args: ['--nofile=1024:1024', process.execPath, BDSNAP_MAIN, 'serve', '--socket', socketPath, image],
    socketPath, exportNames: [image], readyPattern: /^bdsnap: serving /m,
  });
  const before = gauge(server.pid);

  const flood = startFlood(cleanup, ['half-handshakes', socketPath, '1100']);
  const report = await flood.ready;
  const during = gauge(server.pid).fds;
  t.diagnostic(`flood: ${JSON.stringify(report)}; server descriptors ${during}, ${before.fds} before`);
  // Plus the connection being accepted: it holds its descriptor while the one whose slot it
  // takes is closed (on a worker thread, which the accepting thread waits for).
  assert.ok(during <= before.fds + MAX_CONNECTIONS + 1, `the server holds no more connections than its limit: ${during} descriptors, ${before.fds} before`);
  const info = await run('nbdinfo', ['--size', server.uri(image)], { timeoutMs: 20_000 });
  assert.equal(info.stdout.trim(), String(4 * MIB));

  // The flood still holds its sockets: the handshake timeout is what closes them.
  const fds = await fdsDownTo(server.pid, before.fds, 30_000);
  assert.ok(fds <= before.fds, `idle handshakes are closed: ${fds} descriptors, ${before.fds} before`);
  await stopFlood(flood);
  assert.ok(server.running(), server.stderr());
});
