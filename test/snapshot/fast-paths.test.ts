/**
 * The fast paths of the store and restore: CRC-32 records next to the first format's sha256
 * records, a scan that keeps the verified bytes, and restore applying from memory or by
 * re-reading the stores (over the memory budget), with pieces gathered across sessions.
 */

import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import zlib from 'node:zlib';
import { FileDevice } from '../../src/device/file-device.js';
import { DATA_FILE, RECORD_FLAG_CRC32, RECORD_HEADER_BYTES, RECORD_MAGIC, decodeDigests, decodeRecordHeader, encodeDigestArrays, encodeIndex, encodeRecordHeader, indexMatches } from '../../src/snapshot/format.js';
import { StoreWriter } from '../../src/snapshot/store-writer.js';
import { scanData } from '../../src/snapshot/store-scan.js';
import { DeviceDigestPass, digestDeviceChunks } from '../../src/snapshot/device-digests.js';
import { chunkRuns } from '../../src/snapshot/chunk-runs.js';
import { CowDevice, restore } from '../../src/snapshot/index.js';
import { makeImage, sha256File } from '../../testkit/files.js';
import { isError, tempDir } from './helpers.js';

const CS = 4096;

/** A record as the first writer made them: flags 0, sha256 of the payload, sha256 header check. */
function sha256Record(firstChunk: number, payload: Buffer): Buffer {
  const h = Buffer.alloc(RECORD_HEADER_BYTES);
  h.writeUInt32LE(RECORD_MAGIC, 0);
  h.writeUInt16LE(1, 4);
  h.writeUInt32LE(firstChunk, 8);
  h.writeUInt32LE(payload.length, 16);
  createHash('sha256').update(payload).digest().copy(h, 24);
  createHash('sha256').update(h.subarray(0, 56)).digest().copy(h, 56, 0, 8);
  return Buffer.concat([h, payload]);
}

test('new records carry a CRC-32; records of the first format (sha256) still scan and are checked', async (t) => {
  const dir = tempDir(t);
  const payload = randomBytes(2 * CS);
  const header = encodeRecordHeader(3, payload);
  assert.equal(header.readUInt16LE(6), RECORD_FLAG_CRC32);
  const decoded = decodeRecordHeader(header);
  assert.ok(typeof decoded !== 'string');
  assert.equal(decoded.payloadSha256, false);

  const file = path.join(dir, DATA_FILE);
  const old = sha256Record(0, randomBytes(CS));
  fs.writeFileSync(file, Buffer.concat([old, header, payload]));
  const fd = fs.openSync(file, 'r');
  t.after(() => fs.closeSync(fd));
  const scan = await scanData(fd, { chunkSize: CS, deviceSize: 16 * CS, allowTornTail: false, where: 'data' });
  assert.deepEqual(scan.records.map((r) => [r.firstChunk, r.payloadBytes]), [[0, CS], [3, 2 * CS]]);
  assert.equal(scan.index.get(4), old.length + RECORD_HEADER_BYTES + CS);

  for (const at of [30, RECORD_HEADER_BYTES + 7, old.length + 25, old.length + RECORD_HEADER_BYTES + CS + 1]) {
    const bad = Buffer.concat([old, header, payload]);
    bad[at]! ^= 0x01;
    fs.writeFileSync(file, bad);
    const fd2 = fs.openSync(file, 'r');
    try {
      await assert.rejects(scanData(fd2, { chunkSize: CS, deviceSize: 16 * CS, allowTornTail: false, where: 'data' }), isError('ECORRUPT', /checksum mismatch/), `flip at ${at}`);
    } finally {
      fs.closeSync(fd2);
    }
  }
});

