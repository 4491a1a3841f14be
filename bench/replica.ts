/**
 * `node dist/bench/replica.js`: replication between two daemons on this machine over unix
 * sockets, the source's devices replicated into sessions of active devices on the standby.
 *
 *   node dist/bench/replica.js [--small-mib N] [--big-mib N] [--runs N]
 *
 * Rows, the measures of each run taking turns to go first:
 * - full sync of the small device (random data in every block, checked: no hole, every byte
 *   sent as data) against `nbdcopy --flush` from the source daemon's export to the standby's
 *   (the same two servers);
 * - incremental sync after 1% of the small device's change-map blocks were rewritten at random
 *   places, against the full sync; the sync must send exactly those blocks (counted);
 * - the same number of changed blocks on the big device, against the small device's.
 * A sync's time is the daemon's own (`lastSync.durationMs`: snapshot, plan, copy, flush and
 * commit), so the command's start-up is not in it; the wall time of the command is shown too.
 * At the end each standby device is compared with its source.
 */

import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { NbdClient } from '../src/nbd/client.js';
import { MIN_TRACKING_BLOCK_BYTES } from '../src/snapshot/change-map/ranges.js';
import type { ReplicaInfo } from '../src/service/control-protocol.js';
import { BDSNAP_MAIN, CleanupStack, makeImage, nbdUri, run, sandbox, startDaemon, type RunningDaemon, type Sandbox } from './helpers.js';
import { benchOptions } from './options.js';
import { spread } from './report.js';

const MiB = 1024 * 1024;
/** The change map's block on both devices (64 KiB up to 128 GiB): what an incremental sync works in. */
const BLOCK_BYTES = MIN_TRACKING_BLOCK_BYTES;
const CHANGED_FRACTION = 0.01;

interface Pair {
  name: string;
  device: string;
  target: string;
  sizeBytes: number;
  replica: string;
}

