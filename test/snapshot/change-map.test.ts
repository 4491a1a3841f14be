/**
 * The change map: a model-based property test (random writes, trims, zeroes, snapshots,
 * clean closes and kills against an in-memory model of what changed), the reset rules (new,
 * host crash, changed outside as image and block device stamps show it, size, corruption,
 * request), strict group commit, the frozen views' files, TrackingDevice's ordering, and the
 * time of changedSince on a 1 TiB map.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import fc from 'fast-check';
import type { BlockDevice, Extent } from '../../src/device/block-device.js';
import { ChangeMap, FrozenChangeMap, TrackingDevice, trackingBlockSize, type ByteRange, type DeviceStamp } from '../../src/snapshot/change-map/index.js';
import { makeImage } from '../../testkit/files.js';
import { tempDir } from './helpers.js';

const BLOCK = 64 * 1024;
const SIZE = 40 * BLOCK + 5000; // the last block is partial

/** A device in memory that records, at each modifying call, what the map said then. */
class MemoryDevice implements BlockDevice {
  readonly size: number;
  readonly readOnly = false;
  readonly blockSizes = { minimum: 1, preferred: 4096, maximum: 32 << 20 };
  readonly canTrim = true;
  readonly canFastZero = true;
  readonly canMultiConn = true;
  readonly data: Buffer;
  onModify: ((offsetBytes: number, lengthBytes: number) => void) | undefined;

  constructor(size: number) {
    this.size = size;
    this.data = Buffer.alloc(size);
  }
  async read(target: Buffer, offsetBytes: number): Promise<void> {
    this.data.copy(target, 0, offsetBytes, offsetBytes + target.length);
  }
  async write(data: Buffer, offsetBytes: number): Promise<void> {
    this.onModify?.(offsetBytes, data.length);
    data.copy(this.data, offsetBytes);
  }
  async flush(): Promise<void> {}
  async trim(offsetBytes: number, lengthBytes: number): Promise<void> {
    this.onModify?.(offsetBytes, lengthBytes);
    this.data.fill(0, offsetBytes, offsetBytes + lengthBytes);
  }
  async zero(offsetBytes: number, lengthBytes: number): Promise<void> {
    this.onModify?.(offsetBytes, lengthBytes);
    this.data.fill(0, offsetBytes, offsetBytes + lengthBytes);
  }
  async cache(): Promise<void> {}
  async extents(_offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    return [{ length: lengthBytes, flags: 0 }];
  }
  async close(): Promise<void> {}
}

/** Merged byte ranges of the model's blocks with number > since. */
function modelRanges(model: Uint32Array, since: number, sizeBytes: number): ByteRange[] {
  const out: ByteRange[] = [];
  for (let i = 0; i < model.length; i++) {
    if (model[i]! <= since) continue;
    const from = i * BLOCK;
    const to = Math.min(sizeBytes, (i + 1) * BLOCK);
    const prev = out[out.length - 1];
    if (prev && prev.offsetBytes + prev.lengthBytes === from) prev.lengthBytes += to - from;
    else out.push({ offsetBytes: from, lengthBytes: to - from });
  }
  return out;
}

function covers(ranges: ByteRange[], offsetBytes: number, lengthBytes: number): boolean {
  let at = offsetBytes;
  const end = offsetBytes + lengthBytes;
  for (const r of ranges) {
    if (r.offsetBytes <= at && r.offsetBytes + r.lengthBytes > at) at = r.offsetBytes + r.lengthBytes;
    if (at >= end) return true;
  }
  return at >= end;
}

type Op =
  | { kind: 'write' | 'trim' | 'zero'; offset: number; length: number }
  | { kind: 'burst'; writes: Array<{ offset: number; length: number }> }
  | { kind: 'snapshot'; save: boolean }
  | { kind: 'image-write'; offset: number; length: number }
  | { kind: 'close' | 'kill' };

