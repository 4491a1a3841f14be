/** Piece encoding, the pure LZ4 decoder against the native package, object names, ranges. */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fc from 'fast-check';
import {
  CODEC_BROTLI, CODEC_DEFLATE, CODEC_LZ4, CODEC_RAW, decodePiece, encodePiece, lz4BlockDecode, nativeLz4, pieceCodec, sha256Hex,
} from '../../src/backup/codec.js';
import { checkObjectName } from '../../src/backup/object-store.js';
import { compactSlots, expandSlots, newBackupId } from '../../src/backup/format.js';
import { coveredPieces, normalizeRanges, touchedPieces } from '../../src/backup/ranges.js';

function samples(): Buffer[] {
  const text = Buffer.from('the quick brown fox jumps over the lazy dog; '.repeat(3000));
  const runs = Buffer.alloc(70000, 7);
  runs.fill(9, 1000, 1003);
  return [text, runs, randomBytes(65536), Buffer.concat([randomBytes(300), text.subarray(0, 5000), randomBytes(17)]), Buffer.from('ab'), Buffer.alloc(0)];
}

test('the native LZ4 package is installed here, and the pure decoder reads what it writes', () => {
  const lz4 = nativeLz4();
  assert.ok(lz4, 'lz4-napi should be installed on development machines');
  for (const data of samples()) {
    const packed = lz4.compressSync(data);
    assert.equal(packed.readUInt32LE(0), data.length);
    assert.deepEqual(lz4BlockDecode(packed.subarray(4), data.length), data);
  }
  fc.assert(fc.property(fc.uint8Array({ maxLength: 3000 }), fc.integer({ min: 1, max: 40 }), (bytes, period) => {
    // Periodic data makes overlapping matches.
    const data = Buffer.from(bytes.map((b, i) => (i % period === 0 ? b : bytes[i - (i % period)]!)));
    assert.deepEqual(lz4BlockDecode(lz4.compressSync(data).subarray(4), data.length), data);
  }));
});

test('the pure LZ4 decoder refuses bad input without reading or writing out of bounds', () => {
  fc.assert(fc.property(fc.uint8Array({ maxLength: 200 }), fc.integer({ min: 0, max: 500 }), (bytes, n) => {
    try {
      assert.equal(lz4BlockDecode(Buffer.from(bytes), n).length, n);
    } catch (err) {
      assert.match((err as Error).message, /LZ4/);
    }
  }));
});

test('pieces round-trip with each codec; incompressible data is stored raw; damage is detected', () => {
  for (const codec of [CODEC_RAW, CODEC_LZ4, CODEC_DEFLATE, CODEC_BROTLI] as const) {
    for (const data of samples()) {
      const stored = encodePiece(data, codec);
      assert.deepEqual(decodePiece(stored, sha256Hex(data)), data);
    }
  }
  const random = randomBytes(1 << 20);
  assert.equal(pieceCodec(encodePiece(random, CODEC_LZ4)), CODEC_RAW);
  const text = samples()[0]!;
  const stored = encodePiece(text, CODEC_LZ4);
  assert.equal(pieceCodec(stored), CODEC_LZ4);
  assert.ok(stored.length < text.length / 4);
  for (const at of [0, 5, 9, 20, stored.length - 1]) {
    const bad = Buffer.from(stored);
    bad[at]! ^= 0x10;
    assert.throws(() => decodePiece(bad, sha256Hex(text)), (e: unknown) => (e as { code?: string }).code === 'ECORRUPT');
  }
  assert.throws(() => decodePiece(stored, sha256Hex(Buffer.from('other'))), /does not match its hash/);
  // The default codec: smaller than a quarter of text, and damage in its payload is caught too.
  const brotli = encodePiece(text, CODEC_BROTLI);
  assert.equal(pieceCodec(brotli), CODEC_BROTLI);
  assert.ok(brotli.length < text.length / 4);
  for (const at of [12, 30, brotli.length - 1]) {
    const bad = Buffer.from(brotli);
    bad[at]! ^= 0x10;
    assert.throws(() => decodePiece(bad, sha256Hex(text)), (e: unknown) => (e as { code?: string }).code === 'ECORRUPT');
  }
});

test('object names are safe paths; backup ids sort by time; slots compact and expand', () => {
  for (const bad of ['', '/abs', 'a/../b', '..', '.hidden', 'a//b', 'a/b/', 'sp ace', 'x\0y']) assert.throws(() => checkObjectName(bad), /bad object name/);
  for (const good of ['config', 'pieces/ab/abcdef', 'backups/20260101T000000.000Z-01234567.json']) checkObjectName(good);
  const ids = [new Date('2026-01-02T00:00:00Z'), new Date('2025-12-31T23:59:59.999Z'), new Date('2026-01-02T00:00:00.001Z')].map((d) => newBackupId(d));
  assert.deepEqual([...ids].sort(), [ids[1], ids[0], ids[2]]);
  const h = 'a'.repeat(64);
  const slots = [null, null, h, null, h, h, null];
  assert.deepEqual(compactSlots(slots), [2, h, 1, h, h, 1]);
  assert.deepEqual(expandSlots({ device: 'd', sizeBytes: 7 * 4096 - 1, pieces: compactSlots(slots) }, 4096), slots);
  assert.throws(() => expandSlots({ device: 'd', sizeBytes: 9 * 4096, pieces: compactSlots(slots) }, 4096), /lists 7 pieces/);
});

test('ranges: merged, clipped; the pieces they touch and cover', () => {
  const r = normalizeRanges([{ offsetBytes: 100, lengthBytes: 50 }, { offsetBytes: 0, lengthBytes: 10 }, { offsetBytes: 140, lengthBytes: 100 }, { offsetBytes: 990, lengthBytes: 100 }], 1000);
  assert.deepEqual(r, [{ offsetBytes: 0, lengthBytes: 10 }, { offsetBytes: 100, lengthBytes: 140 }, { offsetBytes: 990, lengthBytes: 10 }]);
  assert.deepEqual([...touchedPieces(r, 100)].sort((a, b) => a - b), [0, 1, 2, 9]);
  assert.deepEqual([...coveredPieces(normalizeRanges([{ offsetBytes: 50, lengthBytes: 950 }], 1000), 100, 1000)].sort((a, b) => a - b), [1, 2, 3, 4, 5, 6, 7, 8, 9]);
  assert.deepEqual([...coveredPieces([{ offsetBytes: 900, lengthBytes: 50 }], 100, 950)], [9], 'a short last piece is covered to the end of the device');
});
