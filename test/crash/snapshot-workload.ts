/**
 * A snapshot under power loss, through the daemon itself (in this process, so that the
 * recording sees its calls): a snapshot is taken of a device in use (strict durability),
 * then the device is written (copy-before-write into the difference storage) and flushed.
 * On each crash state the daemon is started, as after a reboot, and each snapshot it serves
 * must show exactly the device as it was at the take, or be failed; a snapshot whose create
 * returned must not vanish silently.
 */

import fs from 'node:fs';
import path from 'node:path';
import { pino } from 'pino';
import { FLUSH_ANSWERED_MARK, traceMark } from '../../src/host/fs-trace.js';
import { NbdClient } from '../../src/nbd/client.js';
import { BdsnapClient } from '../../src/service/client.js';
import { Daemon } from '../../src/service/daemon.js';
import { CrashRecorder, type Recording } from '../helpers/crash-recorder.js';
import { exploreCrashStates, materialize, unsyncedAtFlushAcks, type CrashState } from '../helpers/crash-states.js';
import { checkEachState, type CheckedRun, type Outcome } from './session-workload.js';

const DEVICE_BYTES = 1 << 20;

function fill(length: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) b[i] = (seed * 41 + i * 5 + (i >> 11)) & 0xff;
  return b;
}

export interface SnapshotWorld {
  dir: string;
  image: string;
  rec: Recording;
  /** The device at the take. */
  atTake: Buffer;
  id: string;
}

function daemonOptions(dir: string): Parameters<typeof Daemon.start>[0] {
  const work = path.join(dir, 'work');
  return {
    runDir: path.join(dir, 'run'), stateDir: path.join(work, 'state'), snapshotRoot: path.join(work, 'snap'), log: pino({ level: 'silent' }),
    session: { durability: 'strict' },
    // The harness rewrites the image for each state, which moves its ctime: a change map would
    // take that for a write while bdsnap was down, every time (change-map-workload.ts covers it).
    changeTracking: false,
  };
}

export async function recordSnapshotWorkload(dir: string): Promise<SnapshotWorld> {
  const work = path.join(dir, 'work');
  fs.mkdirSync(work, { recursive: true, mode: 0o700 });
  const image = path.join(work, 'disk.img');
  fs.writeFileSync(image, fill(DEVICE_BYTES, 1));
  const daemon = await Daemon.start(daemonOptions(dir));
  const client = await BdsnapClient.connect(daemon.runDir);
  let nbd: NbdClient | undefined;
  const recorder = new CrashRecorder([work]);
  try {
    // A snapshot taken and dropped makes the daemon serve the image.
    await client.destroySnapshot((await client.createSnapshot([image])).id);
    nbd = await NbdClient.connect({ socketPath: daemon.nbdSocket, exportName: image });
    await nbd.write(fill(65536, 2), 0);
    await nbd.flush();
    const atTake = fs.readFileSync(image);
    recorder.start();
    const { id } = await client.createSnapshot([image], { freeze: false });
    traceMark('created');
    await nbd.write(fill(4096, 3), 8192);
    await nbd.write(fill(196608, 4), 303104);
    traceMark('written');
    await nbd.flush();
    traceMark('flushed');
    await nbd.write(fill(4096, 5), DEVICE_BYTES - 4096);
    await nbd.flush();
    traceMark('flushed 2');
    recorder.stop();
    if (recorder.unknown.length > 0) throw new Error(`the recording has gaps: ${recorder.unknown.join(', ')}`);
    return { dir, image: fs.realpathSync(image), rec: recorder.stop(), atTake, id };
  } finally {
    recorder.stop();
    await nbd?.close().catch(() => undefined);
    client.close();
    await daemon.close();
  }
}

export async function checkSnapshotState(world: SnapshotWorld, state: CrashState): Promise<Outcome> {
  materialize(world.rec, state, [world.image]);
  const created = world.rec.entries.slice(0, state.point).some((e) => e.k === 'mark' && e.label === 'created');
  let daemon: Daemon;
  try {
    daemon = await Daemon.start(daemonOptions(world.dir));
  } catch (err) {
    return { kind: 'loss', reason: `the daemon does not start: ${(err as Error).message}` };
  }
  const client = await BdsnapClient.connect(daemon.runDir);
  try {
    const found = (await client.listSnapshots()).find((s) => s.id === world.id);
    if (!found) return created ? { kind: 'loss', reason: 'a snapshot whose create returned is gone' } : { kind: 'exact', reason: 'no snapshot' };
    if (found.state !== 'ok') return { kind: 'refused', reason: `snapshot ${found.state}: ${(found.reason ?? '').replace(/\/\S+/g, 'PATH')}` };
    const nbd = await NbdClient.connect({ socketPath: daemon.nbdSocket, exportName: `${world.image}@${world.id}` });
    try {
      const got = Buffer.alloc(DEVICE_BYTES);
      for (let at = 0; at < DEVICE_BYTES; at += 256 * 1024) {
        await nbd.read(got.subarray(at, Math.min(DEVICE_BYTES, at + 256 * 1024)), at);
      }
      return got.equals(world.atTake) ? { kind: 'exact' } : { kind: 'wrong', reason: 'the image is not the device at the take' };
    } catch (err) {
      return { kind: 'refused', reason: `image read fails: ${(err as Error).message}` };
    } finally {
      await nbd.close().catch(() => undefined);
    }
  } finally {
    client.close();
    await daemon.close();
  }
}

export async function runSnapshotExploration(dir: string, options: { maxStates: number; seed: number; mixesPerPoint?: number }): Promise<CheckedRun> {
  const world = await recordSnapshotWorkload(dir);
  const { built, states } = exploreCrashStates(world.rec, { maxStates: options.maxStates, seed: options.seed, mixesPerPoint: options.mixesPerPoint });
  const imageId = world.rec.initial.files.find((f) => f.path === world.image)!.id;
  const run: CheckedRun = {
    built, checked: 0, outcomes: new Map(), defects: [], refusals: new Map(),
    unsyncedFlushes: unsyncedAtFlushAcks(world.rec, imageId, (label) => label === FLUSH_ANSWERED_MARK),
  };
  return checkEachState(run, states, (state) => checkSnapshotState(world, state));
}