const range = fc.tuple(fc.integer({ min: 0, max: SIZE - 1 }), fc.integer({ min: 1, max: 3 * BLOCK }), fc.boolean())
  .map(([offset, length, aligned]) => {
    const o = aligned ? Math.floor(offset / BLOCK) * BLOCK : offset;
    const l = aligned ? Math.ceil(length / BLOCK) * BLOCK : length;
    return { offset: o, length: Math.min(l, SIZE - o) };
  });

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 6, arbitrary: range.map((r) => ({ kind: 'write' as const, ...r })) },
  { weight: 1, arbitrary: range.map((r) => ({ kind: 'trim' as const, ...r })) },
  { weight: 1, arbitrary: range.map((r) => ({ kind: 'zero' as const, ...r })) },
  { weight: 2, arbitrary: fc.array(range, { minLength: 2, maxLength: 6 }).map((writes) => ({ kind: 'burst' as const, writes })) },
  { weight: 2, arbitrary: fc.boolean().map((save) => ({ kind: 'snapshot' as const, save })) },
  { weight: 1, arbitrary: range.map((r) => ({ kind: 'image-write' as const, ...r })) },
  { weight: 1, arbitrary: fc.constant({ kind: 'close' as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: 'kill' as const }) },
);

test('the change map matches the model through writes, snapshots, closes and kills', async (t) => {
  const top = tempDir(t, 'bdsnap-cbt-model-');
  let run = 0;
  await fc.assert(
    fc.asyncProperty(fc.constantFrom<'process' | 'strict'>('process', 'strict'), fc.array(opArb, { minLength: 1, maxLength: 30 }), async (durability, ops) => {
      const dir = path.join(top, `run-${run++}`);
      const file = path.join(dir, 'device.cbt');
      const first = await ChangeMap.open({ file, deviceSizeBytes: SIZE, durability, bootId: 'boot-1' });
      assert.equal(first.reset?.reason, 'new');
      let map = first.map;
      const generation = map.generation;
      const device = new MemoryDevice(SIZE);
      let tracked = new TrackingDevice(device, map);
      const blocks = Math.ceil(SIZE / BLOCK);
      const model = new Uint32Array(blocks);
      let number = 1;
      const snapshots: Array<{ frozen: FrozenChangeMap; model: Uint32Array; file?: string }> = [];
      const touch = (m: Uint32Array, offset: number, length: number, n: number): void => {
        for (let i = Math.floor(offset / BLOCK); i <= Math.floor((offset + length - 1) / BLOCK); i++) m[i] = n;
      };
      // Every modifying call must find its range already marked.
      device.onModify = (offset, length) => assert.ok(covers(map.changedSince(number - 1), offset, length), `marked before ${offset}+${length} reached the device`);
      try {
        for (const op of ops) {
          switch (op.kind) {
            case 'write':
              await tracked.write(Buffer.alloc(op.length, 7), op.offset);
              touch(model, op.offset, op.length, number);
              break;
            case 'trim':
              await tracked.trim(op.offset, op.length);
              touch(model, op.offset, op.length, number);
              break;
            case 'zero':
              await tracked.zero(op.offset, op.length);
              touch(model, op.offset, op.length, number);
              break;
            case 'burst':
              await Promise.all(op.writes.map((w) => tracked.write(Buffer.alloc(w.length, 3), w.offset)));
              for (const w of op.writes) touch(model, w.offset, w.length, number);
              break;
            case 'snapshot': {
              const frozen = map.advance();
              assert.equal(frozen.number, number);
              const entry: { frozen: FrozenChangeMap; model: Uint32Array; file?: string } = { frozen, model: model.slice() };
              if (op.save) {
                entry.file = path.join(dir, `snap-${number}.cbtf`);
                await frozen.save(entry.file);
              }
              snapshots.push(entry);
              number++;
              break;
            }
            case 'image-write': {
              const s = snapshots[snapshots.length - 1];
              if (!s) break;
              // The daemon marks the image's frozen view and the live map.
              s.frozen.mark(op.offset, op.length);
              touch(s.model, op.offset, op.length, s.frozen.number);
              await map.markDirty([{ offsetBytes: op.offset, lengthBytes: op.length }]);
              touch(model, op.offset, op.length, number);
              break;
            }
            case 'close':
            case 'kill': {
              if (op.kind === 'close') await map.close(null);
              // kill: the object is dropped as is; what is in the file is what a killed process leaves.
              const reopened = await ChangeMap.open({ file, deviceSizeBytes: SIZE, durability, bootId: 'boot-1' });
              assert.equal(reopened.reset, null, `kept after ${op.kind}`);
              map = reopened.map;
              tracked = new TrackingDevice(device, map);
              assert.equal(map.generation, generation);
              assert.equal(map.number, number);
              break;
            }
          }
          for (let since = 0; since <= number; since++) {
            assert.deepEqual(map.changedSince(since), modelRanges(model, since, SIZE), `live map since ${since} after ${op.kind}`);
          }
        }
        for (const s of snapshots) {
          const views = s.file ? [s.frozen, await FrozenChangeMap.load(s.file)] : [s.frozen];
          for (const view of views) {
            for (let since = 0; since < s.frozen.number; since++) {
              const want = modelRanges(s.model, since, SIZE);
              assert.deepEqual(view.changedSince(since), want, `snapshot ${s.frozen.number} since ${since}`);
              // The extents say the same, contiguous over the whole device.
              let at = 0;
              const dirty: ByteRange[] = [];
              for (const e of view.extents(since, 0, SIZE)) {
                if (e.flags & 1) dirty.push({ offsetBytes: at, lengthBytes: e.length });
                at += e.length;
              }
              assert.equal(at, SIZE);
              assert.deepEqual(dirty, want);
            }
            if (view !== s.frozen) await view.close();
          }
          await s.frozen.close();
        }
      } finally {
        await map.close(null).catch(() => undefined);
      }
    }),
    { numRuns: 40 },
  );
});

