/**
 * Faults: a create killed with SIGKILL, a full repository disk, damaged and missing pieces and
 * manifests, and prune racing a create. The repository must stay valid throughout, and what
 * is damaged must be named.
 */

import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { LocalDirStore, Repository, backupDevices, createBackup, restoreBackup, verifyRepository, type BackupSource } from '../../src/backup/index.js';
import { RepoLock, listLocks } from '../../src/repository/lock.js';
import { BdsnapError } from '../../src/errors.js';
import { makeImage, makeTempDir, sha256File } from '../../testkit/files.js';
import { requireRoot, run } from '../../testkit/process.js';
import { flipByteAt, initRepo, pieceBytes } from './helpers.js';
import { ServeSnapshotProvider } from '../../testkit/snapshot-provider.js';

const MiB = 1024 * 1024;
const CHILD = fileURLToPath(new URL('./fixtures/create-child.js', import.meta.url));

async function referencedAndStored(repo: Repository): Promise<{ referenced: Set<string>; stored: Set<string> }> {
  const referenced = new Set<string>();
  for (const r of await repo.backups()) for (const d of r.manifest!.devices) for (const s of d.pieces) if (typeof s === 'string') referenced.add(s);
  return { referenced, stored: new Set((await repo.storedPieces()).keys()) };
}

test('SIGKILL of a create in the middle: the repository stays valid, the backup is absent, prune cleans up', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-backup-kill-');
  const small = path.join(dir, 'small.img');
  makeImage(small, 4 * MiB, 'blocks');
  const image = path.join(dir, 'big.img');
  makeImage(image, 64 * MiB, 'random', 99);
  const repoDir = path.join(dir, 'repo');
  const repo = await initRepo(new LocalDirStore(repoDir), { pieceSizeBytes: 256 * 1024 });
  const earlier = await backupDevices(repo, new ServeSnapshotProvider(dir), [small]);

  const child = spawn(process.execPath, [CHILD, repoDir, dir, image, '3'], { env: { ...process.env, BDSNAP_BACKUP_CHILD: '1' }, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<NodeJS.Signals | null>((resolve) => child.on('exit', (_c, signal) => resolve(signal)));
  // Kill at a random point between 40% and 90% of the reading: past the first 16 MiB pack.
  const killAt = Math.floor((0.4 + Math.random() * 0.5) * 64 * MiB);
  let serverPids: number[] = [];
  try {
    const deadline = Date.now() + 60_000;
    for (;;) {
      const m = /server ([\d ]+)\n/.exec(out);
      if (m) serverPids = m[1]!.trim().split(' ').map(Number);
      const progress = [...out.matchAll(/progress (\d+)/g)].map((x) => Number(x[1]));
      if ((progress[progress.length - 1] ?? 0) >= killAt) break;
      if (child.exitCode !== null || Date.now() > deadline) throw new Error(`the child did not get far enough: ${out.slice(-300)} ${err}`);
      await new Promise((r) => setTimeout(r, 10));
    }
  } finally {
    child.kill('SIGKILL');
    for (const pid of serverPids) {
      try {
        process.kill(pid, 'SIGTERM');
      } catch {
        // already gone
      }
    }
  }
  assert.equal(await exited, 'SIGKILL');
  assert.doesNotMatch(out, /done/);

  assert.deepEqual(await repo.backupIds(), [earlier.id], 'the killed backup is absent');
  assert.equal((await verifyRepository(repo)).ok, true);
  // What the killed create wrote is either committed packs no index names, indexed pieces no
  // manifest names, or staged temp files never renamed into place.
  const before = await referencedAndStored(repo);
  const unnamed = before.stored.size - before.referenced.size;
  const temps = tempFiles(repoDir).length;
  const unindexed = await unindexedPacks(repo, repoDir);
  assert.ok(unnamed + unindexed.length + temps > 0, 'the killed create left pieces or temp files behind');
  const locks = await listLocks(repo.store);
  assert.deepEqual(locks.map((l) => l.state), ['dead'], 'its lock is left, and known dead');

  const pruned = await repo.prune();
  assert.equal(pruned.deletedPieces, unnamed);
  assert.equal(pruned.deletedPacks, unindexed.length);
  assert.equal(pruned.deletedIncomplete, temps);
  assert.equal(pruned.deletedLocks, 1);
  const after = await referencedAndStored(repo);
  assert.deepEqual([...after.stored].sort(), [...after.referenced].sort());
  assert.deepEqual(tempFiles(repoDir), []);
  assert.deepEqual(await unindexedPacks(repo, repoDir), []);
  const out1 = path.join(dir, 'small.out');
  await restoreBackup(repo, earlier.id, small, { output: out1 });
  assert.equal(await sha256File(out1), await sha256File(small));
  // And the repository takes a new backup of the big image.
  const again = await backupDevices(repo, new ServeSnapshotProvider(dir), [image]);
  assert.equal((await verifyRepository(repo, { id: again.id })).ok, true);
});

/** Pack files no index names (what a create killed before its index leaves). */
async function unindexedPacks(repo: Repository, repoDir: string): Promise<string[]> {
  const indexed = new Set([...(await repo.pieceIndex()).values()].map((at) => at.object));
  const packs = path.join(repoDir, 'packs');
  if (!fs.existsSync(packs)) return [];
  return fs.readdirSync(packs, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile() && !e.name.startsWith('.'))
    .map((e) => path.relative(repoDir, path.join(e.parentPath, e.name)))
    .filter((name) => !indexed.has(name));
}

/** Temp files of puts and staged objects, anywhere in the repository. */
function tempFiles(repoDir: string): string[] {
  return fs.readdirSync(repoDir, { recursive: true }).map(String).filter((n) => path.basename(n).startsWith('.'));
}

/** A store on a tmpfs of its own of `size` (mount's spelling, '6m'), unmounted and removed when `t` ends. */
async function smallDiskStore(t: TestContext, size: string): Promise<{ mnt: string; repoDir: string; store: LocalDirStore }> {
  requireRoot();
  // Its own temp dir, unmounted and removed in one step (after-hooks run in the order added).
  const mnt = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-backup-mnt-'));
  await run('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', mnt]);
  const repoDir = path.join(mnt, 'repo');
  const store = new LocalDirStore(repoDir);
  t.after(async () => {
    // The store holds the repository's directories open.
    store.close();
    await run('umount', [mnt]);
    fs.rmdirSync(mnt);
  });
  return { mnt, repoDir, store };
}

