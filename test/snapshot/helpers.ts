/**
 * Shared helpers of the snapshot tests: temp dirs, error predicates, killed writers, and the
 * pieces the model-based tests of the engine share (the device size and ranges they draw, the
 * content pattern, the points of a layer and the sessions of a device with what each must
 * show). No tests in here.
 */

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { BdsnapError, type ErrorCode } from '../../src/errors.js';
import type { BlockDevice } from '../../src/device/block-device.js';
import type { FileDevice } from '../../src/device/file-device.js';
import { DATA_FILE } from '../../src/snapshot/format.js';
import {
  CowDevice, DiffStorage, listSessions, recoverSession, restore, type DiffStorageOptions, type SnapshotImage, type SnapshotLayer,
} from '../../src/snapshot/index.js';
import { makeTempDir, type AfterHook } from '../../testkit/files.js';

export interface TestContext {
  after: (fn: () => unknown) => void;
}

/** A temporary directory removed after the test (the one implementation is testkit/files.ts). */
export function tempDir(t: AfterHook, prefix = 'bdsnap-snap-'): string {
  return makeTempDir(t, prefix);
}

/** Predicate for assert.rejects: a BdsnapError with this code whose message matches. */
export function isError(code: ErrorCode, message?: RegExp): (e: unknown) => boolean {
  return (e: unknown) => {
    if (!(e instanceof BdsnapError)) throw new Error(`expected BdsnapError ${code}, got ${String(e)}`);
    if (e.code !== code) throw new Error(`expected code ${code}, got ${e.code}: ${e.message}`);
    if (message && !message.test(e.message)) throw new Error(`message "${e.message}" does not match ${message}`);
    return true;
  };
}

export function onlyDir(root: string): string {
  const entries = fs.readdirSync(root);
  if (entries.length !== 1) throw new Error(`expected one session directory in ${root}, found ${entries.join(', ')}`);
  return path.join(root, entries[0]!);
}

/**
 * Run a fixture writer (it acts only with BDSNAP_CRASH_WRITER=1) until it prints its first
 * line, let it write for `runMs`, SIGKILL it, and return what it printed.
 */