test('one record layout for both sinks: a session record is the first CRC-32 layout byte for byte; a snapshot record adds its device, order and image flag, which a session scan refuses', async (t) => {
  const payload = randomBytes(CS);
  const session = encodeRecordHeader(5, payload);
  // What every session store written since CRC-32 records holds: nothing past byte 28 but the header check.
  const before = Buffer.alloc(RECORD_HEADER_BYTES);
  before.writeUInt32LE(RECORD_MAGIC, 0);
  before.writeUInt16LE(1, 4);
  before.writeUInt16LE(RECORD_FLAG_CRC32, 6);
  before.writeUInt32LE(5, 8);
  before.writeUInt32LE(CS, 16);
  before.writeUInt32LE(zlib.crc32(payload), 24);
  before.writeUInt32LE(zlib.crc32(before.subarray(0, 56)), 56);
  assert.ok(session.equals(before));

  const point = encodeRecordHeader(5, payload, { deviceKey: 0xffff_fffe, sequence: 2 ** 40 + 3, image: true });
  const decoded = decodeRecordHeader(point);
  assert.ok(typeof decoded !== 'string', String(decoded));
  assert.deepEqual([decoded.kind, decoded.deviceKey, decoded.sequence, decoded.firstChunk], ['image', 0xffff_fffe, 2 ** 40 + 3, 5]);
  const original = decodeRecordHeader(encodeRecordHeader(5, payload, { deviceKey: 1, sequence: 0, image: false }));
  assert.ok(typeof original !== 'string' && original.kind === 'copied' && original.deviceKey === 1);

  const reserved = Buffer.from(point);
  reserved[44] = 1;
  reserved.writeUInt32LE(zlib.crc32(reserved.subarray(0, 56)), 56);
  assert.match(String(decodeRecordHeader(reserved)), /reserved/);

  const file = path.join(tempDir(t), DATA_FILE);
  fs.writeFileSync(file, Buffer.concat([session, payload, point, payload]));
  const fd = fs.openSync(file, 'r');
  t.after(() => fs.closeSync(fd));
  await assert.rejects(scanData(fd, { chunkSize: CS, deviceSize: 16 * CS, allowTornTail: false, where: 'data' }), isError('ECORRUPT', /image record in a session store at byte 4160/));
});

{
  test('a chain of sessions restores exactly, originals gathered from interleaved stores', async (t) => {
    const dir = tempDir(t);
    const image = makeImage(path.join(dir, 'disk.img'), 1200 * CS + 1000, 'random', 1);
    const root = path.join(dir, 'snap');
    const before = await sha256File(image);
    let firstDir: string | undefined;
    for (let s = 0; s < 2; s++) {
      const dev = await FileDevice.open(image);
      try {
        const cow = CowDevice.create(dev, { devicePath: image, snapshotRoot: root, chunkSize: CS, mountTime: new Date(Date.UTC(2026, 0, 1, 0, s)), deviceIdentity: { ...dev.identity } });
        // Interleaved sessions: adjacent chunks whose originals live in different stores, long
        // runs, single chunks and the partial last chunk.
        const writes: Array<[number, number]> = s === 0
          ? [[0, 600 * CS], [700 * CS, 5], [1200 * CS, 1000], [900 * CS + 10, 3 * CS]]
          : [[300 * CS, 500 * CS], [699 * CS, 3 * CS], [1199 * CS, CS + 1000], [50 * CS, 20]];
        await Promise.all(writes.map(([at, len]) => cow.write(randomBytes(len), at)));
        const summary = await cow.close();
        firstDir ??= summary?.sessionDir;
      } finally {
        await dev.close();
      }
    }
    const result = await restore(firstDir!);
    assert.equal(result.sessionsApplied.length, 2);
    assert.equal(result.digestCheck, 'verified');
    assert.equal(await sha256File(image), before);
  });
}

test('appends written several batches at once resolve in file order; a hole left by a kill is cut', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, DATA_FILE);
  const fd = fs.openSync(file, 'w+');
  t.after(() => fs.closeSync(fd));
  const w = new StoreWriter(fd, 0, { strict: false, onFailure: (r) => assert.fail(r) });
  const resolved: number[] = [];
  const payloads = Array.from({ length: 200 }, (_, i) => randomBytes((1 + (i % 5)) * CS));
  const positions = await Promise.all(payloads.map(async (p, i) => {
    const at = await w.append(i * 5, p);
    resolved.push(at!);
    return at!;
  }));
  await w.drain();
  assert.deepEqual(resolved, [...resolved].sort((a, b) => a - b), 'resolved in file order');
  let expected = 0;
  positions.forEach((at, i) => {
    assert.equal(at, expected);
    expected += RECORD_HEADER_BYTES + payloads[i]!.length;
  });
  assert.equal(fs.fstatSync(fd).size, expected);
  // A kill while a middle batch was still being written: its bytes are missing (zeroes) while a
  // later batch is complete. The scan keeps what is before the hole and cuts the rest.
  const hole = positions[120]!;
  fs.writeSync(fd, Buffer.alloc(positions[121]! - hole), 0, positions[121]! - hole, hole);
  const scan = await scanData(fd, { chunkSize: CS, deviceSize: 1000 * CS, allowTornTail: true, where: 'data' });
  assert.equal(scan.validBytes, hole);
  assert.equal(scan.records.length, 120);
  assert.match(scan.tornReason ?? '', /bad record magic at byte/);
});

