/**
 * The backup repository under power loss: init, a full backup, an incremental one, forget of
 * the first and prune are recorded (the repository layer and createBackup, as `bdsnap backup`
 * runs them); then on each crash state every backup whose create had returned (and that was
 * not forgotten) must restore exactly, every backup listed at all must restore exactly (a
 * manifest is put last), and verify must pass.
 */

import fs from 'node:fs';
import path from 'node:path';
import { createBackup, restoreBackup, verifyRepository, type BackupSource } from '../../src/backup/index.js';
import { traceMark } from '../../src/host/fs-trace.js';
import { LocalDirStore } from '../../src/repository/object-store.js';
import { Repository } from '../../src/repository/repository.js';
import { CrashRecorder, type Recording } from '../helpers/crash-recorder.js';
import { exploreCrashStates, materialize, type CrashState } from '../helpers/crash-states.js';
import { checkEachState, type CheckedRun, type Outcome } from './session-workload.js';

/** The explored repository is encrypted, as new ones are. */
const PASSWORD = 'crash states';

const PIECE_BYTES = 64 * 1024;
const DEVICE_BYTES = 4 * PIECE_BYTES;
const DEVICE = '/dev/crash-explorer-device';

function content(seed: number, base?: Buffer): Buffer {
  const b = base ? Buffer.from(base) : Buffer.alloc(DEVICE_BYTES);
  // Changes one piece in four (and the first time, fills every piece differently).
  for (let p = 0; p < DEVICE_BYTES / PIECE_BYTES; p++) {
    if (base && p !== seed % 4) continue;
    for (let i = 0; i < PIECE_BYTES; i++) b[p * PIECE_BYTES + i] = (seed * 37 + p * 11 + i * 13 + (i >> 9)) & 0xff;
  }
  return b;
}

function source(data: Buffer, changed: BackupSource['changed'], base?: string): BackupSource {
  return {
    device: DEVICE, sizeBytes: data.length, changed, base, why: changed === null ? 'full' : 'incremental',
    read: (target, offsetBytes) => {
      data.copy(target, 0, offsetBytes, offsetBytes + target.length);
      return Promise.resolve();
    },
  };
}

export interface RepositoryWorld {
  repo: string;
  out: string;
  rec: Recording;
  /** Backup id -> the content it holds. */
  contents: Map<string, Buffer>;
}

export async function recordRepositoryWorkload(dir: string): Promise<RepositoryWorld> {
  const work = path.join(dir, 'work');
  const out = path.join(dir, 'out');
  fs.mkdirSync(work, { mode: 0o700 });
  fs.mkdirSync(out, { mode: 0o700 });
  const repoDir = path.join(work, 'repo');
  const contents = new Map<string, Buffer>();
  const recorder = new CrashRecorder([work]);
  recorder.start();
  try {
    const repo = await Repository.init(new LocalDirStore(repoDir), { pieceSizeBytes: PIECE_BYTES, codec: 'deflate', password: PASSWORD });
    traceMark('init returned');
    const first = content(1);
    const a = await createBackup(repo, [source(first, null)]);
    contents.set(a.id, first);
    traceMark(`created ${a.id}`);
    // Backup ids are made of the time: keep the second one apart.
    await new Promise((resolve) => setTimeout(resolve, 5));
    const second = content(2, first);
    const b = await createBackup(repo, [source(second, [{ offsetBytes: 2 * PIECE_BYTES, lengthBytes: PIECE_BYTES }], a.id)]);
    contents.set(b.id, second);
    traceMark(`created ${b.id}`);
    traceMark(`forgetting ${a.id}`);
    await repo.forget([a.id]);
    traceMark(`forgot ${a.id}`);
    await repo.prune();
    traceMark('pruned');
  } finally {
    recorder.stop();
  }
  if (recorder.unknown.length > 0) throw new Error(`the recording has gaps: ${recorder.unknown.join(', ')}`);
  return { repo: path.join(fs.realpathSync(work), 'repo'), out, rec: recorder.stop(), contents };
}

/** The marks before the state's crash point. */
function marksBefore(rec: Recording, point: number): string[] {
  return rec.entries.slice(0, point).flatMap((e) => (e.k === 'mark' ? [e.label] : []));
}

export async function checkRepositoryState(world: RepositoryWorld, state: CrashState): Promise<Outcome> {
  materialize(world.rec, state, []);
  const marks = marksBefore(world.rec, state.point);
  const returned = (label: string): boolean => marks.includes(label);
  let repo: Repository;
  try {
    repo = await Repository.open(new LocalDirStore(world.repo), { password: () => PASSWORD });
  } catch (err) {
    return returned('init returned') ? { kind: 'loss', reason: `the repository does not open: ${(err as Error).message}` } : { kind: 'refused', reason: `not initialised: ${(err as Error).message}` };
  }
  const listed = new Set(await repo.backupIds());
  for (const [id, want] of world.contents) {
    const mustBeThere = returned(`created ${id}`) && !returned(`forgetting ${id}`);
    if (!listed.has(id)) {
      if (mustBeThere) return { kind: 'loss', reason: `backup ${id}, whose create returned, is gone` };
      continue;
    }
    const output = path.join(world.out, 'restored.img');
    fs.rmSync(output, { force: true });
    try {
      await restoreBackup(repo, id, DEVICE, { output });
    } catch (err) {
      return { kind: mustBeThere ? 'loss' : 'wrong', reason: `backup ${id} is listed but does not restore: ${(err as Error).message}` };
    }
    const got = fs.readFileSync(output);
    fs.rmSync(output, { force: true });
    if (!got.equals(want)) return { kind: 'wrong', reason: `backup ${id} restores other content` };
  }
  const verified = await verifyRepository(repo);
  if (!verified.ok) return { kind: 'wrong', reason: `verify fails: ${[...verified.badPieces.map((p) => `${p.problem} ${p.detail}`), ...verified.unreadPieces.map((p) => `not read ${p.detail}`)].join('; ') || verified.backups.filter((b) => !b.ok).map((b) => b.problem).join('; ')}` };
  return { kind: 'exact' };
}

export async function runRepositoryExploration(dir: string, options: { maxStates: number; seed: number; mixesPerPoint?: number }): Promise<CheckedRun> {
  const world = await recordRepositoryWorkload(dir);
  const { built, states } = exploreCrashStates(world.rec, { maxStates: options.maxStates, seed: options.seed, mixesPerPoint: options.mixesPerPoint });
  const run: CheckedRun = { built, checked: 0, outcomes: new Map(), defects: [], refusals: new Map(), unsyncedFlushes: [] };
  return checkEachState(run, states, (state) => checkRepositoryState(world, state));
}