export async function killWhileWriting(script: string, args: string[], runMs: number): Promise<string> {
  const child = spawn(process.execPath, [script, ...args], { env: { ...process.env, BDSNAP_CRASH_WRITER: '1' }, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<NodeJS.Signals | null>((resolve) => child.on('exit', (_code, signal) => resolve(signal)));
  try {
    const deadline = Date.now() + 10_000;
    while (!out.includes('\n')) {
      if (Date.now() > deadline || child.exitCode !== null) throw new Error(`the writer did not start: ${err}`);
      await new Promise((r) => setTimeout(r, 10));
    }
    await new Promise((r) => setTimeout(r, runMs));
  } finally {
    child.kill('SIGKILL');
  }
  assert.equal(await exited, 'SIGKILL', `the writer died on its own: ${err}`);
  return out;
}

/** Append something that is not a valid record to the newest file of a storage. */
export function tearTail(storage: DiffStorage, how: number): void {
  const { dirs } = storage.usage();
  const files = dirs.flatMap((d) => fs.readdirSync(d).filter((n) => n.startsWith(`${storage.id}.`) && n.endsWith('.rec')).map((n) => path.join(d, n)));
  files.sort((a, b) => Number(a.split('.').at(-2)) - Number(b.split('.').at(-2)));
  const newest = files.at(-1)!;
  const all = files.map((f) => fs.readFileSync(f)).find((b) => b.length > 0);
  if (how === 1 || all === undefined) {
    fs.appendFileSync(newest, Buffer.from(Array.from({ length: 100 }, (_, i) => (7 * 31 + i * 7) & 0xff)));
    return;
  }
  const firstRecord = all.subarray(0, 64 + all.readUInt32LE(16));
  if (how === 2) {
    fs.appendFileSync(newest, firstRecord.subarray(0, firstRecord.length - 1)); // truncated payload
  } else {
    const flipped = Buffer.from(firstRecord);
    flipped[flipped.length - 1]! ^= 0xff; // CRC mismatch
    fs.appendFileSync(newest, flipped);
  }
}

/** The device size of the model tests: not a multiple of any chunk size, so the last chunk is partial. */
export const MODEL_SIZE = 30 * 4096 + 2048;

export type Range = { offset: number; length: number };
export type Seeded = Range & { seed: number };

export const rangeArb: fc.Arbitrary<Range> = fc.tuple(fc.integer({ min: 0, max: MODEL_SIZE - 1 }), fc.integer({ min: 1, max: 40000 }))
  .map(([offset, length]) => ({ offset, length: Math.min(length, MODEL_SIZE - offset) }));
export const seededArb: fc.Arbitrary<Seeded> = fc.tuple(rangeArb, fc.integer({ min: 1, max: 255 })).map(([r, seed]) => ({ ...r, seed }));

/** Bytes that differ by seed and by position (also within a chunk), so a misplaced copy shows. */
export function pattern(length: number, seed: number, offset: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) b[i] = (seed * 31 + (offset + i) * 7 + ((offset + i) >> 9)) & 0xff;
  return b;
}

/** What a model test does to the device itself. */
export type DeviceOp =
  | ({ kind: 'write'; fua?: boolean } & Seeded)
  | ({ kind: 'zero' } & Range)
  | ({ kind: 'trim' } & Range)
  | { kind: 'flush' };

/** `op` done to `target`, and to `model`, which holds what the device must then hold. */
export async function applyDeviceOp(target: BlockDevice, model: Buffer, op: DeviceOp): Promise<void> {
  switch (op.kind) {
    case 'write': {
      const data = pattern(op.length, op.seed, op.offset);
      await target.write(data, op.offset, { fua: op.fua ?? false });
      data.copy(model, op.offset);
      break;
    }
    case 'zero':
      await target.zero(op.offset, op.length);
      model.fill(0, op.offset, op.offset + op.length);
      break;
    case 'trim':
      // FileDevice trims are advisory: the content stays, but the originals must be kept.
      await target.trim(op.offset, op.length);
      break;
    case 'flush':
      await target.flush();
      break;
  }
}

/** The operations on a device with snapshot points that more than one model test draws. */
export type PointOp =
  | DeviceOp
  | { kind: 'burst'; writes: Seeded[]; reads: Array<Range & { pick: number }> }
  | ({ kind: 'image-read'; pick: number } & Range)
  | ({ kind: 'image-write'; pick: number; zero: boolean } & Seeded)
  | { kind: 'take'; before: Seeded; during: Seeded };

/** One arbitrary per PointOp kind; each test weighs them its own way. */
export const pointOpArbs = {
  write: seededArb.map((r) => ({ kind: 'write' as const, ...r })),
  zero: rangeArb.map((r) => ({ kind: 'zero' as const, ...r })),
  trim: rangeArb.map((r) => ({ kind: 'trim' as const, ...r })),
  flush: fc.constant({ kind: 'flush' as const }),
  burst: fc.tuple(fc.array(seededArb, { minLength: 1, maxLength: 5 }), fc.array(fc.tuple(rangeArb, fc.nat()).map(([r, pick]) => ({ ...r, pick })), { maxLength: 4 }))
    .map(([writes, reads]) => ({ kind: 'burst' as const, writes, reads })),
  imageRead: fc.tuple(fc.nat(), rangeArb).map(([pick, r]) => ({ kind: 'image-read' as const, pick, ...r })),
  imageWrite: fc.tuple(fc.nat(), seededArb, fc.boolean()).map(([pick, r, zero]) => ({ kind: 'image-write' as const, pick, zero, ...r })),
  take: fc.tuple(seededArb, seededArb).map(([before, during]) => ({ kind: 'take' as const, before, during })),
};

export interface ModelPoint {
  options: DiffStorageOptions;
  storage: DiffStorage;
  image: SnapshotImage;
  /** What the image must show. */
  content: Buffer;
  /** Storages of earlier lives (before a simulated kill), closed at the end. */
  dropped: DiffStorage[];
}

/** The snapshot points of one model run, each with the content its image must show. */
export class ModelPoints {
  readonly list: ModelPoint[] = [];
  #nextId = 0;

  constructor(readonly dir: string, readonly chunkSize: number) {}

  /** A number not used before in this run, for names of storages and their directories. */
  nextId(): number {
    return this.#nextId++;
  }

  pick(n: number): ModelPoint | undefined {
    return this.list[n % Math.max(1, this.list.length)];
  }

  async check(p: ModelPoint, offset: number, length: number, what: string): Promise<void> {
    const got = Buffer.alloc(length);
    await p.image.read(got, offset);
    assert.ok(got.equals(p.content.subarray(offset, offset + length)), `${what}: image ${p.options.id} at ${offset}+${length}`);
  }

  /**
   * A new point of `layer` now, through the barrier: `before`, written as hold() starts, is in it;
   * `during`, issued while held, is not, and must wait for release(). `model` (the device
   * content) takes both.
   */
  async take(layer: SnapshotLayer, write: (w: Seeded) => Promise<void>, model: Buffer, before?: Seeded, during?: Seeded): Promise<void> {
    const storeDir = path.join(this.dir, `store-${this.#nextId}`);
    fs.mkdirSync(storeDir, { mode: 0o700 });
    const options: DiffStorageOptions = { id: `snap${this.#nextId++}`, dirs: [storeDir], chunkSize: this.chunkSize };
    const storage = await DiffStorage.create(options);
    const writing = before ? write(before) : Promise.resolve();
    const holding = layer.hold();
    if (before) pattern(before.length, before.seed, before.offset).copy(model, before.offset);
    await holding;
    let reached = false;
    const held = during ? write(during).then(() => (reached = true)) : Promise.resolve();
    this.list.push({ options, storage, image: layer.addPoint(storage, 0), content: Buffer.from(model), dropped: [] });
    await new Promise((resolve) => setImmediate(resolve));
    assert.equal(reached, false, 'a write issued while held waits for release()');
    layer.release();
    await Promise.all([writing, held]);
    if (during) pattern(during.length, during.seed, during.offset).copy(model, during.offset);
  }

  /** A write or zero to a picked image, which only that image shows. */
  async imageWrite(op: PointOp & { kind: 'image-write' }): Promise<void> {
    const p = this.pick(op.pick);
    if (!p) return;
    if (op.zero) {
      await p.image.zero(op.offset, op.length);
      p.content.fill(0, op.offset, op.offset + op.length);
    } else {
      await p.image.write(pattern(op.length, op.seed + 1000, op.offset), op.offset);
      pattern(op.length, op.seed + 1000, op.offset).copy(p.content, op.offset);
    }
  }

  /**
   * After a simulated kill (storages dropped without close, a torn record of kind `torn`
   * appended when it is above 0): every storage reopened, its point added to `layer` again and
   * its whole image checked.
   */
  async reopen(layer: SnapshotLayer, torn: number): Promise<void> {
    for (const p of this.list) {
      if (torn > 0) tearTail(p.storage, torn);
      p.dropped.push(p.storage);
      p.storage = await DiffStorage.open(p.options);
      assert.equal(p.storage.state, 'ok');
      await layer.hold();
      p.image = layer.addPoint(p.storage, 0);
      layer.release();
      await this.check(p, 0, MODEL_SIZE, 'image after a restart');
    }
  }

  /** Every point off `layer`, every storage of every life closed. */
  async close(layer: SnapshotLayer): Promise<void> {
    for (const p of this.list) {
      await layer.removePoint(p.image);
      for (const s of p.dropped) await s.close();
      await p.storage.close();
    }
  }
}

/** The mount sessions of one model run, each with the content it started from. */
export class ModelSessions {
  /** Start content of every session that left a directory, oldest first. */
  readonly starts: Array<{ dir: string; content: Buffer }> = [];
  /** What the view of the running session must show. */
  start = Buffer.alloc(0);
  #mountMs = Date.parse('2026-01-01T00:00:00Z');

  constructor(readonly dev: FileDevice, readonly image: string, readonly root: string, readonly chunkSize: number) {}

  /** A new session on `base`, whose device now holds `model`. */
  open(base: BlockDevice, model: Buffer): CowDevice {
    this.start = Buffer.from(model);
    this.#mountMs += 1000;
    return CowDevice.create(base, { devicePath: this.image, snapshotRoot: this.root, chunkSize: this.chunkSize, deviceIdentity: { ...this.dev.identity }, mountTime: new Date(this.#mountMs) });
  }

  ended(cow: CowDevice): void {
    if (cow.sessionDir) this.starts.push({ dir: cow.sessionDir, content: this.start });
  }

  /**
   * The process dies: `cow` is dropped without close, what is in the store file is what a killed
   * process leaves (a torn record after it if `torn`), and recovery finds it interrupted.
   */
  async kill(cow: CowDevice, torn: boolean): Promise<void> {
    await cow.dropAsIfKilled();
    this.ended(cow);
    if (torn && cow.sessionDir) fs.appendFileSync(path.join(cow.sessionDir, DATA_FILE), pattern(100, 7, 0));
    if (cow.sessionDir) assert.equal((await recoverSession(cow.sessionDir)).state, 'interrupted');
  }

  /**
   * Once every session has ended: they are listed, a restore of session `pick` (modulo their
   * number) gives back its start, and then one of the oldest the very `first` content. False
   * when no session left a directory.
   */
  async restoresEach(pick: number, first: Buffer): Promise<boolean> {
    const listed = await listSessions(this.root, this.image);
    assert.deepEqual(listed.map((s) => s.dir), this.starts.map((s) => s.dir));
    if (this.starts.length === 0) return false;
    const k = pick % this.starts.length;
    const r1 = await restore(this.starts[k]!.dir);
    assert.equal(r1.sessionsApplied.length, this.starts.length - k);
    assert.deepEqual(fs.readFileSync(this.image), this.starts[k]!.content, `restore of session ${k} of ${this.starts.length}`);
    await restore(this.starts[0]!.dir);
    assert.deepEqual(fs.readFileSync(this.image), first, 'restore of the oldest gives the very first content');
    return true;
  }
}