test('a full repository disk: a clear ENOSPC, the repository stays valid, prune frees the partial pieces', async (t) => {
  const { repoDir, store } = await smallDiskStore(t, '6m');
  const dir = makeTempDir(t, 'bdsnap-backup-full-');
  const repo = await initRepo(store, { pieceSizeBytes: 256 * 1024 });
  const small = path.join(dir, 'small.img');
  makeImage(small, 2 * MiB, 'blocks');
  const provider = new ServeSnapshotProvider(dir);
  const first = await backupDevices(repo, provider, [small]);
  const big = path.join(dir, 'big.img');
  makeImage(big, 16 * MiB, 'random', 5);
  await assert.rejects(backupDevices(repo, provider, [big]), (e: unknown) => {
    assert.ok(e instanceof BdsnapError);
    assert.equal(e.code, 'ENOSPC');
    assert.match(e.message, /repository .* is full/);
    return true;
  });
  assert.equal(provider.destroyed.length, 2, 'the snapshot was destroyed after the failure');
  assert.deepEqual(await repo.backupIds(), [first.id]);
  assert.equal((await verifyRepository(repo)).ok, true);
  assert.deepEqual(await listLocks(repo.store), [], 'the lock was released');
  assert.deepEqual(tempFiles(repoDir), [], 'the failed create removed its staged temp files');
  // Pieces of batches committed before the disk filled are named by no manifest: prune frees them.
  const before = await referencedAndStored(repo);
  const pruned = await repo.prune();
  assert.equal(pruned.deletedPieces, before.stored.size - before.referenced.size);
  const after = await referencedAndStored(repo);
  assert.deepEqual([...after.stored].sort(), [...after.referenced].sort());
  const out = path.join(dir, 'small.out');
  await restoreBackup(repo, first.id, small, { output: out });
  assert.equal(await sha256File(out), await sha256File(small));
});