/** An image of random data of `sizeBytes` in 64 KiB chunks, and each chunk's bytes. */
function digestImage(t: TestContext, sizeBytes: number, seed: number): { dir: string; image: string; chunkSize: number; chunkOf: (c: number) => Buffer } {
  const dir = tempDir(t);
  const chunkSize = 64 * 1024;
  const image = makeImage(path.join(dir, 'disk.img'), sizeBytes, 'random', seed);
  const content = fs.readFileSync(image);
  return { dir, image, chunkSize, chunkOf: (c) => content.subarray(c * chunkSize, Math.min((c + 1) * chunkSize, sizeBytes)) };
}

/** Each algorithm's digest, written independently of chunkDigest: crc32x8 is up to eight equal parts of at least 4 KiB, a CRC-32 each. */
const expectedDigest = {
  sha256: (data: Buffer): Buffer => createHash('sha256').update(data).digest(),
  crc32x8: (data: Buffer): Buffer => {
    const out = Buffer.alloc(32);
    const n = data.length;
    const parts = Math.max(1, Math.min(8, Math.floor(n / 4096)));
    for (let i = 0; i < parts; i++) out.writeUInt32LE(zlib.crc32(data.subarray(Math.floor((i * n) / parts), Math.floor(((i + 1) * n) / parts))), i * 4);
    return out;
  },
} as const;

test('device digests, in one worker or split over two, match each chunk\'s crc32x8 and sha256, the partial last one too', async (t) => {
  const sizeBytes = 40 * 1024 * 1024 + 5000;
  const { dir, image, chunkSize, chunkOf } = digestImage(t, sizeBytes, 2);
  // Every chunk but a few, so that runs break; more than 32 MiB, so that two workers share it.
  const chunks = Array.from({ length: Math.ceil(sizeBytes / chunkSize) }, (_, i) => i).filter((c) => c % 97 !== 5);
  const expect = expectedDigest;
  // Two workers as on a machine of three cores or more, and this machine's own choice.
  for (const [algorithm, parts] of [['crc32x8', 2], ['sha256', 2], ['crc32x8', undefined]] as const) {
    const digests = await digestDeviceChunks(image, Float64Array.from(chunks), chunkSize, sizeBytes, algorithm, parts);
    assert.equal(digests.size, chunks.length);
    chunks.forEach((c, i) => {
      assert.equal(digests.indexOf(c), i);
      assert.ok(digests.digest(i).equals(expect[algorithm](chunkOf(c))), `${algorithm} chunk ${c}`);
    });
    assert.equal(digests.indexOf(5), -1, 'a chunk not asked for');
  }
  await assert.rejects(digestDeviceChunks(path.join(dir, 'missing.img'), Float64Array.of(0), chunkSize, sizeBytes, 'crc32x8'), isError('EIO'));
});

