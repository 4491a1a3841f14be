/**
 * DiffStorage: limits and overflow (never harming the device), extend while writes go on,
 * low-space events, a full disk, a torn tail cut on reopen, the state surviving a restart,
 * strict durability, and clear errors for bad input.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { FileDevice } from '../../src/device/file-device.js';
import { DiffStorage, SnapshotLayer, type DiffStorageEvent, type DiffStorageOptions, type SnapshotImage } from '../../src/snapshot/index.js';
import { makeImage } from '../../testkit/files.js';
import { RECORD_HEADER_BYTES, decodeRecordHeader, payloadMatches } from '../../src/snapshot/format.js';
import { isError, tempDir, type TestContext } from './helpers.js';
import { needs } from '../../testkit/needs.js';


const CHUNK = 16384;
const HEADER = 64;

interface Rig {
  dir: string;
  dev: FileDevice;
  layer: SnapshotLayer;
  model: Buffer;
  before: Buffer;
  storage: DiffStorage;
  image: SnapshotImage;
  events: DiffStorageEvent[];
  /** Resolves once the events so far satisfy `reached` (checked at each event). */
  eventsUntil(reached: (events: DiffStorageEvent[]) => boolean): Promise<void>;
  options: DiffStorageOptions;
}

async function rig(t: TestContext, extra: Partial<DiffStorageOptions> = {}, storeDir?: string): Promise<Rig> {
  const dir = tempDir(t);
  const imagePath = makeImage(path.join(dir, 'disk.img'), 4 << 20, 'random', 1);
  const dev = await FileDevice.open(imagePath);
  t.after(() => dev.close());
  const layer = new SnapshotLayer(dev, { chunkSize: CHUNK });
  const events: DiffStorageEvent[] = [];
  const waiters = new Set<() => void>();
  const eventsUntil = (reached: (events: DiffStorageEvent[]) => boolean): Promise<void> => new Promise((resolve) => {
    const check = (): void => {
      if (!reached(events)) return;
      waiters.delete(check);
      resolve();
    };
    waiters.add(check);
    check();
  });
  const dirs = [storeDir ?? path.join(dir, 'store')];
  fs.mkdirSync(dirs[0]!, { recursive: true, mode: 0o700 });
  const options: DiffStorageOptions = { id: 'snap-1', dirs, chunkSize: CHUNK, onEvent: (e) => {
    events.push(e);
    for (const check of waiters) check();
  }, ...extra };
  const storage = await DiffStorage.create(options);
  t.after(() => storage.close());
  await layer.hold();
  const image = layer.addPoint(storage, 0);
  layer.release();
  const before = fs.readFileSync(imagePath);
  return { dir, dev, layer, model: Buffer.from(before), before, storage, image, events, eventsUntil, options };
}

/** `count` first writes of one chunk each, at distinct chunks from `firstChunk` on. */
async function writeChunks(r: Rig, firstChunk: number, count: number): Promise<void> {
  for (let i = 0; i < count; i++) {
    const data = randomBytes(CHUNK);
    await r.layer.write(data, (firstChunk + i) * CHUNK);
    data.copy(r.model, (firstChunk + i) * CHUNK);
  }
}

async function readAll(r: Rig): Promise<Buffer> {
  const b = Buffer.alloc(r.dev.size);
  await r.image.read(b, 0);
  return b;
}

const lowSpace = (events: DiffStorageEvent[]): DiffStorageEvent[] => events.filter((e) => e.type === 'low-space');