test('prune on a full repository disk that must repack first: ENOSPC saying how much room it needs, nothing deleted, no pack of its own left; with that room it prunes', async (t) => {
  const { mnt, repoDir, store } = await smallDiskStore(t, '12m');
  const dir = makeTempDir(t, 'bdsnap-prune-full-');
  const repo = await initRepo(store, { pieceSizeBytes: 64 * 1024, packSizeBytes: MiB, codec: 'lz4' });
  const source = (data: Buffer): BackupSource => ({ device: '/dev/a', sizeBytes: data.length, changed: null, why: 'test', read: async (to, at) => void data.copy(to, 0, at, at + to.length) });
  // Random content, stored raw: b keeps one piece in four of a's, so once a is forgotten its
  // four packs are a quarter used (1 MiB to repack).
  const one = randomBytes(4 * MiB);
  const two = randomBytes(4 * MiB);
  for (let i = 0; i < 64; i += 4) one.copy(two, i * 64 * 1024, i * 64 * 1024, (i + 1) * 64 * 1024);
  const a = await createBackup(repo, [source(one)]);
  const b = await createBackup(repo, [source(two)]);
  await repo.forget([a.id]);
  // The disk full but for 256 KiB.
  const filler = path.join(mnt, 'filler');
  const fd = fs.openSync(filler, 'w');
  try {
    for (const chunk = Buffer.alloc(64 * 1024, 1); ;) fs.writeSync(fd, chunk);
  } catch (err) {
    assert.equal((err as NodeJS.ErrnoException).code, 'ENOSPC');
  } finally {
    fs.closeSync(fd);
  }
  fs.truncateSync(filler, fs.statSync(filler).size - 256 * 1024);
  const objects = (): string[] => fs.readdirSync(repoDir, { recursive: true, withFileTypes: true }).filter((e) => e.isFile()).map((e) => path.join(e.parentPath, e.name)).sort();
  const before = objects();
  await assert.rejects(repo.prune(), (e: unknown) => {
    assert.ok(e instanceof BdsnapError);
    assert.equal(e.code, 'ENOSPC');
    assert.match(e.message, /^cannot prune: the repository at .* is full: prune first writes the 1 MiB still used of 4 mostly unused packs into new ones, and only then deletes 4 packs \(3 MiB freed\); nothing was deleted; make room for 1 MiB there and run prune again$/);
    return true;
  });
  assert.deepEqual(objects(), before, 'nothing deleted, and no pack or temp file of the prune left');
  assert.equal((await verifyRepository(repo)).ok, true);
  fs.rmSync(filler);
  const s = await repo.prune();
  assert.deepEqual([s.repackedPacks, s.deletedPacks], [4, 4]);
  const out = path.join(dir, 'b.img');
  await restoreBackup(repo, b.id, '/dev/a', { output: out });
  assert.ok(fs.readFileSync(out).equals(two), 'b restores exactly');
});

