/**
 * Originals kept by reflink: on a real XFS (reflink=1, made in a loop-mounted file) with the
 * image and the store on it, large first writes are cloned into the store (the store's payload
 * sits on the image's former physical blocks), sealed, and restored exactly, also after a
 * SIGKILL; on ext4, and across two filesystems, the refused clone falls back to copying with
 * no error. The format part (aligned payloads, seals) runs on any filesystem.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import zlib from 'node:zlib';
import { FileDevice } from '../../src/device/file-device.js';
import { libcUnavailableReason, loadLibc } from '../../src/host/libc.js';
import { DATA_FILE, parseManifest } from '../../src/snapshot/format.js';
import { CowDevice, DiffStorage, SnapshotLayer, listSessions, recoverSession, restore, type SessionSummary } from '../../src/snapshot/index.js';
import { StoreWriter } from '../../src/snapshot/store-writer.js';
import { scanData, type ScanResult } from '../../src/snapshot/store-scan.js';
import { CleanupStack } from '../../testkit/cleanup.js';
import { ReadCountingDevice } from '../helpers/devices.js';
import { makeImage, makeTempDir, sha256File } from '../../testkit/files.js';
import { needs } from '../../testkit/needs.js';
import { run } from '../../testkit/process.js';
import { mountScratchFs, scratchFsNeeds, type ScratchFsKind } from '../../testkit/scratch-fs.js';
import { isError, killWhileWriting, tempDir } from './helpers.js';

const CS = 16 * 1024;
const MIB = 1 << 20;
const TIMEOUT = { timeout: 60_000 };
const WRITER = fileURLToPath(new URL('./fixtures/crash-writer.js', import.meta.url));

// ---- format, on any filesystem -------------------------------------------------------------

test('cloned records: payload on a block boundary, no checksum until sealed, the seal checked by a scan', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, DATA_FILE);
  const fd = fs.openSync(file, 'w+');
  t.after(() => fs.closeSync(fd));
  const failures: string[] = [];
  const w = new StoreWriter(fd, 0, { strict: false, onFailure: (r) => failures.push(r) });
  const copied = randomBytes(CS);
  const cloned = randomBytes(4 * CS);
  // A fill that returns the bytes is the path of a refused clone: the writer writes them.
  const [p1, p2] = await Promise.all([w.append(1, copied), w.appendCloned(4, cloned.length, 4096, async () => cloned)]);
  assert.equal(p1, 0);
  assert.equal(p2! % 4096, 0, 'the cloned payload starts on a block boundary');
  assert.ok(p2! >= 64 + CS + 64);
  const options = { chunkSize: CS, deviceSize: 64 * CS, allowTornTail: false, where: 'data' };

  await assert.rejects(scanData(fd, options), isError('ECORRUPT', /cloned record at byte \d+ has no seal/));
  const tolerant = await scanData(fd, { ...options, allowTornTail: true });
  assert.deepEqual(tolerant.unsealed.map((u) => u.crc), [zlib.crc32(cloned)]);
  assert.equal(tolerant.index.get(5), p2! + CS);

  await w.seal();
  await w.sync();
  assert.deepEqual(failures, []);
  assert.equal(w.unsealedRecords, 0);
  const scan = await scanData(fd, options);
  assert.deepEqual(scan.records.map((r) => [r.firstChunk, r.cloned]), [[1, false], [4, true]]);
  assert.deepEqual(scan.unsealed, []);
  assert.equal(scan.validBytes, fs.statSync(file).size);
  const back = Buffer.alloc(CS);
  fs.readSync(fd, back, 0, CS, scan.index.get(7)!);
  assert.deepEqual(back, cloned.subarray(3 * CS));

  // A flipped byte in the cloned payload contradicts its seal: corrupt, not a torn tail.
  const at = p2! + 100;
  const byte = Buffer.alloc(1);
  fs.readSync(fd, byte, 0, 1, at);
  fs.writeSync(fd, Buffer.from([byte[0]! ^ 0x10]), 0, 1, at);
  await assert.rejects(scanData(fd, options), isError('ECORRUPT', /cloned record payload checksum mismatch/));
  await assert.rejects(scanData(fd, { ...options, allowTornTail: true }), isError('ECORRUPT', /cloned record payload checksum mismatch/));
});

test('manifests of format version 1 are still read; unknown versions are refused', () => {
  const manifest = {
    format: 'bdsnap-session', version: 1, devicePath: '/images/a.img', deviceSize: 4096, deviceIdentity: {}, chunkSize: 4096, durability: 'process',
    mountTime: '2026-01-01T00:00:00.000Z', endTime: null, state: 'interrupted', preservedChunks: 0, preservedBytes: 0, storeBytes: 0, digestedChunks: null, failedReason: null,
  };
  assert.equal(parseManifest(JSON.stringify(manifest), 'v1').version, 1);
  assert.equal(parseManifest(JSON.stringify({ ...manifest, version: 2 }), 'v2').version, 2);
  assert.throws(() => parseManifest(JSON.stringify({ ...manifest, version: 3 }), 'v3'), isError('ECORRUPT', /version/));
});

// ---- real filesystems ----------------------------------------------------------------------

/** Physical byte address of each logical byte range of `file` (xfs_io fiemap, 512-byte units). */
async function physicalMap(file: string): Promise<Array<{ logical: number; physical: number; length: number }>> {
  const out = (await run('xfs_io', ['-r', '-c', 'fiemap', file])).stdout;
  const extents = [];
  for (const m of out.matchAll(/^\s*\d+: \[(\d+)\.\.(\d+)\]: (\d+)\.\.(\d+)\s*$/gm)) {
    extents.push({ logical: Number(m[1]) * 512, physical: Number(m[3]) * 512, length: (Number(m[2]) - Number(m[1]) + 1) * 512 });
  }
  return extents;
}

