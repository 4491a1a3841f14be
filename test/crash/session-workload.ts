/**
 * The session store under power loss: a strict-durability session's first writes, a flush, a
 * rewrite, more first writes and the end of the session are recorded; then each crash state is
 * put on disk and bdsnap recovers it as the daemon does on start (recoverSession) and restores
 * it (restore --output). A restore must give the device's start exactly or refuse with a
 * reason; a refusal while the device holds writes of the session loses data, which strict mode
 * promises never happens.
 */

import fs from 'node:fs';
import path from 'node:path';
import { BdsnapError } from '../../src/errors.js';
import { FileDevice } from '../../src/device/file-device.js';
import { traceMark } from '../../src/host/fs-trace.js';
import { CowDevice, listSessions, recoverSession, restore } from '../../src/snapshot/index.js';
import { CrashRecorder, type Recording } from '../helpers/crash-recorder.js';
import { exploreCrashStates, materialize, unsyncedAtFlushAcks, type CrashState } from '../helpers/crash-states.js';

export const DEVICE_BYTES = 64 * 4096 + 1536;

export interface Outcome {
  /** exact: restored the start; refused: with `reason`, nothing of the session's on the device; */
  /** loss: refused although the device holds writes of the session; wrong: a restore that is not the start. */
  kind: 'exact' | 'refused' | 'loss' | 'wrong';
  reason?: string;
}

export interface CheckedRun {
  built: number;
  checked: number;
  outcomes: Map<Outcome['kind'], number>;
  /** Defects: state description and what went wrong (wrong restores and losses). */
  defects: string[];
  /** Refusals, by reason (first few words), for the report. */
  refusals: Map<string, number>;
  /** Flush answers given while the device's writes were not all synced. */
  unsyncedFlushes: string[];
}

function pattern(length: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) b[i] = (seed * 131 + i * 7 + (i >> 8)) & 0xff;
  return b;
}

export interface SessionWorld {
  work: string;
  image: string;
  root: string;
  out: string;
  original: Buffer;
  rec: Recording;
  imageId: number;
}

/** Run the workload under the recorder in `dir` (empty). */
export async function recordSessionWorkload(dir: string): Promise<SessionWorld> {
  const work = path.join(dir, 'work');
  const out = path.join(dir, 'out');
  fs.mkdirSync(work, { mode: 0o700 });
  fs.mkdirSync(out, { mode: 0o700 });
  const image = path.join(work, 'disk.img');
  const original = pattern(DEVICE_BYTES, 3);
  fs.writeFileSync(image, original);
  const root = path.join(work, 'snap');
  const recorder = new CrashRecorder([work]);
  const dev = await FileDevice.open(image);
  recorder.start();
  try {
    const cow = CowDevice.create(dev, {
      devicePath: image, snapshotRoot: root, chunkSize: 4096, durability: 'strict', cloneMinBytes: Infinity,
      deviceIdentity: { ...dev.identity }, mountTime: new Date('2026-01-01T00:00:00Z'),
    });
    // Small first writes: one chunk, one crossing a chunk boundary, three chunks at once.
    await cow.write(pattern(4096, 10), 0);
    traceMark('write-acked 1');
    await cow.write(pattern(1000, 11), 8190);
    traceMark('write-acked 2');
    await Promise.all([cow.write(pattern(12288, 12), 40960), cow.write(pattern(700, 13), 20000)]);
    traceMark('write-acked 3');
    await cow.flush();
    traceMark('flush-acked 1');
    // A chunk preserved already (no copy), then first writes again, the partial last chunk too.
    await cow.write(pattern(4096, 14), 0);
    await cow.write(pattern(4096, 15), 100000);
    await cow.write(pattern(512, 16), DEVICE_BYTES - 512);
    traceMark('write-acked 4');
    await cow.flush();
    traceMark('flush-acked 2');
    await cow.close();
    traceMark('closed');
  } finally {
    recorder.stop();
    await dev.close();
  }
  const rec = recorder.stop();
  if (recorder.unknown.length > 0) throw new Error(`the recording has gaps: writes to files it never saw created: ${recorder.unknown.join(', ')}`);
  const imageId = rec.initial.files.find((f) => f.path === fs.realpathSync(image))!.id;
  return { work: fs.realpathSync(work), image: fs.realpathSync(image), root: path.join(fs.realpathSync(work), 'snap'), out, original, rec, imageId };
}