test('a flipped byte, a missing piece, a deleted or garbled manifest: verify names them, restore refuses', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-backup-damage-');
  const image = path.join(dir, 'disk.img');
  makeImage(image, 8 * MiB, 'mixed', 7);
  const repoDir = path.join(dir, 'repo');
  const repo = await initRepo(new LocalDirStore(repoDir), { pieceSizeBytes: 256 * 1024 });
  const provider = new ServeSnapshotProvider(dir);
  const a = await backupDevices(repo, provider, [image]);
  provider.write(image, 0, Buffer.alloc(4096, 0x5a));
  const b = await backupDevices(repo, provider, [image]);
  const piecesOf = async (id: string): Promise<string[]> => (await repo.manifest(id)).devices[0]!.pieces.filter((s): s is string => typeof s === 'string');
  const [piecesA, piecesB] = [await piecesOf(a.id), await piecesOf(b.id)];
  const onlyB = piecesB.find((h) => !piecesA.includes(h))!;
  const shared = piecesA[5]!;
  assert.ok(onlyB !== undefined && piecesB.includes(shared));

  // Flip one byte in the middle of the shared piece; delete the piece only b has (b's pack holds nothing else).
  const sharedAt = await pieceBytes(repo, repoDir, shared);
  const sharedFile = sharedAt.file;
  flipByteAt(sharedFile, sharedAt.offsetBytes + Math.floor(sharedAt.lengthBytes / 2));
  const bytes = fs.readFileSync(sharedFile);
  const onlyBAt = await pieceBytes(repo, repoDir, onlyB);
  assert.equal(fs.statSync(onlyBAt.file).size, onlyBAt.lengthBytes);
  fs.rmSync(onlyBAt.file);

  const v = await verifyRepository(repo);
  assert.equal(v.ok, false);
  assert.deepEqual(v.backups.map((x) => [x.id, x.ok]), [[a.id, false], [b.id, false]]);
  const bad = new Map(v.badPieces.map((p) => [p.hash, p]));
  assert.equal(bad.get(shared)?.problem, 'damaged');
  assert.deepEqual(bad.get(shared)?.backups, [a.id, b.id]);
  assert.equal(bad.get(onlyB)?.problem, 'missing');
  assert.deepEqual(bad.get(onlyB)?.backups, [b.id]);

  // verify removed the damaged piece: nothing can use it, and listed it would be taken as stored.
  assert.match(bad.get(shared)!.detail, /removed, so the next backup stores it again/);
  assert.equal((await repo.storedPieceNames()).has(shared), false);
  const outB = path.join(dir, 'b.out');
  // restore names them as verify did: the flipped one damaged, the one whose pack is gone missing.
  await assert.rejects(restoreBackup(repo, b.id, image, { output: outB }), new RegExp(`cannot restore backup ${b.id}: 1 of its pieces is damaged \\(${shared}; in pack ${path.relative(repoDir, sharedFile)}; removed from the index by an earlier verify\\) and 1 is missing \\(${onlyB}; pack ${path.relative(repoDir, onlyBAt.file)} is gone; removed from the index by an earlier verify\\); nothing was written`));
  assert.equal(fs.existsSync(outB), false, 'nothing was written');
  await assert.rejects(restoreBackup(repo, a.id, image, { output: path.join(dir, 'a.out') }), new RegExp(`1 of its pieces is damaged \\(${shared}; in pack `));
  // The next backup reads what is no longer stored and stores it again: a and b are whole again.
  const c = await backupDevices(repo, provider, [image]);
  assert.equal((await verifyRepository(repo, { id: c.id })).ok, true);
  assert.equal((await verifyRepository(repo, { id: a.id })).ok, true, 'a is mended by the piece c stored again');
  await restoreBackup(repo, b.id, image, { output: outB });
  assert.equal(await sha256File(outB), await sha256File(image), 'b restores to the device (nothing changed since b)');
  fs.rmSync(outB);
  // Back to the damaged repository of the start, for what follows.
  await repo.forget([c.id]);
  fs.writeFileSync(sharedFile, bytes);

  // A deleted manifest: that backup is gone, clearly; a garbled one is named.
  fs.rmSync(path.join(repoDir, 'backups', `${a.id}.json`));
  await assert.rejects(verifyRepository(repo, { id: a.id }), /there is no backup/);
  await assert.rejects(restoreBackup(repo, a.id, image, { output: path.join(dir, 'a2.out') }), /there is no backup/);
  fs.writeFileSync(path.join(repoDir, 'backups', `${b.id}.json`), '{"format": "bdsnap-backup", "tru');
  const v2 = await verifyRepository(repo);
  assert.deepEqual(v2.backups.map((x) => [x.id, x.ok]), [[b.id, false]]);
  assert.match(v2.backups[0]!.problem!, /manifest .* is damaged/);
  await assert.rejects(repo.prune(), /cannot prune: the manifest of/);
});

