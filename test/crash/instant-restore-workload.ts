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
 *
 * The source is a plain file of the backup's bytes, or (`source: 'repository'`) a backup in a
 * local repository, whose pieces the piece workers place into the target from their own
 * threads: the pool reports their writes to the recorder (piece-pool.ts), so that those states
 * are explored too.
 */

import fs from 'node:fs';
import path from 'node:path';
import { pino } from 'pino';
import { FileDevice } from '../../src/device/file-device.js';
import { traceMark } from '../../src/host/fs-trace.js';
import { createBackup } from '../../src/backup/index.js';
import { openBackupDevices } from '../../src/repository/backup-device.js';
import { LocalDirStore } from '../../src/repository/object-store.js';
import { Repository } from '../../src/repository/repository.js';
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

/** Where the restore reads: the backup's bytes in a plain file, or a backup in a local repository (placed by the piece workers). */
export type InstantRestoreSourceKind = 'file' | 'repository';

export interface InstantRestoreWorld {
  dir: string;
  source: InstantRestoreSourceKind;
  image: string;
  stateDir: string;
  rec: Recording;
  backup: Buffer;
  /** The writes, each with the number of the flush mark that covered it. */
  writes: Array<ClientWrite & { flushedBy: number }>;
  /** Whether a crash point lies after the start returned. */
  startedMarkIndex: number;
}

const REPO_DIR = 'repo';
const BACKUP_ID_FILE = 'backup-id';

/** `recording`: the workload's run, whose pieces are all to be placed from the workers' threads. */
function opener(dir: string, kind: InstantRestoreSourceKind, recording: boolean): SourceOpener {
  if (kind === 'repository') {
    return async () => {
      const repo = await Repository.open(new LocalDirStore(path.join(dir, REPO_DIR)));
      const opened = await openBackupDevices(repo, fs.readFileSync(path.join(dir, BACKUP_ID_FILE), 'utf8'));
      const found = opened.devices[0]!;
      if (!opened.placePiece) throw new Error('a local repository places its pieces');
      // From the first piece on the workers' threads, which is what this source is here for.
      if (recording) await opened.workersReady;
      return { source: found.device, slots: found.slots, pieceBytes: found.pieceBytes, fetchPieces: opened.fetchPieces, placePiece: opened.placePiece, close: () => opened.close() };
    };
  }
  return async () => {
    const source = await FileDevice.open(path.join(dir, 'backup.img'), { readOnly: true });
    const slots = Array.from({ length: SLOTS }, (_, i) => (HOLE_SLOTS.has(i) ? null : `piece-${i}`));
    return { source, slots, pieceBytes: PIECE_BYTES, close: () => source.close() };
  };
}

/** The backup in a local repository beside the recorded tree (not part of it: a crash never harms it). */
async function storeBackup(dir: string, backup: Buffer): Promise<void> {
  const repo = await Repository.init(new LocalDirStore(path.join(dir, REPO_DIR)), { encryption: false, pieceSizeBytes: PIECE_BYTES });
  const { id } = await createBackup(repo, [{ device: '/dev/lost', sizeBytes: backup.length, changed: null, why: 'crash workload', read: async (to, offset) => void backup.copy(to, 0, offset, offset + to.length) }]);
  fs.writeFileSync(path.join(dir, BACKUP_ID_FILE), id);
}

async function restoresIn(world: { dir: string; stateDir: string; source: InstantRestoreSourceKind }, recording: { rateBytes: number } | undefined): Promise<{ restores: InstantRestores; events: EventLog }> {
  const log = pino({ level: 'silent' });
  const eventsDir = path.join(world.dir, 'events');
  fs.mkdirSync(eventsDir, { recursive: true });
  const events = await EventLog.open(eventsDir, log);
  const restores = new InstantRestores({ stateDir: world.stateDir, events, log, openSource: opener(world.dir, world.source, recording !== undefined), ...(recording ? { rateBytes: recording.rateBytes } : {}) });
  return { restores, events };
}

async function until(what: () => boolean, timeoutMs: number, why: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!what()) {
    if (Date.now() > deadline) throw new Error(`timed out: ${why}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

export async function recordInstantRestoreWorkload(dir: string, source: InstantRestoreSourceKind = 'file'): Promise<InstantRestoreWorld> {
  const backup = fill(DEVICE_BYTES, 1);
  for (const i of HOLE_SLOTS) backup.fill(0, i * PIECE_BYTES, (i + 1) * PIECE_BYTES);
  fs.writeFileSync(path.join(dir, 'backup.img'), backup);
  if (source === 'repository') await storeBackup(dir, backup);
  const work = path.join(dir, 'work');
  fs.mkdirSync(work, { mode: 0o700 });
  const image = path.join(work, 'disk.img');
  // What the lost device holds: nothing of the backup's.
  fs.writeFileSync(image, fill(DEVICE_BYTES, 99));
  const stateDir = path.join(work, 'state');
  fs.mkdirSync(stateDir, { mode: 0o700 });
  // Slow enough that the client's writes land among the copy's fills.
  const { restores, events } = await restoresIn({ dir, stateDir, source }, { rateBytes: 2 * DEVICE_BYTES });
  const writes: InstantRestoreWorld['writes'] = [];
  let flushes = 0;
  const recorder = new CrashRecorder([work]);
  recorder.start();
  try {
    await restores.start({ repo: 'repo', backup: 'b1', device: image, target: image, output: false }, async () => undefined);
    traceMark('started');
    const handle = await restores.open(image);
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
  return { dir, source, image: fs.realpathSync(image), stateDir: fs.realpathSync(stateDir), rec, backup, writes, startedMarkIndex };
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
  const { restores, events } = await restoresIn(world, undefined);
  try {
    await restores.resumeAll();
    // A restore that cannot resume is kept as stopped, serving no one: judged as one that did not resume.
    const serving = (): boolean => restores.list().some((r) => r.target === fs.realpathSync(world.image) && r.state !== 'stopped');
    if (!serving()) {
      if (state.point > world.startedMarkIndex && fs.existsSync(restoresDir) && fs.readdirSync(restoresDir).length > 0) {
        return { kind: 'loss', reason: 'a restore whose start returned does not resume' };
      }
      if (state.point <= world.startedMarkIndex) return { kind: 'refused', reason: 'no restore: the crash came before its start returned' };
    } else {
      await until(() => !serving() || restores.list()[0]?.state === 'failed', 30_000, 'the resumed copy ends');
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

export async function runInstantRestoreExploration(dir: string, options: { maxStates: number; seed: number; mixesPerPoint?: number; source?: InstantRestoreSourceKind }): Promise<CheckedRun> {
  const world = await recordInstantRestoreWorkload(dir, options.source);
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