function short(reason: string): string {
  return reason.replace(/\/\S+/g, 'PATH').replace(/\d+/g, 'N').slice(0, 90);
}

/** Put `state` on disk and check what recovery and restore make of it. */
export async function checkSessionState(world: SessionWorld, state: CrashState, index: number): Promise<Outcome> {
  materialize(world.rec, state, [world.image]);
  const device = fs.readFileSync(world.image);
  const changed = !device.equals(world.original);
  const refuse = (reason: string): Outcome => ({ kind: changed ? 'loss' : 'refused', reason });
  const sessions = await listSessions(world.root);
  if (sessions.length === 0) return changed ? { kind: 'loss', reason: 'the device changed but no session directory is there' } : { kind: 'exact', reason: 'no session' };
  if (sessions.length > 1) return { kind: 'wrong', reason: `${sessions.length} sessions from one mount` };
  const s = sessions[0]!;
  if (s.state === 'unreadable') return refuse(`unreadable: ${s.problem ?? '?'}`);
  try {
    await recoverSession(s.dir);
  } catch (err) {
    return refuse(`recovery: ${(err as Error).message}`);
  }
  const output = path.join(world.out, `restored-${index}.img`);
  const attempt = async (force: boolean): Promise<Outcome> => {
    fs.rmSync(output, { force: true });
    await restore(s.dir, { output, force });
    const got = fs.readFileSync(output);
    fs.rmSync(output, { force: true });
    return got.equals(world.original) ? { kind: 'exact' } : { kind: 'wrong', reason: `restore${force ? ' --force' : ''} gave other content than the session's start` };
  };
  try {
    return await attempt(false);
  } catch (err) {
    // The harness rewrites the image, which moves its ctime: a complete session's end stamp
    // then disagrees (as it would after a crash that lost the image's mtime). --force
    // overrides that check only; the content must still be exact.
    if (err instanceof BdsnapError && err.code === 'EMISMATCH' && /outside bdsnap/.test(err.message)) {
      try {
        const forced = await attempt(true);
        return forced.kind === 'exact' ? { kind: 'exact', reason: 'stamp moved by the harness; exact with --force' } : forced;
      } catch (e) {
        return refuse(`restore --force: ${(e as Error).message}`);
      }
    }
    return refuse(`restore: ${(err as Error).message}`);
  }
}

/**
 * `check` of each crash state in turn, counted into `run`: every outcome by kind, a wrong
 * restore or a loss as a defect, a refusal by its reason.
 */
export async function checkEachState(run: CheckedRun, states: CrashState[], check: (state: CrashState) => Promise<Outcome>): Promise<CheckedRun> {
  for (const state of states) {
    const o = await check(state);
    run.checked++;
    run.outcomes.set(o.kind, (run.outcomes.get(o.kind) ?? 0) + 1);
    if (o.kind === 'wrong' || o.kind === 'loss') run.defects.push(`${state.what}: ${o.kind}: ${o.reason ?? ''}`);
    if (o.kind === 'refused') run.refusals.set(o.reason ?? '', (run.refusals.get(o.reason ?? '') ?? 0) + 1);
  }
  return run;
}

/** Record the workload in `dir`, explore its crash states and check each. */
export async function runSessionExploration(dir: string, options: { maxStates: number; seed: number; mixesPerPoint?: number }): Promise<CheckedRun> {
  const world = await recordSessionWorkload(dir);
  const { built, states } = exploreCrashStates(world.rec, { maxStates: options.maxStates, seed: options.seed, mixesPerPoint: options.mixesPerPoint });
  const run: CheckedRun = {
    built, checked: 0, outcomes: new Map(), defects: [], refusals: new Map(),
    unsyncedFlushes: unsyncedAtFlushAcks(world.rec, world.imageId, (l) => l.startsWith('flush-acked')),
  };
  for (const [i, state] of states.entries()) {
    const o = await checkSessionState(world, state, i);
    run.checked++;
    run.outcomes.set(o.kind, (run.outcomes.get(o.kind) ?? 0) + 1);
    if (o.kind === 'wrong' || o.kind === 'loss') run.defects.push(`${state.what}: ${o.kind}: ${o.reason ?? ''}`);
    if (o.kind === 'refused' || o.kind === 'loss') run.refusals.set(short(o.reason ?? ''), (run.refusals.get(short(o.reason ?? '')) ?? 0) + 1);
  }
  return run;
}
