/** Piece encoding, the pure LZ4 decoder against the native package, object names, ranges. */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fc from 'fast-check';
import {
  CODEC_BROTLI, CODEC_DEFLATE, CODEC_LZ4, CODEC_RAW, CODEC_ZSTD, codecFor, decodePiece, encodePiece, lz4BlockDecode, nativeLz4, pieceCodec, sha256Hex,
} from '../../src/repository/codec.js';
import { ZSTD_LEVEL, nativeZstd } from '../../src/repository/zstd.js';
import { decompress as fzstdDecompress } from 'fzstd';
import { checkObjectName } from '../../src/repository/object-store.js';
import { compactSlots, expandSlots, newBackupId } from '../../src/repository/format.js';
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

test('libzstd is usable here through koffi; the pure decoder reads its frames; damaged frames are refused', () => {
  const zstd = nativeZstd();
  assert.ok(zstd, 'libzstd.so.1 and koffi should be installed on development machines (scripts/setup.sh)');
  assert.equal(codecFor('zstd'), CODEC_ZSTD);
  for (const data of [...samples(), randomBytes(300_000)]) {
    const frame = zstd.compress(data, ZSTD_LEVEL);
    assert.equal(frame.byteOffset, 0, 'a frame owns its memory, so that a worker can transfer it');
    assert.equal(frame.buffer.byteLength, frame.length);
    assert.deepEqual(zstd.decompress(frame, data.length), data);
    assert.deepEqual(Buffer.from(fzstdDecompress(frame)), data);
    if (data.length > 0) assert.throws(() => zstd.decompress(frame, data.length - 1), /zstd decompress/);
  }
  const text = samples()[0]!;
  const frame = zstd.compress(text, ZSTD_LEVEL);
  assert.ok(frame.length < text.length / 20);
  for (let at = 0; at < frame.length; at++) {
    const bad = Buffer.from(frame);
    bad[at]! ^= 0x40;
    try {
      // Whatever a damaged frame decodes to, it never exceeds the room given, and the piece hash catches the rest.
      assert.ok(zstd.decompress(bad, text.length).length <= text.length);
    } catch (err) {
      assert.match((err as Error).message, /zstd decompress/);
    }
  }
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
  for (const codec of [CODEC_RAW, CODEC_LZ4, CODEC_DEFLATE, CODEC_BROTLI, CODEC_ZSTD] as const) {
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
  // The compressing codecs: smaller than a quarter of text, and damage in their payload is caught too.
  for (const codec of [CODEC_BROTLI, CODEC_ZSTD] as const) {
    const packed = encodePiece(text, codec);
    assert.equal(pieceCodec(packed), codec);
    assert.ok(packed.length < text.length / 4);
    for (const at of [12, 30, packed.length - 1]) {
      const bad = Buffer.from(packed);
      bad[at]! ^= 0x10;
      assert.throws(() => decodePiece(bad, sha256Hex(text)), (e: unknown) => (e as { code?: string }).code === 'ECORRUPT');
    }
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