test('prune and create exclude each other; concurrent lock takers never both win', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-backup-race-');
  const image = path.join(dir, 'disk.img');
  makeImage(image, 16 * MiB, 'random', 3);
  const repo = await initRepo(new LocalDirStore(path.join(dir, 'repo')), { pieceSizeBytes: 256 * 1024 });
  // An orphan piece (as a killed create leaves), which a running create will reuse.
  const seed = await backupDevices(repo, new ServeSnapshotProvider(dir), [image]);
  await repo.forget([seed.id]);
  let started!: () => void;
  const reading = new Promise<void>((resolve) => (started = resolve));
  const provider = new ServeSnapshotProvider(dir, { readDelayMs: 20 });
  const creating = backupDevices(repo, provider, [image], { concurrency: 2, progress: { start: () => started(), advance: () => undefined } });
  await reading;
  await assert.rejects(repo.prune(), (e: unknown) => e instanceof BdsnapError && e.code === 'EBUSY' && /a backup is being created/.test(e.message));
  const s = await creating;
  assert.equal(s.newPieces, 0, 'the create reused the orphaned pieces');
  assert.equal((await verifyRepository(repo)).ok, true, 'prune deleted none of them');
  assert.equal((await repo.prune()).deletedPieces, 0);

  const pruneLock = await RepoLock.acquire(repo.store, 'prune');
  await assert.rejects(createBackup(repo, [{ device: image, sizeBytes: 4096, read: async () => undefined, changed: null, why: 'x' }]), /a prune is running/);
  await pruneLock.release();
  for (let round = 0; round < 5; round++) {
    const results = await Promise.allSettled([RepoLock.acquire(repo.store, 'prune'), RepoLock.acquire(repo.store, 'prune'), RepoLock.acquire(repo.store, 'create')]);
    const won = results.filter((r) => r.status === 'fulfilled');
    const prunesWon = results.slice(0, 2).filter((r) => r.status === 'fulfilled').length;
    assert.ok(prunesWon === 0 || won.length === 1, `round ${round}: a prune won alongside another lock`);
    for (const r of won) await (r as PromiseFulfilledResult<RepoLock>).value.release();
  }
  assert.deepEqual(await listLocks(repo.store), []);
});

test('an incremental whose base backup is forgotten meanwhile becomes a full backup, and restores exactly', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-backup-base-');
  const image = path.join(dir, 'disk.img');
  makeImage(image, 4 * MiB, 'random', 9);
  const repo = await initRepo(new LocalDirStore(path.join(dir, 'repo')), { pieceSizeBytes: 256 * 1024 });
  const base = await backupDevices(repo, new ServeSnapshotProvider(dir), [image]);
  // The agent chose `base` for the changed ranges; then a forget removed it before the plan read it.
  await repo.forget([base.id]);
  const fd = fs.openSync(image, 'r');
  const source = {
    device: image, sizeBytes: 4 * MiB, changed: [{ offsetBytes: 0, lengthBytes: 4096 }], base: base.id, why: `changed blocks since ${base.id}`,
    read: async (target: Buffer, offsetBytes: number) => void fs.readSync(fd, target, 0, target.length, offsetBytes),
  };
  t.after(() => fs.closeSync(fd));
  const made = await createBackup(repo, [source]);
  assert.equal(made.devices[0]!.kind, 'full');
  assert.match(made.devices[0]!.why, /was forgotten meanwhile, so full/);
  const out = path.join(dir, 'out.img');
  await restoreBackup(repo, made.id, image, { output: out });
  assert.equal(await sha256File(out), await sha256File(image));
});

test('a snapshot that no longer holds its point when the pieces are stored: nothing is recorded, with the reason', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-backup-void-');
  const image = path.join(dir, 'disk.img');
  makeImage(image, 8 * MiB, 'random', 17);
  const repo = await initRepo(new LocalDirStore(path.join(dir, 'repo')), { pieceSizeBytes: 256 * 1024 });
  const serve = new ServeSnapshotProvider(dir);
  let checked = 0;
  const provider = {
    take: async (devices: string[]) => ({
      ...(await serve.take(devices)),
      check: async () => {
        checked++;
        throw new BdsnapError('EIO', 'snapshot s1 no longer holds its point (failed: written around bdsnap)');
      },
    }),
    destroy: (id: string) => serve.destroy(id),
  };
  await assert.rejects(backupDevices(repo, provider, [image]), /no longer holds its point/);
  assert.equal(checked, 1, 'checked once, after the reads');
  assert.deepEqual(await repo.backups(), [], 'no backup was recorded');
  const kept = await backupDevices(repo, serve, [image]);
  assert.equal((await repo.backups()).map((b) => b.id).join(), kept.id, 'a backup with a snapshot that holds is recorded');
});
