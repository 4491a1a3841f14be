/**
 * The change map under power loss (strict durability): writes through the tracking layer, a
 * snapshot take (advance, then a flush of the device), a requested reset and more writes are
 * recorded; on each crash state the map is opened again (after a reboot: another boot id) and
 * must either be reset (with its reason, the event the daemon sends) or report, for every
 * period of its generation that began at a snapshot take that ended before the crash, every
 * block whose content differs from that period's start: never under-report.
 */

import fs from 'node:fs';
import path from 'node:path';
import { FileDevice } from '../../src/device/file-device.js';
import { traceMark } from '../../src/host/fs-trace.js';
import { ChangeMap, TrackingDevice, trackingBlockSize } from '../../src/snapshot/change-map/index.js';
import { CrashRecorder, type Recording } from '../helpers/crash-recorder.js';
import { exploreCrashStates, materialize, type CrashState } from '../helpers/crash-states.js';
import { checkEachState, type CheckedRun, type Outcome } from './session-workload.js';

const DEVICE_BYTES = 8 * 64 * 1024;
/** The workload's marks, in order; TAKEN ends the snapshot take that begins period 2. */
const TAKEN = 'taken';
const MARKS = ['', 'opened', 'written 1', 'advanced', TAKEN, 'written 2', 'reset', 'written 3', 'closed'];

function fill(length: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) b[i] = (seed * 29 + i * 3 + (i >> 10)) & 0xff;
  return b;
}

export interface ChangeMapWorld {
  image: string;
  mapFile: string;
  rec: Recording;
  /** Device content at the start of each period, by generation then number. */
  starts: Map<string, Buffer[]>;
}

export async function recordChangeMapWorkload(dir: string, options: { flushAtTake: boolean } = { flushAtTake: true }): Promise<ChangeMapWorld> {
  const work = path.join(dir, 'work');
  fs.mkdirSync(work, { mode: 0o700 });
  const image = path.join(work, 'disk.img');
  fs.writeFileSync(image, fill(DEVICE_BYTES, 1));
  const mapFile = path.join(work, 'cbt', 'disk.map');
  const starts = new Map<string, Buffer[]>();
  const periodStarts = (map: ChangeMap): void => {
    const list = starts.get(map.generation) ?? [];
    list[map.number - 1] = fs.readFileSync(image);
    starts.set(map.generation, list);
  };
  const recorder = new CrashRecorder([work]);
  const dev = await FileDevice.open(image);
  recorder.start();
  try {
    const { map } = await ChangeMap.open({ file: mapFile, deviceSizeBytes: DEVICE_BYTES, durability: 'strict', bootId: 'boot-before' });
    periodStarts(map);
    traceMark('opened');
    const tracked = new TrackingDevice(dev, map);
    await tracked.write(fill(4096, 2), 0);
    await Promise.all([tracked.write(fill(70000, 3), 3 * 65536 + 100), tracked.write(fill(512, 4), 7 * 65536)]);
    traceMark('written 1');
    // A snapshot take, as the daemon does it: the map moved on under the barrier, then the
    // device flushed before the snapshot is recorded 'ok' (marked 'taken'). A snapshot not yet
    // taken is removed at the next start, so no backup is based on its period.
    map.advance();
    periodStarts(map);
    traceMark('advanced');
    if (options.flushAtTake) await tracked.flush();
    traceMark(TAKEN);
    await tracked.write(fill(8192, 5), 3 * 65536);
    await tracked.write(fill(4096, 6), 5 * 65536);
    traceMark('written 2');
    await map.reset('requested', 'cbt reset');
    periodStarts(map);
    traceMark('reset');
    await tracked.write(fill(4096, 7), 65536);
    await tracked.flush();
    traceMark('written 3');
    await map.close(null);
    traceMark('closed');
  } finally {
    recorder.stop();
    await dev.close();
  }
  if (recorder.unknown.length > 0) throw new Error(`the recording has gaps: ${recorder.unknown.join(', ')}`);
  return { image: fs.realpathSync(image), mapFile: path.join(fs.realpathSync(work), 'cbt', 'disk.map'), rec: recorder.stop(), starts };
}

export async function checkChangeMapState(world: ChangeMapWorld, state: CrashState): Promise<Outcome> {
  materialize(world.rec, state, [world.image]);
  const { map, reset } = await ChangeMap.open({ file: world.mapFile, deviceSizeBytes: DEVICE_BYTES, durability: 'strict', bootId: 'boot-after' });
  try {
    if (reset) return { kind: 'refused', reason: `reset (${reset.reason}): ${reset.detail.replace(/\/\S+/g, 'PATH')}` };
    const periods = world.starts.get(map.generation);
    if (periods === undefined) return { kind: 'wrong', reason: `generation ${map.generation} was never made` };
    if (map.number > periods.length + 1) return { kind: 'wrong', reason: `number ${map.number} is beyond the periods made (${periods.length})` };
    const device = fs.readFileSync(world.image);
    const block = trackingBlockSize(DEVICE_BYTES);
    // Period n > 1 begins at the take of snapshot n - 1, the base an incremental backup since
    // n - 1 builds on once the take has ended. (Period 1 begins at open or reset, which no
    // backup is taken at.)
    if (!MARKS.includes(state.mark)) throw new Error(`unknown mark '${state.mark}'`);
    const taken = MARKS.indexOf(state.mark) >= MARKS.indexOf(TAKEN);
    for (let n = 2; n <= Math.min(map.number, periods.length) && taken; n++) {
      const start = periods[n - 1]!;
      const reported = map.changedSince(n - 1);
      for (let b = 0; b * block < DEVICE_BYTES; b++) {
        const lo = b * block;
        const hi = Math.min(DEVICE_BYTES, lo + block);
        if (device.subarray(lo, hi).equals(start.subarray(lo, hi))) continue;
        if (!reported.some((r) => r.offsetBytes < hi && r.offsetBytes + r.lengthBytes > lo)) {
          return { kind: 'wrong', reason: `block ${b} changed since period ${n} of generation ${map.generation} began, and the map does not say so` };
        }
      }
    }
    return { kind: 'exact' };
  } finally {
    await map.close(null);
  }
}

export async function runChangeMapExploration(dir: string, options: { maxStates: number; seed: number; mixesPerPoint?: number; flushAtTake?: boolean }): Promise<CheckedRun> {
  const world = await recordChangeMapWorkload(dir, { flushAtTake: options.flushAtTake ?? true });
  const { built, states } = exploreCrashStates(world.rec, { maxStates: options.maxStates, seed: options.seed, mixesPerPoint: options.mixesPerPoint });
  const run: CheckedRun = { built, checked: 0, outcomes: new Map(), defects: [], refusals: new Map(), unsyncedFlushes: [] };
  return checkEachState(run, states, (state) => checkChangeMapState(world, state));
}