function physicalAt(map: Awaited<ReturnType<typeof physicalMap>>, logical: number): number | undefined {
  const e = map.find((x) => logical >= x.logical && logical < x.logical + x.length);
  return e === undefined ? undefined : e.physical + (logical - e.logical);
}

async function scanStore(sessionDir: string, chunkSize: number, deviceSize: number): Promise<ScanResult> {
  const fd = fs.openSync(path.join(sessionDir, DATA_FILE), 'r');
  try {
    return await scanData(fd, { chunkSize, deviceSize, allowTornTail: false, where: DATA_FILE });
  } finally {
    fs.closeSync(fd);
  }
}

interface SessionRun {
  image: string;
  before: string;
  cow: CowDevice;
  sessionDir: string;
}

/**
 * An image of `imageBytes` random bytes at `imageDir`, a session with its store under
 * `storeRoot`: 1 MiB sequential first writes over [0, largeBytes), then 16 KiB first writes
 * (below the clone threshold) further on, past what the sequential writes cloned ahead. The session is closed, the device too.
 * `beforeSession` sees the image once it is on disk.
 */
async function largeAndSmallFirstWrites(
  imageDir: string, storeRoot: string, imageBytes: number, largeBytes: number, beforeSession?: (image: string) => Promise<void>,
): Promise<SessionRun> {
  const image = makeImage(path.join(imageDir, 'disk.img'), imageBytes, 'random', 12);
  const fd = fs.openSync(image, 'r+');
  fs.fdatasyncSync(fd);
  fs.closeSync(fd);
  await beforeSession?.(image);
  const before = await sha256File(image);
  const dev = await FileDevice.open(image);
  try {
    const cow = CowDevice.create(dev, { devicePath: image, snapshotRoot: storeRoot, chunkSize: CS, deviceIdentity: { ...dev.identity } });
    for (let off = 0; off < largeBytes; off += MIB) await cow.write(randomBytes(MIB), off);
    // Past what the sequential writes may have cloned ahead (32 MiB).
    await Promise.all([0, 3, 8].map((i) => cow.write(randomBytes(CS), largeBytes + 24 * MIB + i * CS)));
    const summary = await cow.close();
    assert.equal(summary?.state, 'complete');
    return { image, before, cow, sessionDir: summary.sessionDir };
  } finally {
    await dev.close();
  }
}

/** A scratch filesystem of `kind`; what the test opens on it goes on `cleanup`, to be undone before the unmount. */
async function scratch(t: Parameters<typeof needs>[0] & { after(fn: () => unknown): void }, kind: ScratchFsKind): Promise<{ dir: string; mnt: string; cleanup: CleanupStack } | undefined> {
  if (!needs(t, { ...scratchFsNeeds(kind), tools: [...(scratchFsNeeds(kind).tools ?? []), 'xfs_io'] })) return undefined;
  // The directory at the bottom of the stack: removed only after the unmount.
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup, 'bdsnap-reflink-');
  return { dir, mnt: await mountScratchFs(cleanup, dir, kind, 1 << 30), cleanup };
}

