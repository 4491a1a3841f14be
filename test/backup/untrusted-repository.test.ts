/**
 * A repository written by someone who is not trusted, used by root: links planted by another
 * user (run as nobody) are neither followed nor trusted, and crafted manifests, oversized piece
 * files and zstd bombs are refused before anything large is allocated or read.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { LocalDirStore, backupDevices } from '../../src/backup/index.js';
import { CODEC_ZSTD, PIECE_HEADER_BYTES, PIECE_MAGIC, PIECE_VERSION, encodePiece, sha256Hex } from '../../src/repository/codec.js';
import { MANIFEST_FORMAT, MANIFEST_VERSION, manifestObject, newBackupId, pieceObject } from '../../src/repository/format.js';
import { nativeZstd, zstdContentSize } from '../../src/repository/zstd.js';
import { BdsnapError } from '../../src/errors.js';
import { AS_NOBODY, BDSNAP_MAIN } from '../../testkit/bdsnap-cli.js';
import { makeImage, makeTempDir } from '../../testkit/files.js';
import { requireRoot, run, type RunResult } from '../../testkit/process.js';
import { TEST_PASSWORD, openRepo } from './helpers.js';
import { ServeSnapshotProvider } from '../../testkit/snapshot-provider.js';

// The children find the repository password where a user would put it.
process.env.BDSNAP_REPO_PASSWORD = TEST_PASSWORD;
const V1_FIXTURE = fileURLToPath(new URL('../../../test/backup/fixtures/v1-repository', import.meta.url));

const MiB = 1024 * 1024;
const NOBODY = 65534;
const DECODE_CHILD = fileURLToPath(new URL('./fixtures/decode-piece-child.js', import.meta.url));

function bdsnap(...args: string[]): Promise<RunResult> {
  return run(process.execPath, [BDSNAP_MAIN, 'backup', ...args], { allowFailure: true, timeoutMs: 60_000 });
}

function assertFails(r: RunResult, pattern: RegExp): void {
  assert.equal(r.exitCode, 1, `${r.command} should fail with one clear line: ${r.stderr}`);
  assert.equal(r.stderr.trim().split('\n').length, 1, `one line on stderr: ${r.stderr}`);
  assert.match(r.stderr, pattern);
}

/** Run a shell command as nobody (no groups): the other user who can write part of the repository. */
async function asNobody(script: string): Promise<void> {
  await run(AS_NOBODY[0], [...AS_NOBODY.slice(1), 'sh', '-ec', script]);
}

/** Every file and directory under `dir`, with its size, to compare before and after. */
function snapshotOf(dir: string): string[] {
  return fs.readdirSync(dir, { recursive: true, withFileTypes: true })
    .map((e) => `${path.relative(dir, path.join(e.parentPath, e.name))} ${e.isFile() ? fs.statSync(path.join(e.parentPath, e.name)).size : e.isDirectory() ? 'dir' : 'other'}`)
    .sort();
}

/**
 * A temp dir nobody may traverse (0711, like a home directory), an image, and a root-only
 * directory `victim` holding a file named like a manifest, which a followed link would reach.
 */
function setting(t: Parameters<typeof makeTempDir>[0]): { dir: string; repoDir: string; image: string; victim: string; id: string } {
  const dir = makeTempDir(t, 'bdsnap-untrusted-');
  fs.chmodSync(dir, 0o711);
  const image = path.join(dir, 'disk.img');
  makeImage(image, 4 * MiB, 'mixed', 3);
  const victim = path.join(dir, 'victim');
  fs.mkdirSync(victim, { mode: 0o700 });
  const id = newBackupId();
  fs.writeFileSync(path.join(victim, `${id}.json`), 'root only\n');
  return { dir, repoDir: path.join(dir, 'repo'), image, victim, id };
}

async function createBackup(repoDir: string, dir: string, image: string): Promise<void> {
  const repo = await openRepo(new LocalDirStore(repoDir));
  try {
    await backupDevices(repo, new ServeSnapshotProvider(dir), [image]);
  } finally {
    repo.store.close?.();
  }
}

test('root refuses a repository whose root another user owns; nothing is created or deleted through the links they plant', async (t) => {
  requireRoot();
  const { dir, repoDir, image, victim, id } = setting(t);
  assert.equal((await bdsnap('init', '--repo', repoDir)).exitCode, 0);
  assert.equal(fs.statSync(repoDir).mode & 0o777, 0o700, 'a new repository is private');
  assert.equal(fs.statSync(path.join(repoDir, 'config')).mode & 0o777, 0o600);
  fs.chownSync(repoDir, NOBODY, NOBODY);
  await asNobody(`cd '${repoDir}' && for d in backups packs index locks; do ln -s '${victim}' $d; done`);
  const before = snapshotOf(victim);

  await assert.rejects(createBackup(repoDir, dir, image), (e: unknown) => {
    assert.ok(e instanceof BdsnapError, String(e));
    assert.equal(e.code, 'EPERM');
    assert.match(e.message, new RegExp(`${repoDir} is owned by uid ${NOBODY}; .*chown -R root: `));
    return true;
  });
  assertFails(await bdsnap('forget', '--repo', repoDir, id), new RegExp(`^bdsnap: ${repoDir} is owned by uid ${NOBODY}`));
  assertFails(await bdsnap('list', '--repo', repoDir), /is owned by uid/);
  assert.deepEqual(snapshotOf(victim), before, 'nothing was written or deleted in the directory the links point to');
});