test('process durability: an unclean map from another boot is reset (host crash); a clean one is kept', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'd.cbt');
  const opts = { file, deviceSizeBytes: SIZE, durability: 'process' as const };
  const { map } = await ChangeMap.open({ ...opts, bootId: 'boot-1' });
  map.mark(0, 4096);
  map.advance();
  map.mark(BLOCK * 3, 10);
  const generation = map.generation;
  // Host crash: the map file's last writes are lost (here: the entries), and the boot id changes.
  fs.truncateSync(file, 4096);
  fs.truncateSync(file, 4096 + Math.ceil(SIZE / BLOCK) * 4);
  const after = await ChangeMap.open({ ...opts, bootId: 'boot-2' });
  assert.equal(after.reset?.reason, 'host-crash');
  assert.equal(after.reset?.previousGeneration, generation);
  assert.match(after.reset?.detail ?? '', /not closed cleanly/);
  assert.notEqual(after.map.generation, generation);
  assert.equal(after.map.number, 1);
  assert.deepEqual(after.map.changedSince(0), []);
  after.map.mark(0, 1);
  await after.map.close(null);
  // Closed cleanly: another boot may open it.
  const again = await ChangeMap.open({ ...opts, bootId: 'boot-3' });
  assert.equal(again.reset, null);
  assert.deepEqual(again.map.changedSince(0), [{ offsetBytes: 0, lengthBytes: BLOCK }]);
  await again.map.close(null);
});

