/**
 * The background copy of an instant restore reads the backup as a whole restore does: the
 * pieces of the slots it copies are fetched by runs of their packs (a request per few MiB),
 * each piece once, not a request per piece; and the target ends equal to the backup.
 */

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { pino } from 'pino';
import { makeTempDir } from '../../testkit/files.js';
import { CountingStore, initRepo, openRepo } from '../backup/helpers.js';
import { createBackup, type BackupSource } from '../../src/backup/index.js';
import { BackupDevice, openBackupDevices } from '../../src/repository/backup-device.js';
import { PACKS_PREFIX } from '../../src/repository/format.js';
import { LocalDirStore } from '../../src/repository/object-store.js';
import { EventLog } from '../../src/service/events.js';
import { InstantRestores, type SourceOpener } from '../../src/service/instant-restore.js';

const MiB = 1024 * 1024;
const PIECE = 256 * 1024;

/** Instant restores with their state and events under `dir`, restoring into `out`. */
async function instantRestores(dir: string, opener: SourceOpener): Promise<{ events: EventLog; restores: InstantRestores; out: string }> {
  const log = pino({ level: 'silent' });
  fs.mkdirSync(path.join(dir, 'events'));
  fs.mkdirSync(path.join(dir, 'state'), { mode: 0o700 });
  const events = await EventLog.open(path.join(dir, 'events'), log);
  const restores = new InstantRestores({ stateDir: path.join(dir, 'state'), events, log, openSource: opener });
  return { events, restores, out: path.join(dir, 'restored.img') };
}