test('root refuses a repository directory another user owns (packs/) with links planted at packs/<hh>', async (t) => {
  requireRoot();
  const { dir, repoDir, image, victim } = setting(t);
  assert.equal((await bdsnap('init', '--repo', repoDir)).exitCode, 0);
  // nobody may reach packs/ (0711 on the way) and owns it; the repository root stays root's.
  fs.chmodSync(repoDir, 0o711);
  fs.mkdirSync(path.join(repoDir, 'packs'), { mode: 0o755 });
  fs.chownSync(path.join(repoDir, 'packs'), NOBODY, NOBODY);
  await asNobody(`cd '${repoDir}/packs' && for h in $(seq 0 255); do ln -s '${victim}' $(printf %02x $h); done`);
  const before = snapshotOf(victim);

  await assert.rejects(createBackup(repoDir, dir, image), (e: unknown) => {
    assert.ok(e instanceof BdsnapError, String(e));
    assert.equal(e.code, 'EPERM');
    assert.match(e.message, new RegExp(`${repoDir}/packs is owned by uid ${NOBODY}`));
    return true;
  });
  assertFails(await bdsnap('prune', '--repo', repoDir), /packs is owned by uid/);
  assert.deepEqual(snapshotOf(victim), before, 'no piece was written through a link');

  // A directory others may write to is refused alike, whoever owns it.
  fs.chownSync(path.join(repoDir, 'packs'), 0, 0);
  fs.chmodSync(path.join(repoDir, 'packs'), 0o777);
  await assert.rejects(createBackup(repoDir, dir, image), /packs is writable by group or others \(mode 777\).*chmod -R go-w/);
  assert.deepEqual(snapshotOf(victim), before);
});

test('links inside a repository are never followed, even where the owner could have planted them', async (t) => {
  const { dir, repoDir, image, victim, id } = setting(t);
  assert.equal((await bdsnap('init', '--repo', repoDir)).exitCode, 0);
  const before = snapshotOf(victim);

  // The backups directory is a link: create, list and forget refuse, and write or delete nothing.
  fs.symlinkSync(victim, path.join(repoDir, 'backups'));
  await assert.rejects(createBackup(repoDir, dir, image), (e: unknown) => {
    assert.ok(e instanceof BdsnapError, String(e));
    assert.equal(e.code, 'EPERM');
    assert.match(e.message, new RegExp(`${repoDir}/backups is a symbolic link; .*remove it`));
    return true;
  });
  assertFails(await bdsnap('forget', '--repo', repoDir, id), /backups is a symbolic link/);
  assert.deepEqual(snapshotOf(victim), before, 'forget deleted nothing through the link');
  const packs = path.join(repoDir, 'packs');
  assert.ok(!fs.existsSync(packs) || fs.readdirSync(packs).length === 0, 'the create was refused before it stored a piece');

  // A manifest that is a link is not read, and forget removes the link alone.
  fs.unlinkSync(path.join(repoDir, 'backups'));
  await createBackup(repoDir, dir, image);
  const repo = await openRepo(new LocalDirStore(repoDir));
  t.after(() => repo.store.close?.());
  const [real] = await repo.backupIds();
  fs.copyFileSync(path.join(repoDir, manifestObject(real!)), path.join(victim, 'copy.json'));
  const linked = path.join(repoDir, manifestObject(real!));
  fs.rmSync(linked);
  fs.symlinkSync(path.join(victim, 'copy.json'), linked);
  await assert.rejects(repo.manifest(real!), /is a symbolic link/);
  await repo.forget([real!]).catch(() => undefined);
  assert.ok(fs.existsSync(path.join(victim, 'copy.json')), 'the file a link pointed to is still there');

  // A pack that is a link is not read: verify and restore refuse its pieces.
  const second = (await backupDevices(repo, new ServeSnapshotProvider(dir), [image], { full: true })).id;
  const hash = (await repo.manifest(second)).devices[0]!.pieces.find((p): p is string => typeof p === 'string')!;
  const pack = path.join(repoDir, (await repo.pieceIndex()).get(hash)!.object);
  fs.renameSync(pack, path.join(victim, 'pack'));
  fs.symlinkSync(path.join(victim, 'pack'), pack);
  assertFails(await bdsnap('restore', '--repo', repoDir, second, image, '--output', path.join(dir, 'out.img')), /is a symbolic link; bdsnap does not follow one .*; the partly written \S+\/\.out\.img\.bdsnap-restore-[0-9a-f]{8} was removed; /);
  assert.deepEqual(fs.readdirSync(dir).filter((n) => n.includes('out.img')), [], 'no output file, temporary or not, is left');
  const verify = await bdsnap('verify', '--repo', repoDir, second);
  assert.equal(verify.exitCode, 1, verify.stderr);
  assert.match(verify.stdout, new RegExp(`piece ${hash}: damaged`));
});

