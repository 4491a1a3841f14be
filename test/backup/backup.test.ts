/**
 * Full and incremental backups of images served over NBD by a real `bdsnap serve`, restored
 * into files byte for byte; what an incremental reads and stores; deduplication; an ext4
 * image that e2fsck accepts after restore.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { LocalDirStore, backupDevices, type Repository, restoreBackup, verifyRepository } from '../../src/backup/index.js';
import { makeImage, makeTempDir, sha256File } from '../../testkit/files.js';
import { mountDevice } from '../../testkit/kernel.js';
import { requireRoot, requireTool, run } from '../../testkit/process.js';
import { startServer } from '../../testkit/server.js';
import { CODEC_BROTLI, CODEC_ZSTD, pieceCodec } from '../../src/repository/codec.js';
import { CountingStore, initRepo } from './helpers.js';
import { ServeSnapshotProvider } from '../../testkit/snapshot-provider.js';
import { dirBytes } from '../../testkit/files.js';
import { useOwnRestoreDir } from '../../testkit/restore-dir.js';

useOwnRestoreDir();

const MiB = 1024 * 1024;

async function setup(t: { after(fn: () => unknown): void }, sizeBytes: number, pieceSizeBytes?: number) {
  const dir = makeTempDir(t, 'bdsnap-backup-');
  const image = path.join(dir, 'disk.img');
  makeImage(image, sizeBytes, 'mixed', 7);
  const store = new CountingStore(new LocalDirStore(path.join(dir, 'repo')));
  const repo = await initRepo(store, { pieceSizeBytes });
  const provider = new ServeSnapshotProvider(dir);
  return { dir, image, store, repo, provider };
}

test('full, then incrementals: each restores to the image of its point, and reads and stores only what changed', async (t) => {
  const { dir, image, store, repo, provider } = await setup(t, 32 * MiB, 256 * 1024);
  const full = await backupDevices(repo, provider, [image]);
  assert.equal(full.devices[0]!.kind, 'full');
  assert.equal(full.devices[0]!.why, 'first backup of this device');
  const fullHash = await sha256File(image);
  // Zero quarter: never stored. Repeated quarter: one piece.
  assert.ok(full.devices[0]!.zeroPieces >= 32, `zero pieces ${full.devices[0]!.zeroPieces}`);
  assert.equal(provider.destroyed.length, 1);

  // Change a few blocks: two adjacent 4 KiB blocks in piece 3, one in piece 70 and one at the end.
  provider.write(image, 3 * 256 * 1024 + 8192, randomBytes(8192));
  provider.write(image, 70 * 256 * 1024, randomBytes(4096));
  provider.write(image, 32 * MiB - 4096, randomBytes(4096));
  provider.readBytes.clear();
  const inc1 = await backupDevices(repo, provider, [image]);
  const inc1Hash = await sha256File(image);
  assert.equal(inc1.devices[0]!.kind, 'incremental');
  assert.equal(inc1.devices[0]!.base, full.id);
  assert.match(inc1.devices[0]!.why, /changed blocks since/);
  assert.equal(provider.readBytes.get(image), 3 * 256 * 1024, 'read only the three touched pieces');
  assert.equal(inc1.newPieces, 3, 'stored only the three changed pieces');
  assert.equal((await repo.storedPieceNames()).size, full.newPieces + 3);

  // A zeroed range and a second round of changes.
  provider.write(image, 10 * MiB, Buffer.alloc(MiB));
  provider.write(image, 20 * MiB + 100, Buffer.from('hello, incremental'));
  const inc2 = await backupDevices(repo, provider, [image]);
  assert.equal(inc2.devices[0]!.base, inc1.id);
  const inc2Hash = await sha256File(image);

  for (const [id, want] of [[full.id, fullHash], [inc1.id, inc1Hash], [inc2.id, inc2Hash]] as const) {
    const out = path.join(dir, `restored-${id}.img`);
    const r = await restoreBackup(repo, id, image, { output: out });
    assert.equal(r.sizeBytes, 32 * MiB);
    assert.equal(await sha256File(out), want, `restore of ${id}`);
  }
  // --full reads everything again but stores nothing new.
  const putsBeforeFull = store.piecePuts();
  const again = await backupDevices(repo, provider, [image], { full: true });
  assert.equal(again.devices[0]!.why, '--full');
  assert.equal(store.piecePuts() - putsBeforeFull, 0);
  assert.equal(again.newPieces, 0);
  const v = await verifyRepository(repo);
  assert.equal(v.ok, true);
  assert.equal(v.backups.length, 4);
  assert.equal(provider.destroyed.length, 4, 'every snapshot destroyed');
});

test('dedup: a second backup of an unchanged image adds almost nothing; two devices share pieces', async (t) => {
  const { dir, image, repo, provider } = await setup(t, 16 * MiB);
  const twin = path.join(dir, 'twin.img');
  fs.copyFileSync(image, twin);
  const repoDir = path.join(dir, 'repo');
  const first = await backupDevices(repo, provider, [image]);
  const size1 = dirBytes(repoDir);
  const second = await backupDevices(repo, provider, [image], { full: true });
  const size2 = dirBytes(repoDir);
  assert.equal(second.newPieces, 0);
  assert.ok(size2 - size1 < 16 * 1024, `second backup added ${size2 - size1} bytes`);
  const both = await backupDevices(repo, provider, [twin]);
  assert.equal(both.newPieces, 0, 'an identical device stores no piece');
  assert.ok(first.newStoredBytes < 16 * MiB * 0.6, `mixed image stored in ${first.newStoredBytes} bytes`);
});

test('a change map that cannot tell, or a new generation, gives a full backup that says why', async (t) => {
  const { image, repo, provider } = await setup(t, 8 * MiB);
  await backupDevices(repo, provider, [image]);
  provider.generation = 'g2';
  const plans: string[] = [];
  const s = await backupDevices(repo, provider, [image], { onPlan: (p) => plans.push(...p.map((x) => x.why)) });
  assert.equal(s.devices[0]!.kind, 'full');
  assert.match(s.devices[0]!.why, /change map reset/);
  assert.deepEqual(plans, [s.devices[0]!.why]);
});

test('two devices in one backup, restored separately; the pure codec path reads what the native one wrote', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-backup-');
  const a = path.join(dir, 'a.img');
  const b = path.join(dir, 'b.img');
  makeImage(a, 8 * MiB, 'mixed', 1);
  makeImage(b, 4 * MiB + 4096, 'blocks');
  const repoDir = path.join(dir, 'repo');
  // Unencrypted, so that the codec of each stored piece shows.
  const repo = await initRepo(new LocalDirStore(repoDir), { pieceSizeBytes: 1 << 20, encryption: false });
  const provider = new ServeSnapshotProvider(dir);
  const s = await backupDevices(repo, provider, [a, b]);
  assert.equal(s.devices.length, 2);
  for (const dev of [a, b]) {
    const out = path.join(dir, `${path.basename(dev)}.out`);
    await restoreBackup(repo, s.id, dev, { output: out });
    assert.equal(await sha256File(out), await sha256File(dev));
  }
  // A restore in a process without libzstd or the native LZ4 package decodes the same pieces.
  assert.ok((await piecesByCodec(repo)).get(CODEC_ZSTD)! > 0, 'the repository holds zstd pieces');
  const out = path.join(dir, 'pure.out');
  const cli = path.join(import.meta.dirname, '../../src/cli/main.js');
  const pureEnv = { ...process.env, BDSNAP_NO_NATIVE_LZ4: '1', BDSNAP_NO_NATIVE_ZSTD: '1' };
  await run(process.execPath, [cli, 'backup', 'restore', '--repo', repoDir, s.id, a, '--output', out], { env: pureEnv });
  assert.equal(await sha256File(out), await sha256File(a));
  // Such a process writes brotli where the repository asks for zstd.
  const codec = path.join(import.meta.dirname, '../../src/repository/codec.js');
  const script = `const c = await import(${JSON.stringify(codec)}); const p = c.encodePiece(Buffer.from('text '.repeat(9999)), c.codecFor('zstd')); console.log(c.pieceCodec(p));`;
  const { stdout } = await run(process.execPath, ['--input-type=module', '-e', script], { env: pureEnv });
  assert.equal(stdout.trim(), String(CODEC_BROTLI));
});

test('ext4: full, changes, incremental; each restore passes e2fsck -n and matches the image', async (t) => {
  requireTool('mkfs.ext4');
  requireTool('debugfs');
  requireTool('e2fsck');
  const dir = makeTempDir(t, 'bdsnap-backup-ext4-');
  const image = path.join(dir, 'fs.img');
  makeImage(image, 64 * MiB, 'zero');
  await run('mkfs.ext4', ['-q', '-F', image]);
  const data = path.join(dir, 'data.bin');
  fs.writeFileSync(data, randomBytes(3 * MiB));
  await run('debugfs', ['-w', '-R', `write ${data} first.bin`, image]);
  const repo = await initRepo(new LocalDirStore(path.join(dir, 'repo')));
  const provider = new ServeSnapshotProvider(dir);
  const full = await backupDevices(repo, provider, [image]);
  const fullHash = await sha256File(image);
  // The test's change log cannot see debugfs's writes: record the whole image as changed
  // around what debugfs wrote by comparing with a copy.
  const before = fs.readFileSync(image);
  fs.writeFileSync(data, randomBytes(2 * MiB));
  await run('debugfs', ['-w', '-R', `write ${data} second.bin`, image]);
  await run('debugfs', ['-w', '-R', 'mkdir dir1', image]);
  const after = fs.readFileSync(image);
  for (let at = 0; at < after.length; at += 4096) {
    const end = at + 4096;
    if (!after.subarray(at, end).equals(before.subarray(at, end))) provider.write(image, at, after.subarray(at, end));
  }
  const inc = await backupDevices(repo, provider, [image]);
  assert.equal(inc.devices[0]!.kind, 'incremental');
  assert.ok(inc.readBytes < 16 * MiB, `incremental read ${inc.readBytes} bytes`);
  const incHash = await sha256File(image);
  for (const [id, want] of [[full.id, fullHash], [inc.id, incHash]] as const) {
    const out = path.join(dir, `${id}.img`);
    await restoreBackup(repo, id, image, { output: out });
    assert.equal(await sha256File(out), want);
    await run('e2fsck', ['-n', '-f', out]);
  }
  const listing = await run('debugfs', ['-R', 'ls -l /', path.join(dir, `${inc.id}.img`)]);
  assert.match(listing.stdout, /second\.bin/);
});

test('restore in place: an image file is put back; one in use by a server, or a mounted block device, is refused', async (t) => {
  requireRoot();
  const dir = makeTempDir(t, 'bdsnap-backup-inplace-');
  const image = path.join(dir, 'fs.img');
  makeImage(image, 16 * MiB, 'zero');
  await run('mkfs.ext4', ['-q', '-F', image]);
  const repo = await initRepo(new LocalDirStore(path.join(dir, 'repo')));
  const s = await backupDevices(repo, new ServeSnapshotProvider(dir), [image]);
  const want = await sha256File(image);
  fs.writeFileSync(image, randomBytes(MiB), { flag: 'r+' });
  const server = await startServer(t, { kind: 'bdsnap', images: [image] });
  await assert.rejects(restoreBackup(repo, s.id, image), (e: unknown) => (e as { code?: string }).code === 'EBUSY' && /is in use/.test((e as Error).message));
  await server.stop();
  await restoreBackup(repo, s.id, image);
  assert.equal(await sha256File(image), want);

  // The same backup onto a loop device: refused while mounted, restored once unmounted.
  const loop = (await run('losetup', ['--find', '--show', image])).stdout.trim();
  t.after(() => run('losetup', ['-d', loop], { allowFailure: true }));
  // The image file itself is refused while a loop device is backed by it.
  await assert.rejects(restoreBackup(repo, s.id, image), /is the backing file of \/dev\/loop\d+; detach it first/);
  await assert.rejects(restoreBackup(repo, s.id, image, { output: image }), /is the backing file of/);
  const backup2 = await backupDevices(repo, new ServeSnapshotProvider(dir, { copy: false }), [loop]);
  const mnt = fs.mkdtempSync(path.join(dir, 'mnt-'));
  const unmount = await mountDevice(loop, mnt);
  try {
    await assert.rejects(restoreBackup(repo, backup2.id, loop), /is mounted at .*; unmount it first/);
  } finally {
    await unmount();
  }
  await restoreBackup(repo, backup2.id, loop);
  await run('e2fsck', ['-n', '-f', loop]);
});

/** How many pieces of an unencrypted repository use each codec. */
async function piecesByCodec(repo: Repository): Promise<Map<number | undefined, number>> {
  const counts = new Map<number | undefined, number>();
  for (const [id, at] of await repo.pieceIndex()) {
    const codec = pieceCodec(await repo.readStoredPiece(id, at));
    counts.set(codec, (counts.get(codec) ?? 0) + 1);
  }
  return counts;
}
