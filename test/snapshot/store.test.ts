import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import zlib from 'node:zlib';
import { BdsnapError } from '../../src/errors.js';
import { FileDevice } from '../../src/device/file-device.js';
import { StoreWriter } from '../../src/snapshot/store-writer.js';
import { scanData } from '../../src/snapshot/store-scan.js';
import { DATA_FILE, INDEX_FILE, RECORD_HEADER_BYTES, chunkDigest, decodeIndex, readManifest } from '../../src/snapshot/format.js';
import { CowDevice, listSessions, recoverSession, sessionDirName } from '../../src/snapshot/index.js';
import { makeImage } from '../../testkit/files.js';
import { isError, onlyDir, tempDir } from './helpers.js';

const CS = 4096;

async function writeRecords(file: string, records: Array<[number, Buffer]>): Promise<number[]> {
  const fd = fs.openSync(file, 'w+');
  try {
    const failures: string[] = [];
    const w = new StoreWriter(fd, 0, { strict: false, onFailure: (r) => failures.push(r) });
    const positions = await Promise.all(records.map(([c, b]) => w.append(c, b)));
    await w.sync();
    assert.deepEqual(failures, []);
    return positions.map((p) => p!);
  } finally {
    fs.closeSync(fd);
  }
}

test('records written by StoreWriter scan back with the right index', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, DATA_FILE);
  const a = randomBytes(3 * CS);
  const b = randomBytes(CS);
  const positions = await writeRecords(file, [[5, a], [1, b]]);
  assert.deepEqual(positions, [0, RECORD_HEADER_BYTES + a.length]);
  const fd = fs.openSync(file, 'r');
  t.after(() => fs.closeSync(fd));
  const scan = await scanData(fd, { chunkSize: CS, deviceSize: 64 * CS, allowTornTail: false, where: 'test' });
  assert.equal(scan.records.length, 2);
  assert.deepEqual([...scan.index.keys()].sort((x, y) => x - y), [1, 5, 6, 7]);
  assert.equal(scan.index.get(6), RECORD_HEADER_BYTES + CS);
  const back = Buffer.alloc(CS);
  fs.readSync(fd, back, 0, CS, scan.index.get(7)!);
  assert.deepEqual(back, a.subarray(2 * CS));
  assert.equal(scan.preservedBytes, 4 * CS);
});

test('a torn tail is refused by a strict scan, cut by a tolerant one', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, DATA_FILE);
  await writeRecords(file, [[0, randomBytes(CS)], [1, randomBytes(CS)]]);
  const whole = fs.statSync(file).size;
  // A record whose write was cut short: full header, half a payload.
  const third = path.join(dir, 'third.bin');
  await writeRecords(third, [[2, randomBytes(CS)]]);
  fs.appendFileSync(file, fs.readFileSync(third).subarray(0, RECORD_HEADER_BYTES + CS / 2));
  const fd = fs.openSync(file, 'r');
  t.after(() => fs.closeSync(fd));
  await assert.rejects(scanData(fd, { chunkSize: CS, deviceSize: 16 * CS, allowTornTail: false, where: 'data' }), isError('ECORRUPT', /truncated record payload at byte/));
  const scan = await scanData(fd, { chunkSize: CS, deviceSize: 16 * CS, allowTornTail: true, where: 'data' });
  assert.equal(scan.validBytes, whole);
  assert.equal(scan.index.size, 2);
  assert.match(scan.tornReason ?? '', /truncated/);
});

test('one flipped byte anywhere in a record is detected', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, DATA_FILE);
  await writeRecords(file, [[0, randomBytes(2 * CS)], [4, randomBytes(CS)]]);
  const original = fs.readFileSync(file);
  for (const at of [0, 9, 17, 30, 60, RECORD_HEADER_BYTES + 5, RECORD_HEADER_BYTES + 2 * CS - 1, original.length - 1]) {
    const bad = Buffer.from(original);
    bad[at]! ^= 0x40;
    fs.writeFileSync(file, bad);
    const fd = fs.openSync(file, 'r');
    try {
      await assert.rejects(scanData(fd, { chunkSize: CS, deviceSize: 16 * CS, allowTornTail: false, where: 'data' }), isError('ECORRUPT'), `flip at ${at}`);
    } finally {
      fs.closeSync(fd);
    }
  }
});