/** A repository with one hand-written manifest whose only device is `device`. */
async function craftedManifest(t: Parameters<typeof makeTempDir>[0], device: Record<string, unknown>): Promise<{ dir: string; repoDir: string; id: string }> {
  const dir = makeTempDir(t, 'bdsnap-crafted-');
  const repoDir = path.join(dir, 'repo');
  // Only an unencrypted repository takes a hand-written manifest at all (an encrypted one refuses it unread).
  assert.equal((await bdsnap('init', '--repo', repoDir, '--no-encryption')).exitCode, 0);
  const id = newBackupId();
  const manifest = {
    format: MANIFEST_FORMAT, version: MANIFEST_VERSION, id, startTime: new Date().toISOString(), endTime: new Date().toISOString(),
    pieceSizeBytes: 256 * 1024, tags: [],
    devices: [{ device: '/dev/crafted', kind: 'full', base: null, why: 'crafted', readBytes: 0, newPieces: 0, newStoredBytes: 0, meta: {}, ...device }],
  };
  fs.mkdirSync(path.join(repoDir, 'backups'), { mode: 0o700 });
  fs.writeFileSync(path.join(repoDir, manifestObject(id)), JSON.stringify(manifest));
  return { dir, repoDir, id };
}

test('a manifest claiming a billion zero pieces, or a petabyte device, is refused at once (ECORRUPT), not a crash', async (t) => {
  for (const device of [{ sizeBytes: 256 * 1024, pieces: [1e9] }, { sizeBytes: 2 ** 50, pieces: [2 ** 32] }]) {
    const { dir, repoDir, id } = await craftedManifest(t, device);
    const restore = await bdsnap('restore', '--repo', repoDir, id, '/dev/crafted', '--output', path.join(dir, 'out.img'));
    assertFails(restore, /^bdsnap: the manifest of .*(lists more than|more than 67108864 pieces)/m);
    assert.ok(restore.durationMs < 10_000, `refused in ${restore.durationMs} ms`);
    const list = await bdsnap('list', '--repo', repoDir, '--json');
    assert.equal(list.exitCode, 0, list.stderr);
    assert.match((JSON.parse(list.stdout) as Array<{ error?: string }>)[0]!.error ?? '', /the manifest of/);
    assert.equal(fs.existsSync(path.join(dir, 'out.img')), false);
  }
  // 280 MB of "1," parse into an array V8 cannot hold: it aborts instead of throwing.
  const { dir, repoDir, id } = await craftedManifest(t, { sizeBytes: 256 * 1024, pieces: [1] });
  const file = path.join(repoDir, manifestObject(id));
  fs.writeFileSync(file, fs.readFileSync(file, 'utf8').replace('"pieces":[1]', `"pieces":[${'1,'.repeat(140e6)}1]`));
  const restore = await bdsnap('restore', '--repo', repoDir, id, '/dev/crafted', '--output', path.join(dir, 'out.img'));
  assertFails(restore, /^bdsnap: the manifest of backup .* is damaged \(more than 67108864 values\)$/m);
});

test('a version-1 piece file larger than a piece can be (sparse, 3 GiB) is refused before it is read', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-bigpiece-');
  const repoDir = path.join(dir, 'repo');
  fs.cpSync(V1_FIXTURE, repoDir, { recursive: true });
  const repo = await openRepo(new LocalDirStore(repoDir));
  t.after(() => repo.store.close?.());
  const [id] = await repo.backupIds();
  const hash = (await repo.manifest(id!)).devices[0]!.pieces.find((p): p is string => typeof p === 'string')!;
  fs.truncateSync(path.join(repoDir, pieceObject(hash)), 3 * 1024 * MiB);

  const verify = await bdsnap('verify', '--repo', repoDir, '--json');
  assert.equal(verify.exitCode, 1, verify.stderr);
  const bad = (JSON.parse(verify.stdout) as { badPieces: Array<{ hash: string; detail: string }> }).badPieces;
  assert.deepEqual(bad.map((b) => b.hash), [hash]);
  assert.match(bad[0]!.detail, /is 3221225472 bytes, more than the 65552 it can be/);
  assert.ok(verify.durationMs < 10_000, `verify took ${verify.durationMs} ms`);
  // verify removed it (a damaged piece is of no use and would be taken as stored); plant it again.
  assert.equal(fs.existsSync(path.join(repoDir, pieceObject(hash))), false);
  fs.writeFileSync(path.join(repoDir, pieceObject(hash)), '');
  fs.truncateSync(path.join(repoDir, pieceObject(hash)), 3 * 1024 * MiB);
  const startedMs = Date.now();
  await assert.rejects(repo.readStoredPiece(hash), (e: unknown) => {
    assert.ok(e instanceof BdsnapError);
    assert.equal(e.code, 'ECORRUPT');
    return true;
  });
  assert.ok(Date.now() - startedMs < 1000, 'refused without reading');
});