test('strict durability: a host crash keeps the map; marks wait for the group sync, rewrites of durable blocks do not', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'd.cbt');
  const opts = { file, deviceSizeBytes: SIZE, durability: 'strict' as const };
  const { map } = await ChangeMap.open({ ...opts, bootId: 'boot-1' });
  const p1 = map.mark(0, 100);
  const p2 = map.mark(50, 100); // same block, not durable yet: must wait too
  const p3 = map.mark(5 * BLOCK, 2 * BLOCK);
  assert.ok(p1 instanceof Promise && p2 instanceof Promise && p3 instanceof Promise);
  await Promise.all([p1, p2, p3]);
  assert.equal(map.mark(10, 10), undefined, 'a durable block costs nothing');
  const frozen = map.advance();
  assert.equal(frozen.number, 1);
  await map.mark(BLOCK * 9, 1);
  const generation = map.generation;
  // Killed and the host restarted: nothing to reset.
  const after = await ChangeMap.open({ ...opts, bootId: 'boot-2' });
  assert.equal(after.reset, null);
  assert.equal(after.map.generation, generation);
  assert.equal(after.map.number, 2);
  assert.deepEqual(after.map.changedSince(1), [{ offsetBytes: 9 * BLOCK, lengthBytes: BLOCK }]);
  assert.deepEqual(after.map.changedSince(0), [{ offsetBytes: 0, lengthBytes: BLOCK }, { offsetBytes: 5 * BLOCK, lengthBytes: 2 * BLOCK }, { offsetBytes: 9 * BLOCK, lengthBytes: BLOCK }]);
  await after.map.close(null);
});

test('strict durability: a reset while syncs are in flight leaves a working map', async (t) => {
  const dir = tempDir(t);
  const { map } = await ChangeMap.open({ file: path.join(dir, 'd.cbt'), deviceSizeBytes: SIZE, durability: 'strict', bootId: 'b' });
  // The real fdatasync runs, but its completion is held until after the reset: the sync is
  // surely in flight on the old file when the new one replaces it.
  const realFdatasync = fs.fdatasync;
  const held: Array<() => void> = [];
  let syncing!: () => void;
  const firstSync = new Promise<void>((resolve) => (syncing = resolve));
  const target = fs as unknown as { fdatasync: (fd: number, done: (err: NodeJS.ErrnoException | null) => void) => void };
  target.fdatasync = (fd, done) => {
    realFdatasync(fd, (err) => held.push(() => done(err)));
    syncing();
  };
  t.after(() => { target.fdatasync = realFdatasync; });
  let settled = 0;
  const before = Promise.resolve(map.mark(0, 1)).finally(() => settled++);
  await firstSync;
  const during = Promise.resolve(map.mark(BLOCK, 1)).finally(() => settled++);
  await map.reset('requested', 'test');
  assert.equal(settled, 0, 'the marks were still waiting for their syncs at the reset');
  target.fdatasync = realFdatasync;
  while (held.length === 0) await new Promise((resolve) => setImmediate(resolve));
  for (const done of held.splice(0)) done();
  await Promise.all([before, during]);
  assert.equal(map.failure, undefined, 'the new file is not poisoned by the old one\'s sync');
  await map.mark(2 * BLOCK, 1);
  assert.deepEqual(map.changedSince(0), [{ offsetBytes: 2 * BLOCK, lengthBytes: BLOCK }]);
  await map.close(null);
  const again = await ChangeMap.open({ file: path.join(dir, 'd.cbt'), deviceSizeBytes: SIZE, durability: 'strict', bootId: 'b' });
  assert.equal(again.reset, null);
  assert.deepEqual(again.map.changedSince(0), [{ offsetBytes: 2 * BLOCK, lengthBytes: BLOCK }]);
  await again.map.close(null);
});

/** A zeroed image of SIZE bytes and where its map goes, in a temp dir of the test's. */
function imageAndMapFile(t: Parameters<typeof tempDir>[0]): { image: string; file: string; opts: { file: string; deviceSizeBytes: number; durability: 'process'; bootId: string } } {
  const dir = tempDir(t);
  const image = path.join(dir, 'disk.img');
  makeImage(image, SIZE, 0);
  const file = path.join(dir, 'd.cbt');
  return { image, file, opts: { file, deviceSizeBytes: SIZE, durability: 'process', bootId: 'b' } };
}

function stampOf(file: string): DeviceStamp {
  const st = fs.statSync(file, { bigint: true });
  return { kind: 'file', dev: st.dev.toString(), ino: st.ino.toString(), sizeBytes: Number(st.size), mtimeNs: st.mtimeNs.toString(), ctimeNs: st.ctimeNs.toString() };
}