test('a record that does not fit the device is corrupt', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, DATA_FILE);
  await writeRecords(file, [[10, randomBytes(CS)]]);
  const fd = fs.openSync(file, 'r');
  t.after(() => fs.closeSync(fd));
  await assert.rejects(scanData(fd, { chunkSize: CS, deviceSize: 8 * CS, allowTornTail: false, where: 'data' }), isError('ECORRUPT', /does not fit the device/));
});

test('the size limit fails the writer and later appends resolve undefined', async (t) => {
  const dir = tempDir(t);
  const fd = fs.openSync(path.join(dir, DATA_FILE), 'w+');
  t.after(() => fs.closeSync(fd));
  const reasons: string[] = [];
  const w = new StoreWriter(fd, 0, { strict: true, sizeLimitBytes: 2 * (CS + RECORD_HEADER_BYTES), onFailure: (r) => reasons.push(r) });
  assert.equal(await w.append(0, randomBytes(CS)), 0);
  assert.notEqual(await w.append(1, randomBytes(CS)), undefined);
  assert.equal(await w.append(2, randomBytes(CS)), undefined);
  assert.equal(await w.append(3, Buffer.alloc(16)), undefined);
  assert.equal(w.failed, true);
  assert.equal(reasons.length, 1);
  assert.match(reasons[0]!, /size limit/);
});

test('recoverSession cuts the torn tail, rebuilds the index and marks the session interrupted', async (t) => {
  const dir = tempDir(t);
  const image = makeImage(path.join(dir, 'disk.img'), 64 * CS, 'random', 1);
  const root = path.join(dir, 'snap');
  const dev = await FileDevice.open(image);
  t.after(() => dev.close());
  const cow = CowDevice.create(dev, { devicePath: image, snapshotRoot: root, chunkSize: CS });
  await cow.write(randomBytes(3 * CS), 2 * CS);
  await cow.write(randomBytes(100), 40 * CS + 10);
  // No close (dropAsIfKilled below): as if the process died. Add a torn record at the end.
  const sessionDir = cow.sessionDir!;
  const dataPath = path.join(sessionDir, DATA_FILE);
  const goodBytes = fs.statSync(dataPath).size;
  fs.appendFileSync(dataPath, Buffer.from('BDSR-and-then-nothing'));
  assert.equal((await readManifest(sessionDir)).state, 'active');
  // While the writer still has the session open, recovery refuses and changes nothing.
  await assert.rejects(recoverSession(sessionDir), (e: unknown) => e instanceof BdsnapError && e.code === 'EBUSY' && /still open by a running process/.test(e.message));
  assert.equal((await readManifest(sessionDir)).state, 'active');
  assert.equal(fs.statSync(dataPath).size, goodBytes + 21, 'nothing cut under a live writer');
  await cow.dropAsIfKilled();
  const info = await recoverSession(sessionDir);
  assert.equal(info.state, 'interrupted');
  assert.equal(info.preservedChunks, 4);
  assert.equal(info.recovery?.cutBytes, 21);
  assert.equal(fs.statSync(dataPath).size, goodBytes);
  const index = decodeIndex(fs.readFileSync(path.join(sessionDir, INDEX_FILE)));
  assert.deepEqual([...index.keys()].sort((a, b) => a - b), [2, 3, 4, 40]);
  // A second recovery finds nothing more to cut.
  assert.equal((await recoverSession(sessionDir)).recovery?.cutBytes, 0);
  const listed = await listSessions(root, image);
  assert.equal(listed.length, 1);
  assert.equal(listed[0]!.state, 'interrupted');
});