test('XFS, image and store on it: 1 MiB first writes are cloned onto the image\'s old blocks; restore gives back the exact image', TIMEOUT, async (t) => {
  const fsys = await scratch(t, 'xfs');
  if (fsys === undefined) return;
  const largeBytes = 32 * MIB;
  let mapBefore: Awaited<ReturnType<typeof physicalMap>> = [];
  const run1 = await largeAndSmallFirstWrites(fsys.mnt, path.join(fsys.mnt, 'snapshot'), 64 * MIB, largeBytes, async (image) => {
    mapBefore = await physicalMap(image);
  });
  const stats = run1.cow.stats();
  // The first write is cloned alone; the second continues it, so each clone from then on
  // reaches 32 MiB past its request: [0, 1), [1, 34) MiB.
  assert.equal(stats.clonedBytes, largeBytes + 2 * MIB, 'every run was cloned, the sequential ones 32 MiB ahead');
  assert.equal(stats.clonedRuns, 2, 'one clone for 33 requests, not one per request');
  assert.equal(stats.preservedBytes, stats.clonedBytes + 3 * CS, 'the 16 KiB first writes were copied');

  const scan = await scanStore(run1.sessionDir, CS, 64 * MIB);
  const clonedRecords = scan.records.filter((r) => r.cloned);
  assert.deepEqual(clonedRecords.map((r) => [r.firstChunk * CS / MIB, r.payloadBytes / MIB]), [[0, 1], [1, 33]]);
  assert.equal(scan.records.length - clonedRecords.length, 3);
  const storeMap = await physicalMap(path.join(run1.sessionDir, DATA_FILE));
  for (const r of clonedRecords) {
    assert.equal(r.payloadPosition % 4096, 0);
    for (let k = 0; k < r.payloadBytes; k += 64 * 1024) {
      const was = physicalAt(mapBefore, r.firstChunk * CS + k);
      assert.ok(was !== undefined, `the image had a block at ${r.firstChunk * CS + k}`);
      assert.equal(physicalAt(storeMap, r.payloadPosition + k), was, `the store keeps the image's old block of byte ${r.firstChunk * CS + k}`);
    }
  }
  assert.notEqual(await sha256File(run1.image), run1.before);
  const summary = await restore(run1.sessionDir);
  assert.equal(summary.digestCheck, 'verified');
  assert.equal(await sha256File(run1.image), run1.before, 'restore gives back the exact image');
});

test('XFS: only sequential first writes clone ahead, never past the device nor close to the size limit', TIMEOUT, async (t) => {
  const fsys = await scratch(t, 'xfs');
  if (fsys === undefined) return;
  const image = makeImage(path.join(fsys.mnt, 'disk.img'), 24 * MIB, 'random', 15);
  const before = await sha256File(image);
  const session = async (sizeLimitBytes: number | undefined, offsetsMiB: number[]): Promise<ReturnType<CowDevice['stats']>> => {
    const dev = await FileDevice.open(image);
    let stats: ReturnType<CowDevice['stats']>;
    let summary: SessionSummary | undefined;
    try {
      const cow = CowDevice.create(dev, { devicePath: image, snapshotRoot: path.join(fsys.mnt, 'snapshot'), chunkSize: CS, deviceIdentity: { ...dev.identity }, ...(sizeLimitBytes !== undefined ? { sizeLimitBytes } : {}) });
      for (const off of offsetsMiB) await cow.write(randomBytes(MIB), off * MIB);
      stats = cow.stats();
      summary = await cow.close();
    } finally {
      await dev.close();
    }
    assert.equal(summary?.state, 'complete');
    await restore(summary.sessionDir);
    assert.equal(await sha256File(image), before, 'restore gives back the exact image');
    return stats;
  };
  // Out of order: every run is its request.
  const scattered = await session(undefined, [0, 5, 2, 9]);
  assert.equal(scattered.clonedRuns, 4);
  assert.equal(scattered.clonedBytes, 4 * MIB);
  // Sequential up to the end: the ahead stops at the last chunk of the device.
  const sequential = await session(undefined, [16, 17, 18, 19, 20, 21, 22, 23]);
  assert.deepEqual([sequential.clonedRuns, sequential.clonedBytes], [2, 8 * MIB]);
  // A size limit too close: no clone ahead, so a guess never fails the session.
  const limited = await session(32 * MIB, [0, 1, 2, 3]);
  assert.deepEqual([limited.clonedRuns, limited.clonedBytes, limited.failedReason], [4, 4 * MIB, undefined]);
});