/** A stored zstd piece (header and frame) that claims `rawBytes`. */
function zstdPiece(frame: Buffer, rawBytes: number): Buffer {
  const header = Buffer.alloc(PIECE_HEADER_BYTES);
  header.writeUInt32LE(PIECE_MAGIC, 0);
  header.writeUInt8(PIECE_VERSION, 4);
  header.writeUInt8(CODEC_ZSTD, 5);
  header.writeUInt32LE(rawBytes, 8);
  return Buffer.concat([header, frame]);
}

/**
 * A zstd frame (RFC 8878) written by hand: `blocks` RLE blocks of 128 KiB, each 4 bytes, so
 * 64 KiB of frame decode to 2 GiB. `declaredBytes`: a single-segment frame that declares this
 * size (4-byte Frame_Content_Size); else no size and a 128 KiB window.
 */
function zstdBomb(blocks: number, declaredBytes?: number): Buffer {
  const header = declaredBytes === undefined
    ? Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x38])
    : Buffer.concat([Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0xa0]), Buffer.alloc(4)]);
  if (declaredBytes !== undefined) header.writeUInt32LE(declaredBytes, 5);
  const body = Buffer.alloc(blocks * 4);
  for (let i = 0; i < blocks; i++) body.writeUIntLE(((128 * 1024) << 3) | (1 << 1) | (i === blocks - 1 ? 1 : 0), i * 4, 3);
  return Buffer.concat([header, body]);
}

async function decodeInChild(dir: string, stored: Buffer, hash: string, maxRawBytes: number): Promise<{ ok: boolean; code?: string; message?: string; ms: number; maxRssKiB: number }> {
  const file = path.join(dir, `piece-${hash.slice(0, 8)}-${stored.length}`);
  fs.writeFileSync(file, stored);
  const r = await run(process.execPath, [DECODE_CHILD, file, hash, String(maxRawBytes)], {
    env: { ...process.env, BDSNAP_DECODE_CHILD: '1', BDSNAP_NO_NATIVE_ZSTD: '1' }, allowFailure: true, timeoutMs: 60_000,
  });
  assert.equal(r.exitCode, 0, `the decoding child died: ${r.stderr}`);
  return JSON.parse(r.stdout) as { ok: boolean; code?: string; message?: string; ms: number; maxRssKiB: number };
}

test('zstd bombs are refused by the pure decoder before they inflate; frames libzstd writes still decode', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-zstd-bomb-');
  const anyHash = '0'.repeat(64);
  for (const [what, frame] of [
    ['no declared size, 16384 RLE blocks (2 GiB)', zstdBomb(16384)],
    ['a declared size of 2 GiB', zstdBomb(1, 2 ** 31 - 1)],
    ['two frames', Buffer.concat([zstdBomb(1, 64 * 1024), zstdBomb(1, 64 * 1024)])],
  ] as const) {
    const r = await decodeInChild(dir, zstdPiece(frame, 64 * 1024), anyHash, 64 * 1024);
    assert.equal(r.ok, false, what);
    assert.equal(r.code, 'ECORRUPT', `${what}: ${r.message}`);
    assert.match(r.message!, /does not declare its size|declares 2147483647 bytes, more than 65536|more than one frame/, what);
    assert.ok(r.maxRssKiB < 256 * 1024, `${what}: the decoder grew to ${r.maxRssKiB} KiB`);
  }

  const zstd = nativeZstd();
  if (!zstd) return;
  for (const size of [64 * 1024, 100_000, 256 * 1024]) {
    const data = Buffer.alloc(size);
    for (let i = 0; i < size; i += 64) data.write(`line ${i} of a piece that compresses\n`, i);
    assert.equal(zstdContentSize(zstd.compress(data, 3)), size);
    const stored = encodePiece(data, CODEC_ZSTD);
    const r = await decodeInChild(dir, stored, sha256Hex(data), 256 * 1024);
    assert.deepEqual({ ok: r.ok, message: r.message }, { ok: true, message: undefined });
  }
});