test('the background copy of an instant restore fetches each pack\'s pieces in a few reads, each piece once, and ends exact', { timeout: 60_000 }, async (t) => {
  const dir = makeTempDir(t, 'bdsnap-instant-copy-');
  const repeated = randomBytes(PIECE);
  const image = Buffer.concat([randomBytes(40 * MiB), Buffer.alloc(2 * MiB), repeated, repeated, repeated, randomBytes(3 * PIECE + 4096)]);
  const store = new CountingStore(new LocalDirStore(path.join(dir, 'repo')));
  const repo = await initRepo(store);
  const source: BackupSource = { device: '/dev/mixed', sizeBytes: image.length, changed: null, why: 'test', read: async (to, offset) => void image.copy(to, 0, offset, offset + to.length) };
  const { id } = await createBackup(repo, [source]);
  const packs = (await store.list(PACKS_PREFIX)).length;

  let getsAtStart = 0;
  let distinct = 0;
  const opener: SourceOpener = async () => {
    const opened = await openBackupDevices(await openRepo(store), id);
    const found = opened.devices[0]!;
    getsAtStart = store.gets;
    distinct = new Set(found.slots.filter((h) => h !== null)).size;
    const restoreSource = { source: found.device, slots: found.slots, pieceBytes: found.pieceBytes, fetchPieces: opened.fetchPieces, close: () => opened.close() };
    return restoreSource;
  };
  const { events, restores, out } = await instantRestores(dir, opener);
  try {
    await restores.start({ repo: 'repo', backup: id, device: '/dev/mixed', target: out, output: true }, async () => undefined);
    const deadline = Date.now() + 30_000;
    while (restores.list().some((r) => r.state === 'running')) {
      assert.ok(Date.now() < deadline, 'the restore completes');
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    assert.deepEqual(restores.list().map((r) => r.error), [], 'the restore completed and retired');
    const gets = store.gets - getsAtStart;
    // A read per few MiB of a pack, and one more per pack at each boundary of the copy's 16 MiB
    // batches (the backup's workers pack pieces in the order they finish, so a pack's run can
    // hold pieces of two batches); one per piece would be about `distinct`.
    const batches = Math.ceil(image.length / (16 * MiB));
    assert.ok(gets <= Math.ceil(image.length / (4 * MiB)) + packs * batches, `${gets} reads of the store for ${distinct} distinct pieces in ${packs} packs`);
    assert.ok(gets < distinct / 4, `${gets} reads for ${distinct} distinct pieces: not a read per piece`);
    assert.ok(fs.readFileSync(out).equals(image), 'the target ends equal to the backup');
  } finally {
    await restores.closeAll();
    events.close();
  }
});

test('from a local repository the background copy has the piece workers place each piece into the target, never over a client\'s write, and retries a piece it cannot read', { timeout: 60_000 }, async (t) => {
  const dir = makeTempDir(t, 'bdsnap-instant-place-');
  const repeated = randomBytes(PIECE);
  const image = Buffer.concat([randomBytes(8 * MiB), Buffer.alloc(2 * MiB), repeated, repeated, repeated, randomBytes(3 * PIECE + 4096)]);
  const repoDir = path.join(dir, 'repo');
  const repo = await initRepo(new LocalDirStore(repoDir));
  const source: BackupSource = { device: '/dev/mixed', sizeBytes: image.length, changed: null, why: 'test', read: async (to, offset) => void image.copy(to, 0, offset, offset + to.length) };
  const { id } = await createBackup(repo, [source]);

  // The copy waits at its first piece until the client's write is in, and cannot read any
  // piece while the packs are away.
  let offered = false;
  let placed = 0;
  let letGo!: () => void;
  const clientWrote = new Promise<void>((resolve) => (letGo = resolve));
  const opener: SourceOpener = async () => {
    const opened = await openBackupDevices(await openRepo(new LocalDirStore(repoDir)), id);
    const found = opened.devices[0]!;
    const placePiece = opened.placePiece;
    offered = placePiece !== undefined;
    return {
      source: found.device, slots: found.slots, pieceBytes: found.pieceBytes, fetchPieces: opened.fetchPieces, close: () => opened.close(),
      ...(placePiece && {
        placePiece: async (piece: Parameters<typeof placePiece>[0]) => {
          await clientWrote;
          placed++;
          return placePiece(piece);
        },
      }),
    };
  };
  const { events, restores, out } = await instantRestores(dir, opener);
  const packsDir = path.join(repoDir, PACKS_PREFIX);
  const awayDir = path.join(dir, 'packs-away');
  try {
    await restores.start({ repo: 'repo', backup: id, device: '/dev/mixed', target: out, output: true }, async () => undefined);
    assert.ok(offered, 'a local repository offers to place pieces');
    const handle = (await restores.open(out))!;
    // Whole slots near the end, not done yet: the copy must leave them as the client wrote them.
    const written = randomBytes(2 * PIECE);
    const writeAt = 4 * MiB;
    await handle.device.write(written, writeAt);
    fs.renameSync(packsDir, awayDir);
    letGo();
    const deadline = Date.now() + 30_000;
    while (!restores.list()[0]!.error) {
      assert.ok(Date.now() < deadline, 'the copy reports the pieces it cannot read');
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    await assert.rejects(handle.device.read(Buffer.alloc(4096), 6 * MiB), (err: NodeJS.ErrnoException) => err.code === 'EIO', 'a read of what is not copied fails with EIO');
    fs.renameSync(awayDir, packsDir);
    while (restores.list()[0]!.state === 'running') {
      assert.ok(Date.now() < deadline, 'the copy resumes and completes once the pieces are back');
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    await handle.release();
    assert.ok(placed > 0, 'the pieces were placed by the workers');
    const expected = Buffer.from(image);
    written.copy(expected, writeAt);
    assert.ok(fs.readFileSync(out).equals(expected), 'the target ends equal to the backup with the client\'s write');
  } finally {
    if (fs.existsSync(awayDir)) fs.renameSync(awayDir, packsDir);
    await restores.closeAll();
    events.close();
  }
});

test('shutdown does not wait out the backoff of a copy that cannot read the backup', { timeout: 60_000 }, async (t) => {
  const dir = makeTempDir(t, 'bdsnap-instant-stop-');
  const image = randomBytes(4 * MiB);
  const repoDir = path.join(dir, 'repo');
  const repo = await initRepo(new LocalDirStore(repoDir));
  const source: BackupSource = { device: '/dev/stop', sizeBytes: image.length, changed: null, why: 'test', read: async (to, offset) => void image.copy(to, 0, offset, offset + to.length) };
  const { id } = await createBackup(repo, [source]);
  const opener: SourceOpener = async () => {
    const opened = await openBackupDevices(await openRepo(new LocalDirStore(repoDir)), id);
    const found = opened.devices[0]!;
    return { source: found.device, slots: found.slots, pieceBytes: found.pieceBytes, fetchPieces: opened.fetchPieces, close: () => opened.close() };
  };
  const { events, restores, out } = await instantRestores(dir, opener);
  const packsDir = path.join(repoDir, PACKS_PREFIX);
  const awayDir = path.join(dir, 'packs-away');
  fs.renameSync(packsDir, awayDir);
  let closed = false;
  try {
    await restores.start({ repo: 'repo', backup: id, device: '/dev/stop', target: out, output: true }, async () => undefined);
    // After a few failed rounds the copy sleeps seconds before the next one.
    await new Promise((resolve) => setTimeout(resolve, 4_800));
    assert.ok(restores.list()[0]!.error, 'the copy reports the pieces it cannot read');
    const began = Date.now();
    await restores.closeAll();
    closed = true;
    assert.ok(Date.now() - began < 1_000, `closeAll returned in ${Date.now() - began} ms, not once the backoff ran out`);
  } finally {
    fs.renameSync(awayDir, packsDir);
    if (!closed) await restores.closeAll();
    events.close();
  }
});

test('until its first client comes (1 s at most), the copy has one batch in flight, so that the first read is not queued behind three', { timeout: 60_000 }, async (t) => {
  const dir = makeTempDir(t, 'bdsnap-instant-first-');
  // Three batches of distinct pieces, each piece's bytes its index.
  const sizeBytes = 48 * MiB;
  const slots = Array.from({ length: sizeBytes / PIECE }, (_, i) => `piece-${i}`);
  const content = (hash: string, lengthBytes: number): Buffer => Buffer.alloc(lengthBytes, Number(hash.slice('piece-'.length)) % 251);
  let inFlight = 0;
  let most = 0;
  let startedMs = Infinity;
  const opener: SourceOpener = async () => ({
    source: new BackupDevice(sizeBytes, PIECE, slots, async (hash, lengthBytes) => content(hash, lengthBytes)),
    slots, pieceBytes: PIECE,
    fetchPieces: async (ids, options) => {
      inFlight++;
      // Within the wait for a first client, with a margin for a slow machine.
      if (Date.now() - startedMs < 800) most = Math.max(most, inFlight);
      // As a GET of a few MiB from S3 takes.
      await new Promise((resolve) => setTimeout(resolve, 50));
      for (const id of ids) options.onPiece?.(id, content(id, PIECE));
      inFlight--;
    },
    close: async () => undefined,
  });
  const { events, restores, out } = await instantRestores(dir, opener);
  try {
    startedMs = Date.now();
    await restores.start({ repo: 'repo', backup: 'b', device: '/dev/x', target: out, output: true }, async () => undefined);
    while (restores.list().some((r) => r.state === 'running')) await new Promise((resolve) => setTimeout(resolve, 10));
    assert.deepEqual(restores.list().map((r) => r.error), [], 'the restore completed and retired');
    assert.equal(most, 1, `${most} batches were fetched at once in the first 0.8 s, with no client yet`);
    const back = fs.readFileSync(out);
    for (const [i, h] of slots.entries()) assert.ok(back.subarray(i * PIECE, (i + 1) * PIECE).equals(content(h, PIECE)), `slot ${i}`);
  } finally {
    await restores.closeAll();
    events.close();
  }
});