test('XFS: many clones in flight at once, with the garbage collector busy, each clone exactly its own range; synchronous clones too', TIMEOUT, async (t) => {
  const fsys = await scratch(t, 'xfs');
  if (fsys === undefined) return;
  const libc = loadLibc();
  assert.ok(libc, `the libc binding loads here: ${libcUnavailableReason() ?? ''}`);
  const source = makeImage(path.join(fsys.mnt, 'disk.img'), 32 * MIB, 'random', 13);
  const bytes = fs.readFileSync(source);
  const src = fs.openSync(source, 'r');
  const dst = fs.openSync(path.join(fsys.mnt, 'clones.bin'), 'w+');
  fsys.cleanup.after(() => {
    fs.closeSync(src);
    fs.closeSync(dst);
  });
  const pieceBytes = 64 * 1024;
  // Fewer than koffi's 256 asynchronous calls at once.
  const pieces = Array.from({ length: 200 }, (_, i) => ({ from: ((i * 37) % 512) * pieceBytes, to: i * (pieceBytes + 4096) }));
  let garbage: unknown[] = [];
  const churn = setInterval(() => {
    garbage = Array.from({ length: 20_000 }, (_, i) => ({ i, b: Buffer.alloc(64) }));
  }, 1);
  try {
    const results = await Promise.all(pieces.map((p) => libc.cloneRange(src, p.from, dst, p.to, pieceBytes)));
    assert.deepEqual(new Set(results), new Set(['cloned']));
  } finally {
    clearInterval(churn);
  }
  void garbage;
  // The synchronous call clones as exactly, past the asynchronous ones.
  const late = pieces.map((p, i) => ({ from: p.from, to: (pieces.length + i) * (pieceBytes + 4096) }));
  for (const p of late.slice(0, 20)) assert.equal(libc.cloneRangeSync(src, p.from, dst, p.to, pieceBytes), 'cloned');
  const back = Buffer.alloc(pieceBytes);
  for (const p of [...pieces, ...late.slice(0, 20)]) {
    fs.readSync(dst, back, 0, pieceBytes, p.to);
    assert.ok(back.equals(bytes.subarray(p.from, p.from + pieceBytes)), `clone of ${p.from} at ${p.to}`);
  }
  // Unaligned: not a failure, an answer.
  assert.equal(libc.cloneRangeSync(src, 512, dst, 0, pieceBytes), 'unsupported');
});

for (const durability of ['process', 'strict'] as const) {
  test(`XFS, SIGKILL while writing with every run cloned (${durability}): recover seals the clones, restore gives the pre-session image`, TIMEOUT, async (t) => {
    const fsys = await scratch(t, 'xfs');
    if (fsys === undefined) return;
    const image = makeImage(path.join(fsys.mnt, 'disk.img'), 16 * MIB, 'random', 14);
    const root = path.join(fsys.mnt, 'snapshot');
    const before = await sha256File(image);
    const out = await killWhileWriting(WRITER, [image, root, String(64 * 1024), durability, '4096'], 400);
    const sessionDir = out.split('\n')[0]!.replace(/^ready /, '');
    assert.notEqual(await sha256File(image), before, 'the writer changed the image');
    assert.equal((await listSessions(root))[0]?.state, 'active');
    const info = await recoverSession(sessionDir);
    assert.equal(info.state, 'interrupted');
    const scan = await scanStore(sessionDir, 64 * 1024, 16 * MIB);
    assert.ok(scan.records.filter((r) => r.cloned).length > 1, 'the writer cloned originals (a refused clone leaves one such record at most)');
    assert.equal(scan.fileBytes, info.storeBytes);
    await restore(sessionDir);
    assert.equal(await sha256File(image), before);
  });
}