test('an image changed while not served resets the map (changed-outside); an untouched one does not', async (t) => {
  const { image, opts } = imageAndMapFile(t);
  const open = (): Promise<{ map: ChangeMap; reset: unknown }> => ChangeMap.open({ ...opts, deviceStamp: stampOf(image) });

  let { map } = await open();
  map.mark(0, 1);
  await map.close(stampOf(image));
  ({ map } = await open());
  assert.equal((await ChangeMap.open({ ...opts, deviceStamp: stampOf(image) }).then(async (r) => { await r.map.close(stampOf(image)); return r.reset; })), null, 'untouched image: kept');
  await map.close(stampOf(image));

  // Modified (same size) after a clean close.
  fs.writeFileSync(image, Buffer.alloc(SIZE, 1));
  fs.utimesSync(image, new Date(), new Date(Date.now() + 5000));
  const changed = await open();
  assert.equal((changed.reset as { reason: string }).reason, 'changed-outside');
  changed.map.mark(BLOCK, 1);
  // An unclean stop, then the image's times moved.
  fs.utimesSync(image, new Date(), new Date(Date.now() + 60_000));
  const late = await open();
  assert.equal((late.reset as { reason: string }).reason, 'changed-outside');
  assert.match((late.reset as { detail: string }).detail, /after the daemon's last write/);
  // Moved by as little as the clock allows, at once after the stop: still someone else's.
  late.map.mark(BLOCK, 1);
  fs.utimesSync(image, new Date(), new Date());
  const soon = await open();
  assert.equal((soon.reset as { reason: string }).reason, 'changed-outside');
  // An unclean stop with nothing changed since: kept.
  soon.map.mark(0, 1);
  const kept = await open();
  assert.equal(kept.reset, null);
  assert.deepEqual(kept.map.changedSince(0), [{ offsetBytes: 0, lengthBytes: BLOCK }]);
  await kept.map.close(stampOf(image));
});

test('a write whose mtime was set back is caught by the ctime, after a clean close and after an unclean stop', async (t) => {
  const { image, opts } = imageAndMapFile(t);
  /** Write the image, then set its mtime back exactly (the kernel sets ctime to now). */
  const writeAndSetBack = (): void => {
    const before = fs.statSync(image, { bigint: true });
    fs.writeFileSync(image, Buffer.alloc(SIZE, 2));
    const s = before.mtimeNs / 1_000_000_000n;
    const touched = spawnSync('touch', ['-m', '-d', `@${s}.${(before.mtimeNs - s * 1_000_000_000n).toString().padStart(9, '0')}`, image]);
    assert.equal(touched.status, 0);
    assert.equal(fs.statSync(image, { bigint: true }).mtimeNs, before.mtimeNs);
  };

  const first = await ChangeMap.open({ ...opts, deviceStamp: stampOf(image) });
  await first.map.close(stampOf(image));
  writeAndSetBack();
  const clean = await ChangeMap.open({ ...opts, deviceStamp: stampOf(image) });
  assert.equal(clean.reset?.reason, 'changed-outside');
  assert.match(clean.reset?.detail ?? '', /ctime/);
  assert.doesNotMatch(clean.reset?.detail ?? '', /mtime/, 'the mtime was set back; only the ctime tells');

  // Killed while serving, with no write of its own on the device: the header holds the stamp
  // taken at open, so any change of it, at once after the kill too, is a write by someone else.
  clean.map.mark(0, 1);
  writeAndSetBack();
  const unclean = await ChangeMap.open({ ...opts, deviceStamp: stampOf(image) });
  assert.equal(unclean.reset?.reason, 'changed-outside');
  assert.match(unclean.reset?.detail ?? '', /not closed cleanly, and the image file changed after the daemon's last write \(.*ctime/);
  await unclean.map.close(stampOf(image));
});

test('block devices: a clean map is kept only with equal counters in the same boot; an unclean one starts again', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'd.cbt');
  const opts = { file, deviceSizeBytes: SIZE, durability: 'process' as const, bootId: 'boot-1' };
  const block = (over: Partial<Extract<DeviceStamp, { kind: 'block' }>> = {}): DeviceStamp => ({
    kind: 'block', majorMinor: '8:16', sizeBytes: SIZE, diskId: 'wwid=naa.5000c500a1b2c3d4', bootId: 'boot-1',
    sectorsWritten: 800, sectorsDiscarded: 0, ...over,
  });
  const first = await ChangeMap.open({ ...opts, deviceStamp: block() });
  first.map.mark(0, 1);
  await first.map.close(block({ sectorsWritten: 808 }));
  const kept = await ChangeMap.open({ ...opts, deviceStamp: block({ sectorsWritten: 808 }) });
  assert.equal(kept.reset, null, 'counters as at the close: kept');
  assert.deepEqual(kept.map.changedSince(0), [{ offsetBytes: 0, lengthBytes: BLOCK }]);
  await kept.map.close(block({ sectorsWritten: 808 }));

  const written = await ChangeMap.open({ ...opts, deviceStamp: block({ sectorsWritten: 936 }) });
  assert.equal(written.reset?.reason, 'changed-outside');
  assert.match(written.reset?.detail ?? '', /sectorsWritten 808 -> 936/);
  await written.map.close(block());

  const rebooted = await ChangeMap.open({ ...opts, bootId: 'boot-2', deviceStamp: block({ bootId: 'boot-2' }) });
  assert.equal(rebooted.reset?.reason, 'cannot-verify');
  assert.match(rebooted.reset?.detail ?? '', /host restarted/);
  await rebooted.map.close(block({ bootId: 'boot-2' }));

  // Killed while serving (never closed): the counters at open say nothing of the daemon's last writes.
  const serving = await ChangeMap.open({ ...opts, bootId: 'boot-2', deviceStamp: block({ bootId: 'boot-2' }) });
  assert.equal(serving.reset, null);
  serving.map.mark(BLOCK, 1);
  const afterKill = await ChangeMap.open({ ...opts, bootId: 'boot-2', deviceStamp: block({ bootId: 'boot-2' }) });
  assert.equal(afterKill.reset?.reason, 'cannot-verify');
  assert.match(afterKill.reset?.detail ?? '', /without closing the map/);
  // Closed without a stamp (it could not be read): the next open cannot vouch for the device.
  await afterKill.map.close(null);
  const noStamp = await ChangeMap.open({ ...opts, bootId: 'boot-2', deviceStamp: block({ bootId: 'boot-2' }) });
  assert.equal(noStamp.reset?.reason, 'cannot-verify');
  await noStamp.map.close(null);
});