test('a tiny limit: overflowed once, the image answers EIO, the device gets exactly what was written', { timeout: 20_000 }, async (t) => {
  const r = await rig(t, { limitBytes: 5 * (CHUNK + HEADER) });
  await writeChunks(r, 0, 5);
  assert.equal(r.storage.state, 'ok');
  assert.ok((await readAll(r)).equals(r.before));
  await writeChunks(r, 10, 20);
  // Rewrites and zeroes after the overflow go on too.
  await r.layer.zero(0, 3 * CHUNK);
  r.model.fill(0, 0, 3 * CHUNK);
  assert.equal(r.storage.state, 'overflowed');
  assert.match(r.storage.failedReason ?? "", /reached its limit: the originals of 16 KiB at offset \d+ KiB did not fit \(80\.3 KiB of 80\.3 KiB used/);
  assert.ok(r.storage.usage().usedBytes <= 5 * (CHUNK + HEADER));
  await assert.rejects(r.image.read(Buffer.alloc(10), 0), isError('EIO', /overflowed: .*limit/));
  await assert.rejects(r.image.write(Buffer.alloc(10), 0), isError('EIO', /overflowed/));
  await assert.rejects(r.storage.extend({ limitBytes: 1 << 30 }), isError('ESESSION'));
  await r.eventsUntil((events) => events.some((e) => e.type === 'overflowed'));
  assert.deepEqual(r.events.filter((e) => e.type !== 'low-space').map((e) => e.type), ['overflowed'], 'one event');
  const onDevice = Buffer.alloc(r.dev.size);
  await r.dev.read(onDevice, 0);
  assert.ok(onDevice.equals(r.model));

  // The state survives a restart: the reopened storage is still overflowed, its image EIO.
  const reopened = await DiffStorage.open(r.options);
  t.after(() => reopened.close());
  assert.equal(reopened.state, 'overflowed');
  assert.match(reopened.failedReason ?? '', /limit/);
  const image = new SnapshotLayer(r.dev, { chunkSize: CHUNK }).addPoint(reopened, 0);
  await assert.rejects(image.read(Buffer.alloc(10), 0), isError('EIO'));
});

test('extend() before the limit lets the snapshot go on; a limit below what is used is EINVAL', { timeout: 20_000 }, async (t) => {
  const r = await rig(t, { limitBytes: 10 * (CHUNK + HEADER) });
  await writeChunks(r, 0, 9);
  await r.eventsUntil((events) => lowSpace(events).length > 0);
  const low = lowSpace(r.events);
  assert.equal(low.length, 1, 'low-space once, when used passed 90% of the limit');
  assert.equal(low[0]!.type === 'low-space' && low[0]!.limitBytes, 10 * (CHUNK + HEADER));
  await assert.rejects(r.storage.extend({ limitBytes: 5 * (CHUNK + HEADER) }), isError('EINVAL', /below/));
  // Writes in flight while the limit is raised.
  const writing = writeChunks(r, 20, 30);
  await r.storage.extend({ limitBytes: 100 * (CHUNK + HEADER) });
  await writing;
  assert.equal(r.storage.state, 'ok');
  assert.equal(r.storage.usage().limitBytes, 100 * (CHUNK + HEADER));
  assert.ok((await readAll(r)).equals(r.before));
  await writeChunks(r, 60, 55);
  await r.eventsUntil((events) => lowSpace(events).length > 1);
  assert.equal(r.events.filter((e) => e.type === 'low-space').length, 2, 'low-space again after the next crossing');
  assert.deepEqual(r.events.filter((e) => e.type !== 'low-space'), []);
});

test('extend() adding a directory: new records go there, reads come from both; reopen finds both from the first', { timeout: 20_000 }, async (t) => {
  const r = await rig(t);
  await writeChunks(r, 0, 4);
  const second = path.join(r.dir, 'second');
  await assert.rejects(r.storage.extend({ dir: second }), isError('ENOENT'));
  fs.mkdirSync(second, { mode: 0o700 });
  await r.storage.extend({ dir: second });
  assert.deepEqual(r.storage.usage().dirs, [path.join(r.dir, 'store'), second]);
  await writeChunks(r, 4, 4);
  await r.image.write(Buffer.alloc(100, 0x42), CHUNK + 1); // an image record in the new file supersedes the old one
  const expected = Buffer.from(r.before);
  expected.fill(0x42, CHUNK + 1, CHUNK + 101);
  assert.ok((await readAll(r)).equals(expected));
  assert.equal(fs.statSync(path.join(second, 'snap-1.1.rec')).size, 5 * (CHUNK + HEADER));
  assert.equal(fs.statSync(path.join(r.dir, 'store', 'snap-1.0.rec')).size, 4 * (CHUNK + HEADER));

  // The storage records its directories: the first one is enough to find them all again.
  const reopened = await DiffStorage.open(r.options);
  assert.deepEqual(reopened.usage().dirs, [path.join(r.dir, 'store'), second]);
  t.after(() => reopened.close());
  const image = new SnapshotLayer(r.dev, { chunkSize: CHUNK }).addPoint(reopened, 0);
  const b = Buffer.alloc(r.dev.size);
  await image.read(b, 0);
  assert.ok(b.equals(expected));
  await reopened.close();

  // A directory that went away is a clear error, not a storage missing its newer records.
  fs.renameSync(second, `${second}-moved`);
  await assert.rejects(DiffStorage.open(r.options), isError('ENOENT', /second/));
});

test('low-space event when the filesystem of the current directory is short of free space', { timeout: 20_000 }, async (t) => {
  // Thresholds above any real disk's free space, so the condition holds from the start.
  const r = await rig(t, { lowSpace: { fsFreeBytes: Number.MAX_SAFE_INTEGER } });
  await writeChunks(r, 0, 3);
  await r.eventsUntil((events) => lowSpace(events).length > 0);
  const low = lowSpace(r.events);
  assert.equal(low.length, 1);
  const e = low[0]!;
  assert.ok(e.type === 'low-space' && e.dir === path.join(r.dir, 'store') && e.freeBytes > 0 && e.limitBytes === null);
});

test('a torn tail is cut on reopen; what was stored stays; appends go on after it', { timeout: 20_000 }, async (t) => {
  const r = await rig(t);
  await writeChunks(r, 0, 6);
  const file = path.join(r.dir, 'store', 'snap-1.0.rec');
  const goodBytes = fs.statSync(file).size;
  assert.equal(goodBytes, 6 * (CHUNK + HEADER));
  // A record cut in the middle of its payload, as a kill during write(2) leaves it.
  const whole = fs.readFileSync(file);
  fs.appendFileSync(file, whole.subarray(0, HEADER + 1000));
  const reopened = await DiffStorage.open(r.options);
  t.after(() => reopened.close());
  assert.equal(fs.statSync(file).size, goodBytes);
  assert.equal(reopened.usage().usedBytes, goodBytes);
  const layer = new SnapshotLayer(r.dev, { chunkSize: CHUNK });
  const image = layer.addPoint(reopened, 0);
  await layer.write(Buffer.alloc(CHUNK, 1), 10 * CHUNK);
  const b = Buffer.alloc(r.dev.size);
  await image.read(b, 0);
  assert.ok(b.equals(r.before));
  assert.equal(fs.statSync(file).size, goodBytes + CHUNK + HEADER);

});

test('after extend() the older file is sealed: a bad record there is corruption; before sealing, a torn tail', { timeout: 20_000 }, async (t) => {
  const r = await rig(t);
  await writeChunks(r, 0, 3);
  const second = path.join(r.dir, 'second');
  fs.mkdirSync(second, { mode: 0o700 });
  await r.storage.extend({ dir: second });
  await writeChunks(r, 3, 2);
  const file0 = path.join(r.dir, 'store', 'snap-1.0.rec');
  const dirsFile = path.join(r.dir, 'store', 'snap-1.dirs');
  assert.deepEqual(JSON.parse(fs.readFileSync(dirsFile, 'utf8')), { dirs: [path.join(r.dir, 'store'), second], files: 2, sealedFiles: 1 });
  const good = fs.readFileSync(file0);

  // Killed between the switch and the sealing: records queued for the old file may be torn.
  fs.appendFileSync(file0, good.subarray(0, HEADER + 10));
  fs.writeFileSync(dirsFile, JSON.stringify({ dirs: [path.join(r.dir, 'store'), second], files: 2, sealedFiles: 0 }));
  fs.rmSync(path.join(second, 'snap-1.dirs'));
  const reopened = await DiffStorage.open(r.options);
  assert.equal(fs.statSync(file0).size, good.length);
  const image = new SnapshotLayer(r.dev, { chunkSize: CHUNK }).addPoint(reopened, 0);
  const b = Buffer.alloc(r.dev.size);
  await image.read(b, 0);
  assert.ok(b.equals(r.before));
  await reopened.close();

  // Sealed: a flipped byte is damage, reported, not cut.
  const broken = Buffer.from(good);
  broken[HEADER + 5]! ^= 1;
  fs.writeFileSync(file0, broken);
  await assert.rejects(DiffStorage.open(r.options), isError('ECORRUPT', /snap-1\.0\.rec is corrupt/));
  // And a file the list names but that is gone is missing, not silently left out.
  fs.writeFileSync(file0, good);
  fs.rmSync(path.join(second, 'snap-1.1.rec'));
  await assert.rejects(DiffStorage.open(r.options), isError('ENOENT', /snap-1\.1\.rec is missing/));
});

test('strict durability stores records with a sync; flush of an image syncs', { timeout: 20_000 }, async (t) => {
  const r = await rig(t, { durability: 'strict' });
  const writes = [];
  for (let i = 0; i < 16; i++) writes.push(r.layer.write(randomBytes(100), i * CHUNK));
  await Promise.all(writes);
  await r.layer.write(randomBytes(100), 40 * CHUNK, { fua: true });
  await r.image.flush();
  assert.ok((await readAll(r)).equals(r.before));
  assert.equal(r.storage.usage().usedBytes, 17 * (CHUNK + HEADER));
});

test('bad input: missing or non-directory dirs, bad ids, chunk sizes and limits, a second create', { timeout: 20_000 }, async (t) => {
  const dir = tempDir(t);
  const base = { id: 'a', chunkSize: CHUNK };
  await assert.rejects(DiffStorage.create({ ...base, dirs: [path.join(dir, 'nope')] }), isError('ENOENT', /does not exist/));
  fs.writeFileSync(path.join(dir, 'file'), '');
  await assert.rejects(DiffStorage.create({ ...base, dirs: [path.join(dir, 'file')] }), isError('EINVAL', /not a directory/));
  await assert.rejects(DiffStorage.create({ ...base, dirs: [] }), isError('EINVAL'));
  await assert.rejects(DiffStorage.create({ ...base, id: '../x', dirs: [dir] }), isError('EINVAL', /bad snapshot id/));
  await assert.rejects(DiffStorage.create({ ...base, chunkSize: 1000, dirs: [dir] }), isError('EINVAL', /chunk size/));
  await assert.rejects(DiffStorage.create({ ...base, limitBytes: -1, dirs: [dir] }), isError('EINVAL'));
  await assert.rejects(DiffStorage.open({ ...base, dirs: [dir] }), isError('ENOENT', /no difference storage/));
  const s = await DiffStorage.create({ ...base, dirs: [dir] });
  await assert.rejects(DiffStorage.create({ ...base, dirs: [dir] }), isError('EINVAL', /already exists/));
  const dev = await FileDevice.open(makeImage(path.join(dir, 'disk.img'), 1 << 20, 'random', 2));
  t.after(() => dev.close());
  assert.throws(() => new SnapshotLayer(dev, { chunkSize: 4096 }).addPoint(s, 0), isError('EINVAL', /chunk size/));
  await s.destroy();
  assert.deepEqual(fs.readdirSync(dir).filter((n) => n.startsWith('a.')), []);
});

test('a full disk overflows the storage and leaves the device fine', { timeout: 30_000 }, async (t) => {
  if (!needs(t, { root: true, tools: ['mount', 'umount'] })) return;
  // Its own directory and one hook: unmounted first, then removed.
  const mnt = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-full-'));
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=256k,mode=0700', 'tmpfs', mnt]);
  t.after(() => {
    execFileSync('umount', ['-l', mnt]);
    fs.rmSync(mnt, { recursive: true, force: true });
  });
  const r = await rig(t, { durability: 'strict' }, mnt);
  await writeChunks(r, 0, 40);
  assert.equal(r.storage.state, 'overflowed');
  assert.match(r.storage.failedReason ?? '', /full/);
  await assert.rejects(r.image.read(Buffer.alloc(1), 0), isError('EIO', /full/));
  const onDevice = Buffer.alloc(r.dev.size);
  await r.dev.read(onDevice, 0);
  assert.ok(onDevice.equals(r.model));
  await r.eventsUntil((events) => events.some((e) => e.type === 'overflowed') && lowSpace(events).length > 0);
  assert.deepEqual(r.events.filter((e) => e.type !== 'low-space').map((e) => e.type), ['overflowed']);
  assert.ok(r.events.some((e) => e.type === 'low-space'), 'a 256 KiB filesystem is low on space from the start');
  await r.storage.close();
});

test('a storage directory another user can write is refused; a link where the state file goes is replaced, not written through', { timeout: 20_000 }, async (t) => {
  if (!needs(t, { root: true, tools: ['runuser'] })) return;
  const dir = tempDir(t);
  // nobody may pass through the test's directory into one like /tmp (world-writable, sticky).
  fs.chmodSync(dir, 0o711);
  const shared = path.join(dir, 'shared');
  fs.mkdirSync(shared);
  fs.chmodSync(shared, 0o1777);
  const asNobody = (script: string): void => {
    execFileSync('runuser', ['-u', 'nobody', '--', 'sh', '-c', script], { stdio: 'pipe' });
  };
  const base = { id: 'snap-x', chunkSize: CHUNK };

  // A directory of nobody's: they could replace the diff files a backup of the image reads.
  const theirs = path.join(shared, 'theirs');
  asNobody(`mkdir -m 700 ${theirs}`);
  await assert.rejects(DiffStorage.create({ ...base, dirs: [theirs] }), isError('EPERM', /owned by uid \d+, not by this user/));
  // Root's, but open to everyone.
  const open = path.join(shared, 'open');
  fs.mkdirSync(open);
  fs.chmodSync(open, 0o777);
  await assert.rejects(DiffStorage.create({ ...base, dirs: [open] }), isError('EPERM', /open to other users \(mode 777\)/));
  assert.deepEqual(fs.readdirSync(open), [], 'nothing was created there');

  // A link where the state file goes: the overflow's state replaces the link, never the file it names.
  const secret = path.join(dir, 'root-only');
  fs.writeFileSync(secret, 'root only\n', { mode: 0o600 });
  const storeDir = path.join(dir, 'store');
  const r = await rig(t, { limitBytes: 2 * (CHUNK + HEADER) }, storeDir);
  const stateFile = path.join(storeDir, 'snap-1.state');
  fs.symlinkSync(secret, stateFile);
  await writeChunks(r, 0, 4);
  assert.equal(r.storage.state, 'overflowed');
  assert.equal(fs.readFileSync(secret, 'utf8'), 'root only\n', 'the root-only file is untouched');
  assert.ok(fs.lstatSync(stateFile).isFile(), 'the state file replaced the link');
  assert.equal((JSON.parse(fs.readFileSync(stateFile, 'utf8')) as { state: string }).state, 'overflowed');
});

/**
 * The storages of fixtures/difference-storage: `snap.0.diff` of the older record layout, written
 * by the code of that time, and `current/snap.0.rec`, the same writes stored by the code that
 * introduced the current layout (see placeLegacyFixture).
 */
const LEGACY_FIXTURE = fs.readFileSync(new URL('../../../test/snapshot/fixtures/difference-storage/snap.0.diff', import.meta.url));
const CURRENT_FIXTURE = fs.readFileSync(new URL('../../../test/snapshot/fixtures/difference-storage/current/snap.0.rec', import.meta.url));

const legacyPattern = (length: number, seed: number, offset: number): Buffer => {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = (seed * 31 + (offset + i) * 7 + ((offset + i) >> 9)) & 0xff;
  return b;
};

/**
 * The fixture (snapshot of a 64 KiB device, 4 KiB chunks): device writes at 8192+8192,
 * 36964+5000 and 61440+4096, and an image write at 57444+3000. Its `.dirs` file named the
 * directory it was written in, so this writes one naming where it is now. `tail` is appended
 * to the file, as a kill under that code could leave it.
 */
function placeLegacyFixture(dir: string, tail = Buffer.alloc(0), file = { name: 'snap.0.diff', bytes: LEGACY_FIXTURE }): { storeDir: string; imagePath: string; expected: Buffer } {
  const storeDir = path.join(dir, 'store');
  fs.mkdirSync(storeDir, { mode: 0o700 });
  fs.writeFileSync(path.join(storeDir, file.name), Buffer.concat([file.bytes, tail]), { mode: 0o600 });
  fs.writeFileSync(path.join(storeDir, 'snap.dirs'), JSON.stringify({ dirs: [storeDir], files: 1, sealedFiles: 0 }), { mode: 0o600 });
  const atPoint = legacyPattern(65536, 1, 0);
  const device = Buffer.from(atPoint);
  legacyPattern(8192, 2, 8192).copy(device, 8192);
  legacyPattern(5000, 3, 36964).copy(device, 36964);
  legacyPattern(4096, 5, 61440).copy(device, 61440);
  const imagePath = path.join(dir, 'disk.img');
  fs.writeFileSync(imagePath, device);
  const expected = Buffer.from(atPoint);
  legacyPattern(3000, 4, 57444).copy(expected, 57444);
  return { storeDir, imagePath, expected };
}

/** Open the fixture's storage over the device at `imagePath`; `use` gets its layer and image. */
async function withLegacyImage(t: TestContext, storeDir: string, imagePath: string, use: (layer: SnapshotLayer, image: SnapshotImage) => Promise<void>): Promise<void> {
  const storage = await DiffStorage.open({ id: 'snap', dirs: [storeDir], chunkSize: 4096 });
  t.after(() => storage.close());
  assert.equal(storage.state, 'ok');
  const dev = await FileDevice.open(imagePath);
  try {
    const layer = new SnapshotLayer(dev, { chunkSize: 4096 });
    await layer.hold();
    const image = layer.addPoint(storage, 0);
    layer.release();
    await use(layer, image);
    await layer.removePoint(image);
    await layer.close();
  } finally {
    await dev.close();
  }
  await storage.close();
}

async function readImage(image: SnapshotImage): Promise<Buffer> {
  const seen = Buffer.alloc(65536);
  await image.read(seen, 0);
  return seen;
}

test('a difference storage written before the one copy-before-write engine opens and serves its image exactly', { timeout: 20_000 }, async (t) => {
  const { storeDir, imagePath, expected } = placeLegacyFixture(tempDir(t));
  await withLegacyImage(t, storeDir, imagePath, async (_layer, image) => {
    assert.ok((await readImage(image)).equals(expected), 'the image shows the device at its point, with the image write');
  });
});

test('a difference storage of the current layout written by earlier code opens and serves its image exactly', { timeout: 20_000 }, async (t) => {
  const { storeDir, imagePath, expected } = placeLegacyFixture(tempDir(t), Buffer.alloc(0), { name: 'snap.0.rec', bytes: CURRENT_FIXTURE });
  await withLegacyImage(t, storeDir, imagePath, async (_layer, image) => {
    assert.ok((await readImage(image)).equals(expected), 'the image shows the device at its point, with the image write');
  });
  assert.deepEqual(fs.readdirSync(storeDir).sort(), ['snap.0.rec', 'snap.dirs'], 'no file of another layout is started');
  assert.ok(fs.readFileSync(path.join(storeDir, 'snap.0.rec')).equals(CURRENT_FIXTURE));
});

test('a difference storage of the older layout takes new records in a file of the current one and stays exact across reopens', { timeout: 20_000 }, async (t) => {
  const { storeDir, imagePath, expected } = placeLegacyFixture(tempDir(t));
  const legacyFile = path.join(storeDir, 'snap.0.diff');
  const newFile = path.join(storeDir, 'snap.1.rec');
  await withLegacyImage(t, storeDir, imagePath, async (layer, image) => {
    // A first write to a chunk not preserved yet, a rewrite of a preserved one, an image write.
    await layer.write(Buffer.alloc(4096, 0xa1), 4096);
    await layer.write(Buffer.alloc(4096, 0xa2), 8192);
    await image.write(Buffer.alloc(1000, 0xa3), 20_000);
    Buffer.alloc(1000, 0xa3).copy(expected, 20_000);
    assert.ok((await readImage(image)).equals(expected));
  });
  assert.ok(fs.readFileSync(legacyFile).equals(LEGACY_FIXTURE), 'the older file is never written');
  // The new records are in a file a build that knows only `.diff` files does not find, and the
  // storage's list names that file, so such a build refuses the storage ("file 1 is missing").
  assert.deepEqual(JSON.parse(fs.readFileSync(path.join(storeDir, 'snap.dirs'), 'utf8')), { dirs: [storeDir], files: 2, sealedFiles: 1 });
  const records = fs.readFileSync(newFile);
  const first = decodeRecordHeader(records.subarray(0, RECORD_HEADER_BYTES));
  assert.ok(typeof first !== 'string', `the new file holds records of the current layout: ${String(first)}`);
  assert.equal(first.kind, 'copied');
  assert.equal(first.firstChunk, 1);

  await withLegacyImage(t, storeDir, imagePath, async (_layer, image) => {
    assert.ok((await readImage(image)).equals(expected), 'reopened: the older and the newer file together give the image');
  });
  assert.ok(fs.readFileSync(legacyFile).equals(LEGACY_FIXTURE));
  assert.equal(fs.statSync(newFile).size, records.length, 'a reopen starts no further file');
});

test('a difference storage of the older layout left by a kill: its torn tail is cut and its image is exact', { timeout: 20_000 }, async (t) => {
  // The start of a record (its header and part of its payload), as a kill during write(2) leaves it.
  const { storeDir, imagePath, expected } = placeLegacyFixture(tempDir(t), LEGACY_FIXTURE.subarray(0, RECORD_HEADER_BYTES + 100));
  await withLegacyImage(t, storeDir, imagePath, async (layer, image) => {
    assert.ok((await readImage(image)).equals(expected));
    await layer.write(Buffer.alloc(4096, 0xb1), 0);
    assert.ok((await readImage(image)).equals(expected));
  });
  assert.ok(fs.readFileSync(path.join(storeDir, 'snap.0.diff')).equals(LEGACY_FIXTURE), 'the torn tail is cut, nothing else');
  await withLegacyImage(t, storeDir, imagePath, async (_layer, image) => {
    assert.ok((await readImage(image)).equals(expected));
  });
});

test('a file number held by both an older and a current file is refused as corrupt', { timeout: 20_000 }, async (t) => {
  const { storeDir } = placeLegacyFixture(tempDir(t));
  fs.writeFileSync(path.join(storeDir, 'snap.0.rec'), '', { mode: 0o600 });
  await assert.rejects(DiffStorage.open({ id: 'snap', dirs: [storeDir], chunkSize: 4096 }), isError('ECORRUPT', /two files number 0/));
});

test('records are the session store\'s: each names its device, its place in the order and whether it is an image write', { timeout: 20_000 }, async (t) => {
  const r = await rig(t);
  await r.layer.write(randomBytes(2 * CHUNK), 3 * CHUNK);
  await r.image.write(randomBytes(CHUNK), 9 * CHUNK);
  await r.storage.sync();
  const file = fs.readFileSync(path.join(r.dir, 'store', 'snap-1.0.rec'));
  const seen = [];
  for (let at = 0; at < file.length;) {
    const h = decodeRecordHeader(file.subarray(at, at + RECORD_HEADER_BYTES));
    assert.ok(typeof h !== 'string', String(h));
    assert.ok(payloadMatches(h, file.subarray(at + h.payloadOffset, at + h.payloadOffset + h.payloadBytes)));
    seen.push([h.kind, h.deviceKey, h.sequence, h.firstChunk, h.payloadBytes]);
    at += h.payloadOffset + h.payloadBytes;
  }
  // The image write keeps the chunk's original first (the device's point stays readable).
  assert.deepEqual(seen, [['copied', 0, 0, 3, 2 * CHUNK], ['copied', 0, 1, 9, CHUNK], ['image', 0, 2, 9, CHUNK]]);
});