test('ext4: the clone is refused, the session copies with no error and restores exactly', TIMEOUT, async (t) => {
  const fsys = await scratch(t, 'ext4');
  if (fsys === undefined) return;
  const run1 = await largeAndSmallFirstWrites(fsys.mnt, path.join(fsys.mnt, 'snapshot'), 64 * MIB, 16 * MIB);
  const stats = run1.cow.stats();
  assert.equal(stats.clonedBytes, 0);
  assert.equal(stats.preservedBytes, 16 * MIB + 3 * CS);
  const scan = await scanStore(run1.sessionDir, CS, 64 * MIB);
  // The 1 MiB runs were copied with their checksum left to a seal (process durability): the
  // layout of a cloned record, payload right after the header (the first one, the refused
  // clone, aligned); the 16 KiB ones carry their checksum.
  const large = scan.records.filter((r) => r.payloadBytes === MIB);
  assert.equal(large.length, 16);
  assert.ok(large.every((r) => r.cloned), 'large copies are sealed later');
  assert.ok(large.slice(1).every((r) => r.payloadPosition === r.position + 64), 'unsealed copies are not padded');
  assert.deepEqual(scan.records.filter((r) => r.payloadBytes === CS).map((r) => r.cloned), [false, false, false]);
  assert.deepEqual(scan.unsealed, [], 'every one was sealed at close');
  await restore(run1.sessionDir);
  assert.equal(await sha256File(run1.image), run1.before);
});

test('image and store on two filesystems: the clone is refused (EXDEV), the session copies and restores exactly', TIMEOUT, async (t) => {
  const fsys = await scratch(t, 'xfs');
  if (fsys === undefined) return;
  const run1 = await largeAndSmallFirstWrites(fsys.mnt, path.join(fsys.dir, 'snapshot'), 48 * MIB, 8 * MIB);
  assert.equal(run1.cow.stats().clonedBytes, 0);
  await restore(run1.sessionDir);
  assert.equal(await sha256File(run1.image), run1.before);
});

test('XFS, a session beside a snapshot: the session clones its originals, the snapshot gets the one read of each; both exact', TIMEOUT, async (t) => {
  const fsys = await scratch(t, 'xfs');
  if (fsys === undefined) return;
  const image = makeImage(path.join(fsys.mnt, 'disk.img'), 16 * MIB, 'random', 13);
  const fd = fs.openSync(image, 'r+');
  fs.fdatasyncSync(fd);
  fs.closeSync(fd);
  const first = fs.readFileSync(image);
  const storeDir = path.join(fsys.mnt, 'diff');
  fs.mkdirSync(storeDir, { mode: 0o700 });
  const dev = await FileDevice.open(image);
  fsys.cleanup.after(() => dev.close());
  const counting = new ReadCountingDevice(dev, { clones: true });
  const layer = new SnapshotLayer(counting, { chunkSize: CS });
  const storage = await DiffStorage.create({ id: 'snap', dirs: [storeDir], chunkSize: CS });
  fsys.cleanup.after(() => storage.close());
  await layer.hold();
  const snap = layer.addPoint(storage, 0);
  layer.release();
  const cow = CowDevice.create(layer, { devicePath: image, snapshotRoot: path.join(fsys.mnt, 'snapshot'), chunkSize: CS, deviceIdentity: { ...dev.identity } });
  for (let off = 0; off < 8 * MIB; off += 4 * MIB) await Promise.all([0, 1, 2, 3].map((i) => cow.write(randomBytes(MIB), off + i * MIB)));
  assert.equal(cow.stats().clonedBytes, 8 * MIB, 'every run of the session was cloned');
  const reads = counting.readsPerUnit(CS, 16 * MIB);
  assert.deepEqual([...new Set(reads.slice(0, 8 * MIB / CS))], [1], 'each original read once, for the snapshot');
  const seen = Buffer.alloc(16 * MIB);
  await snap.read(seen, 0);
  assert.ok(seen.equals(first), 'the snapshot shows the image at its point');
  await cow.view().read(seen, 0);
  assert.ok(seen.equals(first), 'the session view shows the image at its start');
  const summary = await cow.close();
  await layer.removePoint(snap);
  await layer.close();
  await dev.close();
  await restore(summary!.sessionDir);
  assert.ok(fs.readFileSync(image).equals(first), 'restore gives back the exact image');
});
