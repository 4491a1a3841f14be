/** The piece pool's worker threads, and the 'place' step of a restore from local piece files. */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { CODEC_BROTLI, CODEC_RAW, encodePiece, sha256Hex } from '../../src/repository/codec.js';
import { PiecePool } from '../../src/repository/piece-pool.js';
import { cleanupOf } from '../../testkit/cleanup.js';
import { makeTempDir } from '../../testkit/files.js';

const PIECE = 64 * 1024;

async function setup(t: import('node:test').TestContext): Promise<{ dir: string; target: fs.promises.FileHandle; pool: PiecePool }> {
  const cleanup = cleanupOf(t);
  const dir = makeTempDir(t, 'bdsnap-pool-');
  const target = await fs.promises.open(path.join(dir, 'target.img'), 'w+');
  cleanup.after(() => target.close());
  const pool = new PiecePool();
  cleanup.after(() => pool.close());
  return { dir, target, pool };
}

test('a caller whose own work is all synchronous still gets its tasks onto the workers', { timeout: 30_000 }, async (t) => {
  const { dir, target, pool } = await setup(t);
  const raw = randomBytes(PIECE);
  const hash = sha256Hex(raw);
  const file = path.join(dir, 'piece');
  fs.writeFileSync(file, encodePiece(raw, CODEC_RAW));
  // Places run back to back, each awaited: nothing but the pool gives the event loop a turn.
  // Before the fix every task ran inline for as long as the caller kept going.
  const deadline = Date.now() + 10_000;
  let done = 0;
  while (pool.tasksRunInline === done && Date.now() < deadline) {
    await pool.place({ file, range: null, hash, fd: target.fd, offsetBytes: (done % 16) * PIECE, lengthBytes: PIECE, keep: false });
    done++;
  }
  assert.ok(pool.tasksRunInline < done, `all ${done} tasks ran on the calling thread in 10 s: the workers' 'ready' was never seen`);
  const back = Buffer.alloc(PIECE);
  await target.read(back, 0, PIECE, 0);
  assert.deepEqual(back, raw);
});

test('place writes a piece at its offset, keeps a raw piece intact for its next slot, and refuses a damaged or overlong file', { timeout: 30_000 }, async (t) => {
  const { dir, target, pool } = await setup(t);
  const text = Buffer.from('block device snapshot backup '.repeat(PIECE / 29 + 1)).subarray(0, PIECE);
  const random = randomBytes(PIECE);
  const files = { text: path.join(dir, 'text'), random: path.join(dir, 'random') };
  fs.writeFileSync(files.text, encodePiece(text, CODEC_BROTLI));
  fs.writeFileSync(files.random, encodePiece(random, CODEC_RAW));
  // The raw piece is kept for a later slot; the text piece read in between reuses the read
  // buffer, which must not change the kept copy.
  const steps = [
    { file: files.random, data: random, at: 0, keep: true },
    { file: files.text, data: text, at: 1, keep: false },
    { file: files.random, data: random, at: 2, keep: false },
  ];
  for (const s of steps) {
    await pool.place({ file: s.file, range: null, hash: sha256Hex(s.data), fd: target.fd, offsetBytes: s.at * PIECE, lengthBytes: PIECE, keep: s.keep });
  }
  const back = Buffer.alloc(3 * PIECE);
  await target.read(back, 0, back.length, 0);
  assert.deepEqual(back, Buffer.concat([random, text, random]));

  const long = path.join(dir, 'long');
  fs.writeFileSync(long, Buffer.concat([encodePiece(random, CODEC_RAW), Buffer.alloc(64)]));
  await assert.rejects(pool.place({ file: long, range: null, hash: sha256Hex(random), fd: target.fd, offsetBytes: 0, lengthBytes: PIECE, keep: false }), (e: unknown) => (e as { code?: string }).code === 'ECORRUPT' && /longer than a piece/.test((e as Error).message));
  const flipped = encodePiece(text, CODEC_BROTLI);
  flipped[flipped.length - 1]! ^= 1;
  fs.writeFileSync(files.text, flipped);
  await assert.rejects(pool.place({ file: files.text, range: null, hash: sha256Hex(text), fd: target.fd, offsetBytes: 0, lengthBytes: PIECE, keep: false }), (e: unknown) => (e as { code?: string }).code === 'ECORRUPT');
  await assert.rejects(pool.place({ file: path.join(dir, 'absent'), range: null, hash: sha256Hex(text), fd: target.fd, offsetBytes: 0, lengthBytes: PIECE, keep: false }), /is missing/);
});

test('an urgent decode (a client waits for it) goes before the tasks queued, not after them', { timeout: 30_000 }, async (t) => {
  const pool = new PiecePool({ kind: 'none' }, 1);
  t.after(() => pool.close());
  await pool.ready;
  const raw = randomBytes(PIECE);
  const stored = encodePiece(raw, CODEC_BROTLI);
  const hash = sha256Hex(raw);
  // A background copy's batch: many pieces queued behind the one the worker has.
  const order: string[] = [];
  const queued = Array.from({ length: 40 }, (_, i) => pool.decode(Buffer.from(stored), hash, PIECE).then(() => order.push(`copy ${i}`)));
  const urgent = pool.decode(Buffer.from(stored), hash, PIECE, { urgent: true }).then((back) => {
    order.push('client');
    assert.deepEqual(back, raw);
  });
  await Promise.all([...queued, urgent]);
  // The worker holds one task when the client's is queued: it comes next.
  assert.ok(order.indexOf('client') <= 1, `the client's piece was decoded at place ${order.indexOf('client') + 1} of ${order.length}`);
});