test('a device digest pass the caller joins at once: the runs shared with a worker, two lists of two algorithms, every digest right', async (t) => {
  const sizeBytes = 48 * 1024 * 1024 + 5000;
  const { dir, image, chunkSize, chunkOf } = digestImage(t, sizeBytes, 3);
  const all = Array.from({ length: Math.ceil(sizeBytes / chunkSize) }, (_, i) => i);
  const lists = [
    { algorithm: 'crc32x8' as const, chunks: Float64Array.from(all.filter((c) => c % 3 !== 1)) },
    { algorithm: 'sha256' as const, chunks: Float64Array.from(all.filter((c) => c % 3 === 1)) },
  ];
  // The caller takes the first runs before the worker has started, the worker the ones left.
  const tables = await new DeviceDigestPass(image, lists, chunkSize, sizeBytes, 1).finish();
  lists.forEach(({ algorithm, chunks }, k) => {
    const table = tables[k]!;
    assert.equal(table.size, chunks.length);
    chunks.forEach((c, i) => {
      assert.ok(table.digest(i).equals(expectedDigest[algorithm](chunkOf(c))), `${algorithm} chunk ${c}`);
    });
  });
  await assert.rejects(new DeviceDigestPass(path.join(dir, 'missing.img'), lists, chunkSize, sizeBytes, 1).finish(), isError('EIO'));
});

test('chunkRuns splits sorted chunks at gaps and at the run limit', () => {
  assert.deepEqual([...chunkRuns([1, 2, 3, 7, 8, 10], 2)], [[0, 2], [2, 3], [3, 5], [5, 6]]);
  assert.deepEqual([...chunkRuns([4, 5, 6], 8)], [[0, 3]]);
  assert.deepEqual([...chunkRuns([], 8)], []);
});

test('indexMatches accepts exactly the index it was written from, in chunk order', () => {
  const index = new Map<number, number>([[7, 0], [3, 16_448], [12, 32_896], [2 ** 40, 49_344]]);
  const file = encodeIndex(index);
  assert.equal(indexMatches(file, index), true);
  assert.equal(indexMatches(file, new Map([...index].slice(1))), false, 'an entry the store does not have');
  assert.equal(indexMatches(file, new Map([...index, [99, 65_792]])), false, 'an entry the file does not have');
  assert.equal(indexMatches(file, new Map([...index].map(([c, p]) => [c, c === 12 ? p + 1 : p]))), false, 'a moved original');
  // The same entries, two of them swapped (and the file's checksum made to fit): out of order.
  const swapped = Buffer.from(file);
  file.copy(swapped, 16, 32, 48);
  file.copy(swapped, 32, 16, 32);
  createHash('sha256').update(swapped.subarray(0, swapped.length - 32)).digest().copy(swapped, swapped.length - 32);
  assert.equal(indexMatches(swapped, index), false);
  const damaged = Buffer.from(file);
  damaged[20]! ^= 1;
  assert.throws(() => indexMatches(damaged, index), isError('ECORRUPT'));
});

test('a digests file reads as a table in chunk order; out-of-order files are put in order, repeated chunks refused', () => {
  const digestOf = (c: number): Buffer => createHash('sha256').update(String(c)).digest();
  const sorted = [1, 4, 9, 2 ** 35];
  const table = decodeDigests(encodeDigestArrays(sorted, Buffer.concat(sorted.map(digestOf))));
  assert.deepEqual([...table.chunks], sorted);
  sorted.forEach((c, i) => {
    assert.equal(table.indexOf(c), i);
    assert.ok(table.digest(i).equals(digestOf(c)));
    assert.ok(table.equalsAt(i, digestOf(c)));
    assert.equal(table.equalsAt(i, digestOf(c + 1)), false);
  });
  assert.equal(table.indexOf(5), -1);
  const shuffled = [9, 1, 2 ** 35, 4];
  const fromShuffled = decodeDigests(encodeDigestArrays(shuffled, Buffer.concat(shuffled.map(digestOf))));
  assert.deepEqual([...fromShuffled.chunks], sorted);
  assert.ok(fromShuffled.alignedWith(table));
  sorted.forEach((_c, i) => assert.ok(fromShuffled.sameAt(i, table, i)));
  assert.equal(fromShuffled.sameAt(0, table, 1), false);
  assert.ok(table.sameChunksAs(new Map(sorted.map((c) => [c, 0]))));
  assert.equal(table.sameChunksAs(new Map(sorted.slice(1).map((c) => [c, 0]))), false);
  assert.equal(table.sameChunksAs(new Map([...sorted.slice(1), 7].map((c) => [c, 0]))), false);
  const twice = [4, 1, 4];
  assert.throws(() => decodeDigests(encodeDigestArrays(twice, Buffer.concat(twice.map(digestOf)))), isError('ECORRUPT', /lists chunk 4 twice/));
});
