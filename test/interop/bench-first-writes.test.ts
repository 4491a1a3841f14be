/**
 * The check of the bench's replayed first-write row (first-rand-4k) must tell a session that
 * missed a first write from fio leaving a few writes of its log unsent: it once failed a cell
 * ("preserved 16381 chunks, not 16384") where the session held exactly the blocks fio changed.
 */

import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { preservedPerLoggedWrite, writeFirstWriteLog } from '../../bench/rows.js';
import { BDSNAP_SESSION } from '../../bench/targets.js';
import { makeImage, makeTempDir } from '../../testkit/files.js';
import { runFio } from '../../testkit/fio.js';
import { needs } from '../../testkit/needs.js';

const IMAGE_BYTES = 64 << 20;
const CHUNK_BYTES = 16 << 10;
const WRITES = 512;
const IO_DEPTH = 16;
const UNSENT = 3;

/**
 * A random image and the first-write log of the bench's row over it, with the row's check,
 * which lets fio leave `unsent` writes of the log unsent (the row's own: its depth).
 */
function firstWriteCell(t: TestContext, unsent = IO_DEPTH): { dir: string; image: string; logPath: string; check: ReturnType<typeof preservedPerLoggedWrite> } {
  const dir = makeTempDir(t);
  const image = makeImage(path.join(dir, 'image.img'), IMAGE_BYTES, 'random');
  const logPath = path.join(dir, 'first-writes.iolog');
  writeFirstWriteLog(logPath, IMAGE_BYTES, CHUNK_BYTES, WRITES);
  return { dir, image, logPath, check: preservedPerLoggedWrite(image, logPath, unsent) };
}

test('the first-write check passes a session that preserved every block fio changed, though fio left writes of the log unsent', { timeout: 60_000 }, async (t) => {
  if (!needs(t, { tools: ['fio'] })) return;
  // fio may leave up to its depth of the log it is given unsent, after the UNSENT taken out here.
  const { dir, image, logPath, check } = firstWriteCell(t, IO_DEPTH + UNSENT);
  // What fio sends when it leaves the last writes of the log unsent.
  const lines = fs.readFileSync(logPath, 'utf8').split('\n');
  const sentPath = path.join(dir, 'sent.iolog');
  fs.writeFileSync(sentPath, [...lines.slice(0, 3 + WRITES - UNSENT), ...lines.slice(3 + WRITES)].join('\n'));

  const running = await BDSNAP_SESSION.start({ imagePath: image, snapshotParent: dir });
  try {
    const result = await runFio({ uri: running.uri, rw: 'randwrite', blockSizeBytes: 4096, ioDepth: IO_DEPTH, sizeBytes: IMAGE_BYTES, extraArgs: [`--read_iolog=${sentPath}`] });
    assert.equal(result.error, 0, result.stderr);
  } finally {
    await running.stop();
  }
  assert.ok((running.preservedChunks?.() ?? WRITES) <= WRITES - UNSENT);
  check(running);
});

test('the first-write check refuses a session that preserved fewer chunks than fio changed blocks', (t) => {
  const { image, logPath, check } = firstWriteCell(t);
  const fd = fs.openSync(image, 'r+');
  const offsets = fs.readFileSync(logPath, 'utf8').split('\n').filter((l) => l.startsWith('nbd write')).map((l) => Number(l.split(' ')[2]));
  for (const offset of offsets) fs.writeSync(fd, Buffer.alloc(4096, 0xa5), 0, 4096, offset);
  fs.closeSync(fd);
  const stopped = (preserved: number) => ({ uri: '', stop: async () => {}, preservedChunks: () => preserved });
  check(stopped(WRITES));
  assert.throws(() => check(stopped(WRITES - 1)), /preserved 511 chunks, but fio changed 512 blocks/);
});

test('the first-write check refuses a cell where fio sent much less than the log', (t) => {
  const { check } = firstWriteCell(t);
  assert.throws(() => check({ uri: '', stop: async () => {}, preservedChunks: () => 0 }), /fio changed only 0 of the 512 blocks/);
});