test('no directory for a session that only reads; directories unique within one millisecond', async (t) => {
  const dir = tempDir(t);
  const image = makeImage(path.join(dir, 'disk.img'), 16 * CS, 'random', 2);
  const root = path.join(dir, 'snap');
  const dev = await FileDevice.open(image);
  t.after(() => dev.close());
  const reader = CowDevice.create(dev, { devicePath: image, snapshotRoot: root, chunkSize: CS });
  await reader.read(Buffer.alloc(CS), 0);
  await reader.flush();
  assert.equal(await reader.close(), undefined);
  assert.equal(reader.sessionDir, undefined);
  assert.equal(fs.existsSync(root), false);

  const when = new Date('2026-01-02T03:04:05.678Z');
  assert.equal(sessionDirName('/images/my disk.img', when), 'images-my%20disk.img_20260102T030405.678Z');
  const a = CowDevice.create(dev, { devicePath: image, snapshotRoot: root, chunkSize: CS, mountTime: when });
  const b = CowDevice.create(dev, { devicePath: image, snapshotRoot: root, chunkSize: CS, mountTime: when });
  await a.write(Buffer.alloc(10, 1), 0);
  await b.write(Buffer.alloc(10, 2), CS);
  assert.notEqual(a.sessionDir, b.sessionDir);
  assert.equal(b.sessionDir, `${a.sessionDir}-2`);
  await a.close();
  await b.close();
  assert.deepEqual((await listSessions(root)).map((s) => s.dir), [a.sessionDir, b.sessionDir]);
});

test('racing writes to one chunk copy it once; a wide write stores adjacent chunks in one record', async (t) => {
  const dir = tempDir(t);
  const image = makeImage(path.join(dir, 'disk.img'), 64 * CS, 'random', 3);
  const original = fs.readFileSync(image);
  const root = path.join(dir, 'snap');
  const dev = await FileDevice.open(image);
  t.after(() => dev.close());
  const cow = CowDevice.create(dev, { devicePath: image, snapshotRoot: root, chunkSize: CS });
  await Promise.all(Array.from({ length: 20 }, (_, i) => cow.write(Buffer.alloc(512, i + 1), 3 * CS + (i % 8) * 512)));
  await cow.write(randomBytes(5 * CS), 10 * CS);
  assert.equal(cow.stats().preservedChunks, 6);
  const sessionDir = onlyDir(root);
  const fd = fs.openSync(path.join(sessionDir, DATA_FILE), 'r');
  t.after(() => fs.closeSync(fd));
  const scan = await scanData(fd, { chunkSize: CS, deviceSize: dev.size, allowTornTail: false, where: 'data' });
  assert.deepEqual(scan.records.map((r) => [r.firstChunk, r.payloadBytes]), [[3, CS], [10, 5 * CS]]);
  const stored = Buffer.alloc(CS);
  fs.readSync(fd, stored, 0, CS, scan.index.get(3)!);
  assert.deepEqual(stored, original.subarray(3 * CS, 4 * CS));
  await cow.close();
});

test('bad options are refused with EINVAL', async (t) => {
  const dir = tempDir(t);
  const image = makeImage(path.join(dir, 'disk.img'), 16 * CS, 'random', 4);
  const dev = await FileDevice.open(image);
  t.after(() => dev.close());
  assert.throws(() => CowDevice.create(dev, { devicePath: image, chunkSize: 6000 }), isError('EINVAL', /power of two/));
  assert.throws(() => CowDevice.create(dev, { devicePath: image, chunkSize: 2048 }), isError('EINVAL'));
  assert.throws(() => CowDevice.create(dev, { devicePath: 'relative.img' }), isError('EINVAL', /absolute/));
  assert.throws(() => CowDevice.create(dev, { devicePath: image, sizeLimitBytes: -1 }), isError('EINVAL'));
  const cow = CowDevice.create(dev, { devicePath: image, snapshotRoot: path.join(dir, 's'), chunkSize: CS });
  await assert.rejects(cow.write(Buffer.alloc(CS), 16 * CS), isError('ENOSPC'));
  await assert.rejects(cow.view().write(Buffer.alloc(1), 0), isError('EPERM'));
});

