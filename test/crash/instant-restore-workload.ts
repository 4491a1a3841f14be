/**
 * An instant restore under power loss: a restore onto a device (in place) begins, a client
 * writes (parts of slots, whole slots) and flushes while the background copy runs, the copy
 * ends and the client lets go. On each crash state two things are checked:
 *
 * - the done map on disk claims no slot whose data is not durable: every page of a slot it
 *   claims holds the backup plus the writes flushed by then (or the page of a write not yet
 *   flushed, which a crash may keep or lose);
 * - restarted (a new InstantRestores resuming from the state directory), the restore ends with
 *   the target equal to the backup plus every write flushed before the crash (pages of the
 *   others either way). A restore whose start had returned must resume.
 */

import fs from 'node:fs';
import path from 'node:path';
import { pino } from 'pino';
import { FileDevice } from '../../src/device/file-device.js';
import { traceMark } from '../../src/host/fs-trace.js';
import { EventLog } from '../../src/service/events.js';
import { InstantRestores, type SourceOpener } from '../../src/service/instant-restore.js';
import { CrashRecorder, type Recording } from '../helpers/crash-recorder.js';
import { exploreCrashStates, materialize, type CrashState } from '../helpers/crash-states.js';
import type { CheckedRun, Outcome } from './session-workload.js';

const PIECE_BYTES = 64 * 1024;
const SLOTS = 16;
const DEVICE_BYTES = SLOTS * PIECE_BYTES;
const PAGE_BYTES = 4096;
/** Slots the backup holds as holes (zeros): the copy zeroes them on the target. */
const HOLE_SLOTS = new Set([3, 9, 14]);
const FLUSH_MARK = 'client flush answered';

function fill(length: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) b[i] = (seed * 37 + i * 7 + (i >> 12)) & 0xff;
  return b;
}

/** A client write, page-aligned, none overlapping another. */
interface ClientWrite { offsetBytes: number; data: Buffer }

export interface InstantRestoreWorld {
  dir: string;
  image: string;
  stateDir: string;
  rec: Recording;
  backup: Buffer;
  /** The writes, each with the number of the flush mark that covered it. */
  writes: Array<ClientWrite & { flushedBy: number }>;
  /** Whether a crash point lies after the start returned. */
  startedMarkIndex: number;
}

function opener(backupFile: string): SourceOpener {
  return async () => {
    const source = await FileDevice.open(backupFile, { readOnly: true });
    const slots = Array.from({ length: SLOTS }, (_, i) => (HOLE_SLOTS.has(i) ? null : `piece-${i}`));
    return { source, slots, pieceBytes: PIECE_BYTES, close: () => source.close() };
  };
}

async function restoresIn(world: { dir: string; stateDir: string }, rateBytes?: number): Promise<{ restores: InstantRestores; events: EventLog }> {
  const log = pino({ level: 'silent' });
  const eventsDir = path.join(world.dir, 'events');
  fs.mkdirSync(eventsDir, { recursive: true });
  const events = await EventLog.open(eventsDir, log);
  const restores = new InstantRestores({ stateDir: world.stateDir, events, log, openSource: opener(path.join(world.dir, 'backup.img')), ...(rateBytes !== undefined ? { rateBytes } : {}) });
  return { restores, events };
}

