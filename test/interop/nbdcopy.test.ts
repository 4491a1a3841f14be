/**
 * nbdcopy (libnbd) in both directions through `bdsnap serve`, with one connection and with
 * four (multi-conn), compared byte for byte by sha256 against the files on disk. The source
 * has holes, so the copy also exercises write-zeroes/trim over data that was there before.
 * The same copies go through the bench's floor server, whose figures mean nothing unless it
 * keeps the bytes too.
 */

import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { crc32 } from 'node:zlib';
import { nbdFloor, type NbdFloorShape } from '../../bench/targets.js';
import { BENCH_CHUNK_BYTES } from '../../bench/workloads.js';
import { CleanupStack } from '../../testkit/cleanup.js';
import { fillRandom, makeImage, makeTempDir, sha256File } from '../../testkit/files.js';
import { run } from '../../testkit/process.js';
import { needs } from '../../testkit/needs.js';
import { startServer } from '../../testkit/server.js';

const IMAGE_BYTES = 32 << 20;

/** Random data at the start and the end, a hole in between. */
function makeSparseSource(filePath: string, seed: number): void {
  const fd = fs.openSync(filePath, 'w');
  try {
    fs.ftruncateSync(fd, IMAGE_BYTES);
    const head = Buffer.alloc(5 << 20);
    fillRandom(head, seed);
    fs.writeSync(fd, head, 0, head.length, 0);
    const tail = Buffer.alloc(3 << 20);
    fillRandom(tail, seed + 1);
    fs.writeSync(fd, tail, 0, tail.length, IMAGE_BYTES - tail.length);
    // A lone unaligned run in the hole.
    fs.writeSync(fd, Buffer.alloc(777, 0xee), 0, 777, (17 << 20) + 123);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * nbdcopy the sparse source into the image `serve` serves (it returns the NBD URI) and back out
 * with `connections` connections, comparing the bytes after each copy.
 */
async function roundTrip(t: TestContext, connections: number, seed: number, serve: (cleanup: CleanupStack, served: string) => Promise<string>): Promise<void> {
  if (!needs(t, { tools: ['nbdcopy'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup);
  const source = path.join(dir, 'source.img');
  const served = path.join(dir, 'served.img');
  const back = path.join(dir, 'back.img');
  makeSparseSource(source, seed);
  // The served image starts full of other data, so a copy that writes nothing fails.
  makeImage(served, IMAGE_BYTES, 'blocks');
  const sourceDigest = await sha256File(source);
  assert.notEqual(await sha256File(served), sourceDigest);
  const uri = await serve(cleanup, served);

  await run('nbdcopy', ['--connections', String(connections), '--flush', source, uri]);
  assert.equal(await sha256File(served), sourceDigest, 'the served image equals the source after nbdcopy into NBD');

  await run('nbdcopy', ['--connections', String(connections), uri, back]);
  assert.equal(fs.statSync(back).size, IMAGE_BYTES);
  assert.equal(await sha256File(back), sourceDigest, 'the file copied out of NBD equals the source');

  // The server is still healthy after both copies.
  const info = await run('nbdinfo', ['--size', uri]);
  assert.equal(info.stdout.trim(), String(IMAGE_BYTES));
}

for (const connections of [1, 4]) {
  test(`nbdcopy file -> NBD -> file with ${connections} connection(s) keeps every byte`, { timeout: 120_000 }, (t) =>
    roundTrip(t, connections, 100 + connections, async (cleanup, served) => (await startServer(cleanup, { images: [served] })).uri(served)));
}

// The bench's floor server (bench/nbd-floor.ts) is only a floor if it serves what it is sent.
const FLOOR_SHAPES: Array<[string, NbdFloorShape]> = [
  ['one process', {}], ['two processes', { processes: 2 }], ['two threads', { threads: 2 }], ['two threads, thread-pool I/O', { threads: 2, async: true }],
];
for (const [i, [how, shape]] of FLOOR_SHAPES.entries()) {
  test(`nbdcopy through the bench's nbd-floor from ${how}, 4 connections, keeps every byte`, { timeout: 60_000 }, (t) =>
    roundTrip(t, 4, 111 + i, async (cleanup, served) => {
      const server = await nbdFloor(shape).start({ imagePath: served });
      cleanup.after(() => server.stop());
      return server.uri;
    }));
}

test('the copy-before-write floor keeps the original of every chunk once, checksummed, before it writes', { timeout: 60_000 }, async (t) => {
  if (!needs(t, { tools: ['nbdcopy'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup);
  const source = path.join(dir, 'source.img');
  const served = path.join(dir, 'served.img');
  const store = path.join(dir, 'store');
  makeImage(source, IMAGE_BYTES, 'random', 131);
  makeImage(served, IMAGE_BYTES, 'random', 132);
  const original = fs.readFileSync(served);
  const server = await nbdFloor({ cow: true, cowStore: store }).start({ imagePath: served });
  cleanup.after(() => server.stop());

  // Twice: the second pass rewrites chunks already kept, which keeps nothing more.
  for (let pass = 0; pass < 2; pass++) await run('nbdcopy', ['--connections', '4', source, server.uri]);
  assert.equal(await sha256File(served), await sha256File(source));
  const bytes = fs.readFileSync(store);
  const chunkBytes = BENCH_CHUNK_BYTES;
  const headerBytes = 32;
  assert.equal(bytes.length, (IMAGE_BYTES / chunkBytes) * (headerBytes + chunkBytes), 'one record per chunk of the image');
  const seen = new Set<number>();
  for (let at = 0; at < bytes.length; at += headerBytes + chunkBytes) {
    const chunk = bytes.readUInt32LE(at);
    const payload = bytes.subarray(at + headerBytes, at + headerBytes + chunkBytes);
    assert.equal(bytes.readUInt32LE(at + 4), chunkBytes);
    assert.equal(bytes.readUInt32LE(at + 8), crc32(payload), `the checksum of chunk ${chunk}`);
    assert.ok(payload.equals(original.subarray(chunk * chunkBytes, (chunk + 1) * chunkBytes)), `chunk ${chunk} holds its original`);
    assert.ok(!seen.has(chunk), `chunk ${chunk} kept once`);
    seen.add(chunk);
  }
});

test('nbdcopy between two exports of one server, four connections each', { timeout: 120_000 }, async (t) => {
  if (!needs(t, { tools: ['nbdcopy'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup);
  const from = path.join(dir, 'from.img');
  const to = path.join(dir, 'to.img');
  makeImage(from, IMAGE_BYTES, 'random', 7);
  makeImage(to, IMAGE_BYTES, 'blocks');
  const server = await startServer(cleanup, { images: [from, to] });
  await run('nbdcopy', ['--connections', '4', '--flush', server.uri(from), server.uri(to)]);
  assert.equal(await sha256File(to), await sha256File(from));
});