test('crc32x8 end digests change with any one flipped bit and with two parts swapped; sha256 ones are the plain hash', () => {
  for (const size of [65536, 40000, 16384]) {
    const data = randomBytes(size);
    const digest = chunkDigest(data, 'crc32x8');
    assert.equal(digest.length, 32);
    assert.ok(chunkDigest(Buffer.from(data), 'crc32x8').equals(digest), 'the same bytes give the same digest');
    for (let bit = 0; bit < size * 8; bit += 997) {
      const changed = Buffer.from(data);
      changed[bit >> 3]! ^= 1 << (bit & 7);
      assert.ok(!chunkDigest(changed, 'crc32x8').equals(digest), `bit ${bit} of ${size}`);
    }
    const part = 4096;
    const swapped = Buffer.concat([data.subarray(part, 2 * part), data.subarray(0, part), data.subarray(2 * part)]);
    assert.ok(!chunkDigest(swapped, 'crc32x8').equals(digest), 'two 4 KiB pieces swapped');
    assert.ok(chunkDigest(data, 'sha256').equals(createHash('sha256').update(data).digest()));
  }
  const small = randomBytes(4096);
  assert.ok(chunkDigest(small, 'crc32x8').equals(Buffer.concat([u32(zlib.crc32(small)), Buffer.alloc(28)])), 'a 4 KiB chunk is one part');
  const into = Buffer.alloc(96, 0xff);
  into.fill(0, 0, 32).fill(0, 64);
  chunkDigest(Buffer.from('abc'), 'crc32x8', into, 32);
  assert.ok(into.subarray(0, 32).equals(Buffer.alloc(32)) && into.subarray(64).equals(Buffer.alloc(32)), 'writes only its own slot');
  assert.ok(into.subarray(32, 64).equals(chunkDigest(Buffer.from('abc'), 'crc32x8')));
});

function u32(value: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(value);
  return b;
}

test('the read-ahead scan handles records across windows, one larger than a window, and a bad byte far in', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, DATA_FILE);
  // About 40 MiB: records of 1 to 512 chunks (up to 2 MiB, like the writer's runs) and, in the
  // middle, one of 10 MiB, more than a read window (8 MiB) and its carry room (4 MiB).
  const sizes = Array.from({ length: 40 }, (_, i) => (i === 20 ? 2560 : 1 + ((i * 7919) % 512)));
  let chunk = 0;
  const records: Array<[number, Buffer]> = sizes.map((n) => {
    const r: [number, Buffer] = [chunk, randomBytes(n * CS)];
    chunk += n;
    return r;
  });
  const positions = await writeRecords(file, records);
  const fd = fs.openSync(file, 'r+');
  t.after(() => fs.closeSync(fd));
  const options = { chunkSize: CS, deviceSize: chunk * CS, allowTornTail: false, where: 'test' };
  const scan = await scanData(fd, options);
  assert.deepEqual(scan.records.map((r) => r.position), positions);
  assert.equal(scan.index.size, chunk);
  records.forEach(([first, payload], i) => {
    assert.equal(scan.index.get(first + Math.floor(payload.length / CS) - 1), positions[i]! + RECORD_HEADER_BYTES + payload.length - CS);
  });
  // One byte of the last record's payload, some 40 MiB in.
  const lastPayload = positions.at(-1)! + RECORD_HEADER_BYTES + 100;
  const byte = Buffer.alloc(1);
  fs.readSync(fd, byte, 0, 1, lastPayload);
  byte[0]! ^= 0x40;
  fs.writeSync(fd, byte, 0, 1, lastPayload);
  await assert.rejects(scanData(fd, options), isError('ECORRUPT', new RegExp(`checksum mismatch at byte ${positions.at(-1)}`)));
  const tolerant = await scanData(fd, { ...options, allowTornTail: true });
  assert.equal(tolerant.validBytes, positions.at(-1));
});