test('size change, corruption and a requested reset start a new generation and say why', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'd.cbt');
  const opts = { file, durability: 'process' as const, bootId: 'b' };
  let { map } = await ChangeMap.open({ ...opts, deviceSizeBytes: SIZE });
  map.mark(0, 1);
  await map.close(null);
  const resized = await ChangeMap.open({ ...opts, deviceSizeBytes: SIZE * 2 });
  assert.equal(resized.reset?.reason, 'size-changed');
  map = resized.map;
  const before = map.generation;
  const requested = await map.reset('requested', 'operator asked');
  assert.deepEqual(requested, { reason: 'requested', detail: 'operator asked', previousGeneration: before });
  assert.notEqual(map.generation, before);
  assert.equal(map.number, 1);
  await map.close(null);

  const bytes = fs.readFileSync(file);
  bytes.write('XXXX', 0, 'latin1');
  fs.writeFileSync(file, bytes);
  const badMagic = await ChangeMap.open({ ...opts, deviceSizeBytes: SIZE * 2 });
  assert.equal(badMagic.reset?.reason, 'corrupt');
  assert.match(badMagic.reset?.detail ?? '', /magic/);
  await badMagic.map.close(null);
  fs.truncateSync(file, 5000);
  const short = await ChangeMap.open({ ...opts, deviceSizeBytes: SIZE * 2 });
  assert.equal(short.reset?.reason, 'corrupt');
  await short.map.close(null);
  // An entry far beyond the number.
  const good = fs.readFileSync(file);
  good.writeUInt32LE(1000, 4096);
  fs.writeFileSync(file, good);
  const beyond = await ChangeMap.open({ ...opts, deviceSizeBytes: SIZE * 2 });
  assert.equal(beyond.reset?.reason, 'corrupt');
  await beyond.map.close(null);
});