async function sha256(file: string): Promise<string> {
  const hash = crypto.createHash('sha256');
  for await (const chunk of fs.createReadStream(file, { highWaterMark: 4 * MiB })) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/** A full sync of the big device takes minutes on a loaded machine: longer than the tests' command timeout. */
const COMMAND_TIMEOUT_MS = 30 * 60_000;

async function cliJson<T>(daemon: RunningDaemon, args: string[]): Promise<T> {
  const r = await run(process.execPath, [BDSNAP_MAIN, ...args, '--json'], { env: daemon.sandbox.env, timeoutMs: COMMAND_TIMEOUT_MS });
  if (r.exitCode !== 0) throw new Error(`bdsnap ${args.join(' ')} exited ${r.exitCode}: ${r.stderr.trim()}`);
  return JSON.parse(r.stdout) as T;
}

/** A sync of `replica`: the daemon's own time, the command's wall time, and what it sent. */
async function timedSync(source: RunningDaemon, replica: string): Promise<{ sec: number; wallSec: number; info: ReplicaInfo }> {
  let t0 = performance.now();
  let info: ReplicaInfo | undefined;
  for (let attempt = 0; info === undefined; attempt++) {
    t0 = performance.now();
    info = await cliJson<ReplicaInfo>(source, ['replica', 'sync', replica]).catch(async (err: unknown) => {
      // The standby lets go of a device only after flushing it: a GiB written by the last client takes a while.
      if (attempt >= 90 || !/in use on the standby/.test(String(err))) throw err;
      await new Promise((resolve) => setTimeout(resolve, 2000));
      return undefined;
    });
  }
  const wallSec = (performance.now() - t0) / 1000;
  if (!info.lastSync || info.state !== 'idle') throw new Error(`sync of ${replica} did not complete: ${info.lastError ?? info.state}`);
  return { sec: info.lastSync.durationMs / 1000, wallSec, info };
}

/** Rewrite `count` distinct change-map blocks at random places of `pair`'s device through the source daemon. */
async function changeBlocks(source: RunningDaemon, pair: Pair, count: number): Promise<number> {
  const blocks = pair.sizeBytes / BLOCK_BYTES;
  const picked = new Set<number>();
  while (picked.size < count) picked.add(crypto.randomInt(blocks));
  const client = await NbdClient.connect({ socketPath: path.join(source.runDir, 'nbd.sock'), exportName: pair.device });
  try {
    for (const block of picked) await client.write(crypto.randomBytes(BLOCK_BYTES), block * BLOCK_BYTES);
    await client.flush();
  } finally {
    await client.close();
  }
  return picked.size * BLOCK_BYTES;
}

/** Until the standby has closed `target`'s session of a client that went away (a big session takes a while to close). */
async function waitLetGo(standby: RunningDaemon, target: string): Promise<void> {
  for (;;) {
    const status = await cliJson<{ devices: Array<{ device: string; attached: boolean; inSession: boolean; currentSession: string | null }> }>(standby, ['status']);
    const d = status.devices.find((x) => x.device === target);
    if (!d || (!d.attached && !d.inSession && d.currentSession === null)) return;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** A new replica of `pair` (its first sync is full); the one before is removed here and on the standby. */
async function freshReplica(source: RunningDaemon, standbyBox: Sandbox, pair: Pair): Promise<void> {
  if (pair.replica !== '') await cliJson(source, ['replica', 'remove', pair.replica]);
  const info = await cliJson<ReplicaInfo>(source, ['replica', 'add', pair.device, '--to', nbdUri(path.join(standbyBox.runDir, 'nbd.sock'), pair.target)]);
  pair.replica = info.id;
}

function fmt(xs: number[], digits = 2): string {
  const x = spread(xs);
  return `${x.median.toFixed(digits)} (${x.min.toFixed(digits)}-${x.max.toFixed(digits)})`;
}

async function main(): Promise<void> {
  const values = benchOptions('node dist/bench/replica.js [--small-mib N] [--big-mib N] [--runs N]', { 'small-mib': { type: 'string', default: '1024' }, 'big-mib': { type: 'string', default: '8192' }, runs: { type: 'string', default: '3' } });
  const runs = Number(values.runs);
  const cleanup = new CleanupStack();
  try {
    const srcBox = sandbox(cleanup, 'bdsnap-bench-rep-src-');
    const dstBox = sandbox(cleanup, 'bdsnap-bench-rep-dst-');
    const pairs: Pair[] = [['small', Number(values['small-mib'])], ['big', Number(values['big-mib'])]].map(([name, mib]) => {
      const sizeBytes = Number(mib) * MiB;
      const device = makeImage(path.join(fs.realpathSync(srcBox.top), `${String(name)}.img`), sizeBytes, 'random', 1);
      const target = makeImage(path.join(fs.realpathSync(dstBox.top), `${String(name)}.img`), sizeBytes, 'zero');
      // Full of data: every block of the source is allocated, so no row is helped by a hole.
      const st = fs.statSync(device);
      if (st.blocks * 512 < sizeBytes) throw new Error(`${device} is not fully allocated (${st.blocks * 512} of ${sizeBytes} bytes)`);
      return { name: String(name), device, target, sizeBytes, replica: '' };
    });
    const [small, big] = pairs as [Pair, Pair];
    const source = await startDaemon(cleanup, { sandbox: srcBox, password: false });
    const standby = await startDaemon(cleanup, { sandbox: dstBox, activate: pairs.map((p) => p.target) });
    // Served by the source daemon (a snapshot taken and dropped registers the devices).
    const snap = await cliJson<{ id: string }>(source, ['snapshot', 'create', small.device, big.device]);
    await cliJson(source, ['snapshot', 'destroy', snap.id]);
    process.stderr.write(`devices ${small.sizeBytes / MiB} and ${big.sizeBytes / MiB} MiB of random data, ${runs} runs, load ${os.loadavg()[0]!.toFixed(1)}\n`);

    // The big device's first (full) sync is setup, not measured.
    await freshReplica(source, dstBox, big);
    const bigFirst = await timedSync(source, big.replica);
    process.stderr.write(`big device's first full sync: ${bigFirst.sec.toFixed(1)} s\n`);

    const changedBlocks = Math.round((small.sizeBytes / BLOCK_BYTES) * CHANGED_FRACTION);
    const rows = { fullSec: [] as number[], fullWallSec: [] as number[], nbdcopySec: [] as number[], incSmallSec: [] as number[], incSmallWallSec: [] as number[], incBigSec: [] as number[] };
    for (let i = 0; i < runs; i++) {
      const full = async (): Promise<void> => {
        await freshReplica(source, dstBox, small);
        const r = await timedSync(source, small.replica);
        if (!r.info.lastSync?.full) throw new Error('the first sync of a new replica was not full');
        if (r.info.lastSync.bytesSent !== small.sizeBytes) throw new Error(`the full sync sent ${r.info.lastSync.bytesSent} data bytes, not the device's ${small.sizeBytes}`);
        rows.fullSec.push(r.sec);
        rows.fullWallSec.push(r.wallSec);
      };
      const nbdcopy = async (): Promise<void> => {
        const t0 = performance.now();
        execFileSync('nbdcopy', ['--flush', nbdUri(path.join(srcBox.runDir, 'nbd.sock'), small.device), nbdUri(path.join(dstBox.runDir, 'nbd.sock'), small.target)], { stdio: 'inherit' });
        rows.nbdcopySec.push((performance.now() - t0) / 1000);
        // The next sync of the device must find it free on the standby.
        await waitLetGo(standby, small.target);
      };
      const steps = i % 2 === 0 ? [nbdcopy, full] : [full, nbdcopy];
      for (const step of steps) await step();

      const incremental = async (pair: Pair): Promise<number> => {
        const changedBytes = await changeBlocks(source, pair, changedBlocks);
        const r = await timedSync(source, pair.replica);
        const s = r.info.lastSync!;
        if (s.full || s.bytesSent !== changedBytes) throw new Error(`${pair.name}: the incremental sync sent ${s.bytesSent} bytes (full: ${s.full}), the changes were ${changedBytes}`);
        if (pair === small) rows.incSmallWallSec.push(r.wallSec);
        return r.sec;
      };
      const incSteps = i % 2 === 0 ? [small, big] : [big, small];
      for (const pair of incSteps) {
        const sec = await incremental(pair);
        (pair === small ? rows.incSmallSec : rows.incBigSec).push(sec);
      }
      process.stderr.write(`run ${i + 1}: full ${rows.fullSec[i]!.toFixed(2)} s (wall ${rows.fullWallSec[i]!.toFixed(2)}), nbdcopy ${rows.nbdcopySec[i]!.toFixed(2)} s, `
        + `incremental small ${rows.incSmallSec[i]!.toFixed(3)} s (wall ${rows.incSmallWallSec[i]!.toFixed(3)}), big ${rows.incBigSec[i]!.toFixed(3)} s\n`);
    }
    for (const pair of pairs) {
      if (await sha256(pair.target) !== await sha256(pair.device)) throw new Error(`the standby's ${pair.name} device differs from the source`);
    }

    const idx = Array.from({ length: runs }, (_, i) => i);
    const smallMiB = small.sizeBytes / MiB;
    const changedMiB = (changedBlocks * BLOCK_BYTES) / MiB;
    process.stdout.write([
      '| row | measured | figure, median (min-max) | target |',
      '|---|---|---|---|',
      `| full sync of ${smallMiB} MiB of random data vs nbdcopy | sync ${fmt(rows.fullSec)} s (command ${fmt(rows.fullWallSec)} s), nbdcopy ${fmt(rows.nbdcopySec)} s | speed ${fmt(idx.map((i) => rows.nbdcopySec[i]! / rows.fullSec[i]!))}x nbdcopy's | at least 0.8x |`,
      `| incremental sync, ${changedBlocks} of ${small.sizeBytes / BLOCK_BYTES} blocks (${changedMiB.toFixed(2)} MiB) changed, vs the full sync | ${fmt(rows.incSmallSec, 3)} s (command ${fmt(rows.incSmallWallSec, 3)} s) | ${fmt(idx.map((i) => rows.incSmallSec[i]! / rows.fullSec[i]!), 3)} of the full sync's time | at most 0.05 |`,
      `| the same ${changedBlocks} blocks changed on ${big.sizeBytes / MiB} MiB vs on ${smallMiB} MiB | ${fmt(rows.incBigSec, 3)} s | ${fmt(idx.map((i) => rows.incBigSec[i]! / rows.incSmallSec[i]!))}x | at most 1.5x |`,
      '',
      `Medians of ${runs} runs, (min-max) in brackets; blocks of ${BLOCK_BYTES / 1024} KiB (the change map's). Load average at the end: ${os.loadavg().map((x) => x.toFixed(1)).join(' ')}.`,
    ].join('\n') + '\n');
  } finally {
    await cleanup.run();
  }
}

await main();