test("'process' durability: the store is synced in the background once first writes pause, and by a flush at once", async (t) => {
  const dir = tempDir(t);
  const image = makeImage(path.join(dir, 'disk.img'), 64 * CS, 'random', 5);
  const dev = await FileDevice.open(image);
  t.after(() => dev.close());
  // The sync timer and the clock it reads move only when the test says so.
  t.mock.timers.enable({ apis: ['setTimeout'] });
  let nowMs = 0;
  // The sync timer reads the clock when it fires: the times it did, once the writes are done.
  const timerFiredAt: number[] = [];
  let writing = true;
  const clockMs = (): number => {
    if (!writing) timerFiredAt.push(nowMs);
    return nowMs;
  };
  const advance = (ms: number): void => {
    nowMs += ms;
    t.mock.timers.tick(ms);
  };
  const cow = CowDevice.create(dev, { devicePath: image, snapshotRoot: path.join(dir, 'snap'), chunkSize: CS, clockMs });
  const unsynced = (): number => cow.stats().unsyncedBytes;
  // First writes every 200 ms for 1 s: never a pause of a second, so nothing is synced meanwhile.
  for (let i = 0; i < 5; i++) {
    await cow.write(randomBytes(CS), i * CS);
    advance(200);
  }
  assert.equal(unsynced(), 5 * (RECORD_HEADER_BYTES + CS), 'no sync while first writes go on');
  // The last first write was at 800 ms: the sync is due a second later, and not before.
  writing = false;
  advance(799);
  assert.deepEqual(timerFiredAt, [], 'no sync before a second of pause');
  assert.equal(unsynced(), 5 * (RECORD_HEADER_BYTES + CS));
  advance(1);
  assert.deepEqual(timerFiredAt, [1800], 'the sync starts after a second of pause');
  while (unsynced() > 0) await new Promise((r) => setImmediate(r));
  writing = true;
  await cow.write(randomBytes(CS), 10 * CS);
  assert.ok(unsynced() > 0);
  await cow.flush();
  assert.equal(unsynced(), 0, 'a flush syncs the store');
  await cow.close();
});

test('an unsealed copy and a refused clone reach the file before their headers (a sync between them in strict mode); seals make them whole', async (t) => {
  for (const strict of [false, true]) {
    const dir = tempDir(t);
    const fd = fs.openSync(path.join(dir, DATA_FILE), 'w+');
    const calls: string[] = [];
    const origin = { writevSync: fs.writevSync, writev: fs.writev, fdatasync: fs.fdatasync };
    const target = fs as unknown as Record<string, unknown>;
    const bytesOf = (buffers: readonly NodeJS.ArrayBufferView[]): number => buffers.reduce((n, b) => n + b.byteLength, 0);
    target.writevSync = (f: number, buffers: NodeJS.ArrayBufferView[], position: number) => {
      if (f === fd) calls.push(`write ${position}+${bytesOf(buffers)}`);
      return origin.writevSync(f, buffers, position);
    };
    target.writev = (f: number, buffers: NodeJS.ArrayBufferView[], position: number, cb: (err: NodeJS.ErrnoException | null, n: number) => void) => {
      if (f === fd) calls.push(`write ${position}+${bytesOf(buffers)}`);
      return origin.writev(f, buffers, position, cb);
    };
    target.fdatasync = (f: number, cb: (err: NodeJS.ErrnoException | null) => void) => {
      if (f === fd) calls.push('sync');
      return origin.fdatasync(f, cb);
    };
    try {
      const w = new StoreWriter(fd, 0, { strict, onFailure: (r) => assert.fail(r) });
      const copy = randomBytes(8 * CS);
      const refused = randomBytes(4 * CS);
      const at = await w.appendUnsealed(2, copy);
      assert.equal(at, RECORD_HEADER_BYTES, 'the payload right after its header');
      assert.deepEqual(calls.splice(0), strict ? [`write 64+${copy.length}`, 'sync', 'write 0+64', 'sync'] : [`write 64+${copy.length}`, 'write 0+64']);
      const start = w.sizeBytes;
      const at2 = await w.appendCloned(20, refused.length, 4096, async () => refused);
      assert.equal(at2! % 4096, 0);
      assert.deepEqual(calls.splice(0), strict
        ? [`write ${at2}+${refused.length}`, 'sync', `write ${start}+${at2! - start}`, 'sync']
        : [`write ${at2}+${refused.length}`, `write ${start}+${at2! - start}`]);
      await w.seal();
      await w.sync();
    } finally {
      Object.assign(target, origin);
    }
    const scan = await scanData(fd, { chunkSize: CS, deviceSize: 64 * CS, allowTornTail: false, where: DATA_FILE });
    fs.closeSync(fd);
    assert.deepEqual(scan.records.map((r) => [r.firstChunk, r.cloned]), [[2, true], [20, true]]);
    assert.deepEqual(scan.unsealed, []);
  }
});