test('frozen views: saved and loaded, image writes persisted, corruption is a clear error', async (t) => {
  const dir = tempDir(t);
  const { map } = await ChangeMap.open({ file: path.join(dir, 'd.cbt'), deviceSizeBytes: SIZE, durability: 'process', bootId: 'b' });
  map.mark(0, 1);
  map.advance();
  map.mark(2 * BLOCK, 1);
  const frozen = map.advance();
  const file = path.join(dir, 'snap', 'frozen.cbtf');
  await frozen.save(file);
  frozen.mark(7 * BLOCK, 1); // an image write, after the save
  const loaded = await FrozenChangeMap.load(file);
  assert.equal(loaded.generation, map.generation);
  assert.equal(loaded.number, 2);
  assert.deepEqual(loaded.changedSince(1), [{ offsetBytes: 2 * BLOCK, lengthBytes: BLOCK }, { offsetBytes: 7 * BLOCK, lengthBytes: BLOCK }]);
  assert.deepEqual(loaded.contextNames(), [`qemu:dirty-bitmap:${map.generation}:1`]);
  await loaded.close();
  await frozen.close();
  const bytes = fs.readFileSync(file);
  bytes.writeUInt32LE(3, 64 + 4 * 4); // entry above the view's number
  fs.writeFileSync(file, bytes);
  await assert.rejects(FrozenChangeMap.load(file), { code: 'ECORRUPT', message: /beyond the view's number/ });
  fs.writeFileSync(file, bytes.subarray(0, 70));
  await assert.rejects(FrozenChangeMap.load(file), { code: 'ECORRUPT' });
  fs.writeFileSync(file, Buffer.from('not a map at all, but long enough to have a header of 64 bytes......'));
  await assert.rejects(FrozenChangeMap.load(file), { code: 'ECORRUPT', message: /magic/ });
  await map.close(null);
});

test('block size rule, and changedSince on a 1 TiB map well under a second', async (t) => {
  assert.equal(trackingBlockSize(0), 64 * 1024);
  assert.equal(trackingBlockSize(128 * 2 ** 30), 64 * 1024);
  assert.equal(trackingBlockSize(128 * 2 ** 30 + 1), 128 * 1024);
  assert.equal(trackingBlockSize(2 ** 40), 512 * 1024);
  const dir = tempDir(t);
  const size = 2 ** 40;
  const { map } = await ChangeMap.open({ file: path.join(dir, 'big.cbt'), deviceSizeBytes: size, durability: 'process', bootId: 'b' });
  assert.equal(map.blocks, 2 ** 21);
  let seed = 12345;
  const rnd = (): number => {
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    return seed / 2 ** 31;
  };
  for (let i = 0; i < 20_000; i++) map.mark(Math.floor(rnd() * (size - 2 ** 20)), 1 + Math.floor(rnd() * 2 ** 20));
  map.advance();
  for (let i = 0; i < 2_000; i++) map.mark(Math.floor(rnd() * (size - 2 ** 20)), 4096);
  const started = performance.now();
  const all = map.changedSince(0);
  const recent = map.changedSince(1);
  const ms = performance.now() - started;
  console.log(`changedSince on a 1 TiB map (${map.blocks} blocks): ${all.length} + ${recent.length} ranges in ${ms.toFixed(1)} ms`);
  assert.ok(recent.length > 1000 && all.length > recent.length);
  const visited: ByteRange[] = [];
  const visitStarted = performance.now();
  map.forEachChanged(0, (offsetBytes, lengthBytes) => visited.push({ offsetBytes, lengthBytes }));
  console.log(`forEachChanged: ${(performance.now() - visitStarted).toFixed(1)} ms`);
  assert.deepEqual(visited, all);
  await map.close(null);
});

test('an unclean stop is judged by the stamp recorded once the daemon\'s own writes settled: kept when unchanged, reset when written by another at once, unknown while own writes ran', async (t) => {
  const { image, opts } = imageAndMapFile(t);
  const fd = fs.openSync(image, 'r+');
  t.after(() => fs.closeSync(fd));
  const readStamp = async (): Promise<DeviceStamp> => stampOf(image);
  const open = (): Promise<{ map: ChangeMap; reset: { reason: string; detail: string } | null }> => ChangeMap.open({ ...opts, deviceStamp: stampOf(image), readStamp });
  /** One write of the daemon's through the map, as TrackingDevice issues it. */
  const ownWrite = (map: ChangeMap, at: number): void => {
    map.mark(at, 4096);
    void map.writing();
    fs.writeSync(fd, Buffer.alloc(4096, 7), 0, 4096, at);
    map.written();
  };
  const settled = async (): Promise<void> => new Promise((resolve) => setTimeout(resolve, 300));

  // Killed (the map left open) while its own write had just ended: nothing can vouch for the file.
  let { map } = await open();
  ownWrite(map, 0);
  let next = await open();
  assert.equal(next.reset?.reason, 'cannot-verify', 'a kill while its writes ran resets');
  assert.match(next.reset?.detail ?? '', /own writes to the image file were in flight or had just ended/);
  map.written(); // (the first instance's timers stop with close)
  await map.close(null);

  // Killed once its writes settled, nothing else wrote: kept, with the write marked.
  map = next.map;
  ownWrite(map, 3 * BLOCK);
  await settled();
  next = await open();
  assert.equal(next.reset, null, 'a kill after its writes settled keeps the map');
  assert.deepEqual(next.map.changedSince(0), [{ offsetBytes: 3 * BLOCK, lengthBytes: BLOCK }]);
  await map.close(null);

  // Killed once settled, then written by someone else at once: reset.
  map = next.map;
  ownWrite(map, 5 * BLOCK);
  await settled();
  fs.writeSync(fd, Buffer.alloc(4096, 9), 0, 4096, 9 * BLOCK);
  next = await open();
  assert.equal(next.reset?.reason, 'changed-outside', 'a write by another right after the kill is seen');
  await map.close(null);
  await next.map.close(stampOf(image));
});

test('a file the daemon holds idle and someone else writes: the watch starts a new generation and says so', { timeout: 10_000 }, async (t) => {
  const dir = tempDir(t);
  const image = path.join(dir, 'disk.img');
  makeImage(image, SIZE, 0);
  const resets: string[] = [];
  const { map } = await ChangeMap.open({
    file: path.join(dir, 'd.cbt'), deviceSizeBytes: SIZE, durability: 'process', bootId: 'b', deviceStamp: stampOf(image),
    readStamp: async () => stampOf(image), onReset: (r) => resets.push(`${r.reason}: ${r.detail}`),
  });
  t.after(() => map.close(null));
  map.mark(0, 1);
  const generation = map.generation;
  await map.verify();
  assert.deepEqual(resets, [], 'nothing changed: nothing said');
  fs.writeFileSync(image, Buffer.alloc(4096, 5), { flag: 'r+' });
  const deadline = performance.now() + 5000;
  while (resets.length === 0 && performance.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50));
  assert.equal(resets.length, 1, 'the watch saw it within a few seconds');
  assert.match(resets[0]!, /^changed-outside: the image file changed while the daemon held it and did not write it .*around bdsnap/);
  assert.notEqual(map.generation, generation);
  assert.deepEqual(map.changedSince(0), [], 'a new generation: every block counts as changed for consumers of the old one');
});