async function until(what: () => boolean, timeoutMs: number, why: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!what()) {
    if (Date.now() > deadline) throw new Error(`timed out: ${why}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

export async function recordInstantRestoreWorkload(dir: string): Promise<InstantRestoreWorld> {
  const backup = fill(DEVICE_BYTES, 1);
  for (const i of HOLE_SLOTS) backup.fill(0, i * PIECE_BYTES, (i + 1) * PIECE_BYTES);
  fs.writeFileSync(path.join(dir, 'backup.img'), backup);
  const work = path.join(dir, 'work');
  fs.mkdirSync(work, { mode: 0o700 });
  const image = path.join(work, 'disk.img');
  // What the lost device holds: nothing of the backup's.
  fs.writeFileSync(image, fill(DEVICE_BYTES, 99));
  const stateDir = path.join(work, 'state');
  fs.mkdirSync(stateDir, { mode: 0o700 });
  // Slow enough that the client's writes land among the copy's fills.
  const { restores, events } = await restoresIn({ dir, stateDir }, 2 * DEVICE_BYTES);
  const writes: InstantRestoreWorld['writes'] = [];
  let flushes = 0;
  const recorder = new CrashRecorder([work]);
  recorder.start();
  try {
    await restores.start({ repo: 'repo', backup: 'b1', device: image, target: image, output: false }, async () => undefined);
    traceMark('started');
    const handle = restores.open(fs.realpathSync(image));
    if (!handle) throw new Error('the restore does not serve its target');
    const dev = handle.device;
    const write = async (offsetBytes: number, length: number, seed: number): Promise<void> => {
      const data = fill(length, seed);
      await dev.write(data, offsetBytes);
      writes.push({ offsetBytes, data, flushedBy: Number.POSITIVE_INFINITY });
    };
    const flush = async (): Promise<void> => {
      await dev.flush();
      flushes++;
      for (const w of writes) if (w.flushedBy === Number.POSITIVE_INFINITY) w.flushedBy = flushes;
      traceMark(`${FLUSH_MARK} ${flushes}`);
    };
    // Part of a slot (filled from the backup first), and a whole slot (nothing from the backup).
    await Promise.all([write(5 * PIECE_BYTES + PAGE_BYTES, 2 * PAGE_BYTES, 2), write(7 * PIECE_BYTES, PIECE_BYTES, 3)]);
    await flush();
    await write(12 * PIECE_BYTES, PAGE_BYTES, 4);
    await write(10 * PIECE_BYTES, PIECE_BYTES, 5);
    traceMark('written, not flushed');
    await write(PIECE_BYTES + 2 * PAGE_BYTES, PAGE_BYTES, 6);
    await flush();
    await until(() => restores.list()[0]?.state === 'complete', 30_000, 'the copy ends');
    traceMark('complete');
    await handle.release();
    traceMark('retired');
  } finally {
    recorder.stop();
    await restores.closeAll();
    events.close();
  }
  if (recorder.unknown.length > 0) throw new Error(`the recording has gaps: ${recorder.unknown.join(', ')}`);
  const rec = recorder.stop();
  const startedMarkIndex = rec.entries.findIndex((e) => e.k === 'mark' && e.label === 'started');
  return { dir, image: fs.realpathSync(image), stateDir: fs.realpathSync(stateDir), rec, backup, writes, startedMarkIndex };
}

/** The flushes answered before step `point`. */
function flushesBefore(world: InstantRestoreWorld, point: number): number {
  return world.rec.entries.slice(0, point).filter((e) => e.k === 'mark' && e.label.startsWith(FLUSH_MARK)).length;
}

/**
 * Whether `got` (the target's bytes of `lo`..`hi`, page-aligned) is what it may be: each page
 * the backup plus the flushed writes, or the page of a write not flushed. The first bad page, or
 * undefined.
 */
function badPage(world: InstantRestoreWorld, flushed: number, got: Buffer, lo: number, hi: number): number | undefined {
  const sure = Buffer.from(world.backup);
  for (const w of world.writes) if (w.flushedBy <= flushed) w.data.copy(sure, w.offsetBytes);
  for (let at = lo; at < hi; at += PAGE_BYTES) {
    const page = got.subarray(at - lo, at - lo + PAGE_BYTES);
    if (page.equals(sure.subarray(at, at + PAGE_BYTES))) continue;
    const maybe = world.writes.find((w) => w.flushedBy > flushed && w.offsetBytes <= at && at < w.offsetBytes + w.data.length);
    if (maybe && page.equals(maybe.data.subarray(at - maybe.offsetBytes, at - maybe.offsetBytes + PAGE_BYTES))) continue;
    return at;
  }
  return undefined;
}

export async function checkInstantRestoreState(world: InstantRestoreWorld, state: CrashState): Promise<Outcome> {
  materialize(world.rec, state, [world.image]);
  const flushed = flushesBefore(world, state.point);
  // The map as the crash left it: every slot it claims must hold durable data.
  const restoresDir = path.join(world.stateDir, 'restores');
  for (const name of fs.existsSync(restoresDir) ? fs.readdirSync(restoresDir) : []) {
    const mapFile = path.join(restoresDir, name, 'done.map');
    if (!fs.existsSync(mapFile)) continue;
    const bits = fs.readFileSync(mapFile);
    const target = fs.readFileSync(world.image);
    for (let i = 0; i < SLOTS; i++) {
      if ((bits[i >> 3]! & (1 << (i & 7))) === 0) continue;
      const lo = i * PIECE_BYTES;
      const bad = badPage(world, flushed, target.subarray(lo, lo + PIECE_BYTES), lo, lo + PIECE_BYTES);
      if (bad !== undefined) return { kind: 'wrong', reason: `the map claims slot ${i}, whose page at ${bad} is not durable` };
    }
  }
  const { restores, events } = await restoresIn(world);
  try {
    await restores.resumeAll();
    if (!restores.isServing(world.image)) {
      if (state.point > world.startedMarkIndex && fs.existsSync(restoresDir) && fs.readdirSync(restoresDir).length > 0) {
        return { kind: 'loss', reason: 'a restore whose start returned does not resume' };
      }
      if (state.point <= world.startedMarkIndex) return { kind: 'refused', reason: 'no restore: the crash came before its start returned' };
    } else {
      await until(() => !restores.isServing(world.image) || restores.list()[0]?.state === 'failed', 30_000, 'the resumed copy ends');
      const failed = restores.list()[0];
      if (failed) return { kind: 'loss', reason: `the resumed restore failed: ${failed.error ?? ''}` };
      // It retires once it stops serving: its directory goes a moment later.
      await until(() => fs.readdirSync(restoresDir).length === 0, 30_000, 'the finished restore removes its directory');
    }
  } catch (err) {
    return { kind: 'loss', reason: `resume: ${(err as Error).message}` };
  } finally {
    await restores.closeAll();
    events.close();
  }
  const bad = badPage(world, flushed, fs.readFileSync(world.image), 0, DEVICE_BYTES);
  if (bad !== undefined) return { kind: 'wrong', reason: `after the restore, the page at ${bad} is neither the backup's nor a write's` };
  return { kind: 'exact' };
}

export async function runInstantRestoreExploration(dir: string, options: { maxStates: number; seed: number; mixesPerPoint?: number }): Promise<CheckedRun> {
  const world = await recordInstantRestoreWorkload(dir);
  const { built, states } = exploreCrashStates(world.rec, { maxStates: options.maxStates, seed: options.seed, mixesPerPoint: options.mixesPerPoint });
  // No trace-level check of the flushes (unsyncedAtFlushAcks): the background copy writes the
  // target and the map while a client's flush runs, which a flush need not cover. What a flush
  // promises, that the client's writes before it survive, is checked on every state instead.
  const run: CheckedRun = { built, checked: 0, outcomes: new Map(), defects: [], refusals: new Map(), unsyncedFlushes: [] };
  for (const state of states) {
    const o = await checkInstantRestoreState(world, state);
    run.checked++;
    run.outcomes.set(o.kind, (run.outcomes.get(o.kind) ?? 0) + 1);
    if (o.kind === 'wrong' || o.kind === 'loss') run.defects.push(`${state.what}: ${o.kind}: ${o.reason ?? ''}`);
    if (o.kind === 'refused') run.refusals.set(o.reason ?? '', (run.refusals.get(o.reason ?? '') ?? 0) + 1);
  }
  return run;
}
