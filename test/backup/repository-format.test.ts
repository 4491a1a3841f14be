/**
 * Repository version 2: encryption by default, keys, packs, prune's repack, copy between
 * repositories, and version-1 repositories still read. Backups are made from in-memory images
 * through createBackup (the agent and NBD are covered elsewhere); the command line runs as a
 * real process.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { LocalDirStore, Repository, copyBackups, createBackup, restoreBackup, verifyRepository, type BackupSource } from '../../src/backup/index.js';
import { BdsnapError } from '../../src/errors.js';
import { manifestObject } from '../../src/repository/format.js';
import { makeTempDir } from '../../testkit/files.js';
import { run, type RunResult } from '../../testkit/process.js';
import { BDSNAP_MAIN } from '../../testkit/server.js';
import { TEST_SCRYPT, flipByteAt, initRepo, markedImage as image, openRepo, pieceBytes, plaintextIn, sha256 } from './helpers.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const V1_FIXTURE = fileURLToPath(new URL('../../../test/backup/fixtures/v1-repository', import.meta.url));
const V1_EXPECTED = JSON.parse(fs.readFileSync(`${V1_FIXTURE}.json`, 'utf8')) as { device: string; sizeBytes: number; backups: Record<string, string> };
function source(device: string, data: Buffer): BackupSource {
  return { device, sizeBytes: data.length, changed: null, why: 'test', read: async (t, o) => void data.copy(t, 0, o, o + t.length) };
}

async function restoredSha(repo: Repository, dir: string, id: string, device: string): Promise<string> {
  const out = path.join(dir, `out-${randomBytes(4).toString('hex')}.img`);
  await restoreBackup(repo, id, device, { output: out });
  const sum = sha256(fs.readFileSync(out));
  fs.rmSync(out);
  return sum;
}

/** Every file under `dir` with its size, mode, time and content hash. */
function treeState(dir: string): string[] {
  return fs.readdirSync(dir, { recursive: true, withFileTypes: true }).map((e) => {
    const p = path.join(e.parentPath, e.name);
    const st = fs.lstatSync(p);
    return `${path.relative(dir, p)} ${st.mode} ${st.mtimeMs} ${st.isFile() ? sha256(fs.readFileSync(p)) : ''}`;
  }).sort();
}

function bdsnap(args: string[], env: Record<string, string | undefined> = {}): Promise<RunResult> {
  const childEnv: Record<string, string> = {};
  for (const [k, v] of Object.entries({ ...process.env, ...env })) if (v !== undefined) childEnv[k] = v;
  return run(process.execPath, [BDSNAP_MAIN, 'backup', ...args], { allowFailure: true, timeoutMs: 60_000, env: childEnv });
}

function assertFails(r: RunResult, pattern: RegExp): void {
  assert.equal(r.exitCode, 1, `${r.command}: ${r.stdout} ${r.stderr}`);
  assert.equal(r.stderr.trim().split('\n').length, 1, `one line on stderr: ${r.stderr}`);
  assert.match(r.stderr, pattern);
}

function isCode(code: string): (e: unknown) => boolean {
  return (e: unknown) => e instanceof BdsnapError && e.code === code;
}

test('a new repository is encrypted: no marker text, no plain sha256 of a piece, anywhere in its files or names', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-format-plain-');
  const img = image(4 * MiB, 1);
  const scan = async (encryption: boolean): Promise<{ marker: boolean; hashes: string[] }> => {
    const repoDir = path.join(dir, encryption ? 'enc' : 'plain');
    // brotli: its literals keep the marker readable in an unencrypted piece, as zstd's do.
    const repo = await initRepo(new LocalDirStore(repoDir), { pieceSizeBytes: 64 * KiB, encryption, codec: 'brotli' });
    await createBackup(repo, [source('/dev/marked', img)]);
    const files = fs.readdirSync(repoDir, { recursive: true, withFileTypes: true }).map((e) => {
      const p = path.join(e.parentPath, e.name);
      return { name: p, bytes: e.isFile() ? fs.readFileSync(p) : undefined };
    });
    return plaintextIn(img, 64 * KiB, files);
  };
  const plain = await scan(false);
  assert.equal(plain.marker, true, 'the scan finds the marker in an unencrypted repository');
  assert.ok(plain.hashes.length > 0, 'the scan finds plain sha256s in an unencrypted repository');
  const enc = await scan(true);
  assert.equal(enc.marker, false, 'no marker text in an encrypted repository');
  assert.deepEqual(enc.hashes, [], 'no plain sha256 of a piece in an encrypted repository');
  // Pieces are packed: a few objects, not one per piece.
  const packs = fs.readdirSync(path.join(dir, 'enc', 'packs'), { recursive: true, withFileTypes: true }).filter((e) => e.isFile());
  assert.ok(packs.length >= 1 && packs.length <= 2, `${packs.length} packs for 48 pieces`);
});

test('a wrong password is refused (EAUTH) and touches nothing; an altered key, config, manifest, index or pack is refused, never used', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-format-tamper-');
  const repoDir = path.join(dir, 'repo');
  const img = image(2 * MiB, 2);
  const repo = await initRepo(new LocalDirStore(repoDir), { pieceSizeBytes: 64 * KiB });
  const a = await createBackup(repo, [source('/dev/a', img)]);
  const other = Buffer.from(img);
  other.write('another backup', MiB);
  const b = await createBackup(repo, [{ ...source('/dev/a', other), changed: [{ offsetBytes: MiB, lengthBytes: 4096 }], base: a.id }]);

  const before = treeState(repoDir);
  await assert.rejects(Repository.open(new LocalDirStore(repoDir), { password: () => 'not the password' }), (e: unknown) => isCode('EAUTH')(e) && /wrong password/.test((e as Error).message));
  await assert.rejects(Repository.open(new LocalDirStore(repoDir)), isCode('EAUTH'));
  for (const args of [['list'], ['verify'], ['prune'], ['restore', a.id, '/dev/a', '--output', path.join(dir, 'x.img')], ['forget', a.id], ['key', 'add'], ['key', 'list'], ['copy', '--from', repoDir], ['create', '/dev/a', '--run-dir', path.join(dir, 'no-daemon')]]) {
    assertFails(await bdsnap([...args, '--repo', repoDir], { BDSNAP_REPO_PASSWORD: 'wrong', BDSNAP_FROM_REPO_PASSWORD: 'wrong', BDSNAP_NEW_REPO_PASSWORD: 'x' }), /wrong password: no key of .* accepts it/);
  }
  assertFails(await bdsnap(['list', '--repo', repoDir], { BDSNAP_REPO_PASSWORD: undefined }), /no password: set BDSNAP_REPO_PASSWORD/);
  assert.deepEqual(treeState(repoDir), before, 'nothing in the repository changed');
  assert.equal(fs.existsSync(path.join(dir, 'x.img')), false);

  const fresh = (): Promise<Repository> => openRepo(new LocalDirStore(repoDir));
  const restoreFails = async (id: string, pattern: RegExp): Promise<void> => {
    const out = path.join(dir, 'r.img');
    await assert.rejects(restoreBackup(await fresh(), id, '/dev/a', { output: out }), (e: unknown) => isCode('ECORRUPT')(e) && pattern.test((e as Error).message));
    assert.equal(fs.existsSync(out), false);
  };
  const undoable = (file: string, offsetBytes: number): (() => void) => {
    flipByteAt(file, offsetBytes);
    return () => flipByteAt(file, offsetBytes);
  };

  // A pack: the piece fails authentication; restore writes nothing, verify names it.
  const piece = (await repo.manifest(a.id)).devices[0]!.pieces.find((p): p is string => typeof p === 'string')!;
  const at = await pieceBytes(repo, repoDir, piece);
  let undo = undoable(at.file, at.offsetBytes + at.lengthBytes - 1);
  await restoreFails(a.id, new RegExp(`piece ${piece} is damaged: it fails authentication`));
  undo();
  assert.equal(await restoredSha(await fresh(), dir, a.id, '/dev/a'), sha256(img));

  // A manifest: unreadable, named in list; its backup cannot be restored.
  const manifestFile = path.join(repoDir, manifestObject(b.id));
  undo = undoable(manifestFile, 40);
  const records = await (await fresh()).backups();
  assert.match(records.find((r) => r.id === b.id)!.error!.message, /the manifest of backup .* is damaged: it fails authentication/);
  await restoreFails(b.id, /the manifest of backup .* is damaged: it fails authentication/);
  undo();
  // A manifest moved to another backup's name fails too: each is bound to its name.
  const saved = fs.readFileSync(manifestFile);
  fs.copyFileSync(path.join(repoDir, manifestObject(a.id)), manifestFile);
  await restoreFails(b.id, /the manifest of backup .* is damaged: it fails authentication/);
  fs.writeFileSync(manifestFile, saved);

  // An index object.
  const indexFile = path.join(repoDir, 'index', fs.readdirSync(path.join(repoDir, 'index'))[0]!);
  undo = undoable(indexFile, 30);
  await restoreFails(a.id, /index .* is damaged: it fails authentication/);
  undo();

  // The config: refused at open; a plain one put in its place (a downgrade) too.
  const configFile = path.join(repoDir, 'config');
  undo = undoable(configFile, 20);
  await assert.rejects(fresh(), (e: unknown) => isCode('ECORRUPT')(e) && /config .* fails authentication/.test((e as Error).message));
  undo();
  const config = fs.readFileSync(configFile);
  fs.writeFileSync(configFile, JSON.stringify({ ...repo.config, hash: 'sha256', encryption: 'none' }));
  await assert.rejects(fresh(), (e: unknown) => isCode('ECORRUPT')(e) && /plain but the repository has keys/.test((e as Error).message));
  fs.writeFileSync(configFile, config);

  // The key object: the password no longer opens it; a second key still does.
  const keyFile = path.join(repoDir, 'keys', fs.readdirSync(path.join(repoDir, 'keys'))[0]!);
  const second = await (await fresh()).addKey('second password', TEST_SCRYPT);
  const key = JSON.parse(fs.readFileSync(keyFile, 'utf8')) as { sealedMasterKey: string };
  const sealed = Buffer.from(key.sealedMasterKey, 'base64');
  sealed[20]! ^= 1;
  fs.writeFileSync(keyFile, JSON.stringify({ ...key, sealedMasterKey: sealed.toString('base64') }));
  await assert.rejects(fresh(), isCode('EAUTH'));
  // A key object that cannot even be read is named: the password may be right.
  const sealedKey = fs.readFileSync(keyFile);
  fs.writeFileSync(keyFile, sealedKey.subarray(0, 20));
  await assert.rejects(fresh(), (e: unknown) => isCode('EAUTH')(e) && /1 of its 2 key object\(s\) cannot be read \(key object .* is damaged .*\): the password may be right and its key damaged/.test((e as Error).message));
  fs.writeFileSync(keyFile, sealedKey);
  const bySecond = await Repository.open(new LocalDirStore(repoDir), { password: () => 'second password' });
  assert.equal(bySecond.keyId, second);
  assert.equal(await restoredSha(bySecond, dir, b.id, '/dev/a'), sha256(other));
  assert.equal((await verifyRepository(bySecond)).ok, true);
});

test('a version-1 repository (written before packs and encryption) still lists, verifies and restores; create refuses it; copy brings it into a new one', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-format-v1-');
  const repoDir = path.join(dir, 'v1');
  fs.cpSync(V1_FIXTURE, repoDir, { recursive: true });
  const repo = await Repository.open(new LocalDirStore(repoDir));
  assert.equal(repo.legacy, true);
  assert.deepEqual(await repo.backupIds(), Object.keys(V1_EXPECTED.backups));
  assert.equal((await verifyRepository(repo)).ok, true);
  for (const [id, want] of Object.entries(V1_EXPECTED.backups)) assert.equal(await restoredSha(repo, dir, id, V1_EXPECTED.device), want);
  await assert.rejects(createBackup(repo, [source('/dev/x', Buffer.alloc(64 * KiB, 1))]), (e: unknown) => isCode('ENOTSUP')(e) && /version-1 repository .*backup copy --from/.test((e as Error).message));

  const list = await bdsnap(['list', '--repo', repoDir, '--json'], { BDSNAP_REPO_PASSWORD: undefined });
  assert.equal(list.exitCode, 0, list.stderr);
  assert.deepEqual((JSON.parse(list.stdout) as Array<{ id: string }>).map((b) => b.id), Object.keys(V1_EXPECTED.backups));
  assert.match(list.stderr, /not encrypted nor authenticated/);

  const newDir = path.join(dir, 'v2');
  const v2 = await initRepo(new LocalDirStore(newDir), { pieceSizeBytes: 64 * KiB });
  const s = await copyBackups(repo, v2);
  assert.deepEqual(s.copied, Object.keys(V1_EXPECTED.backups));
  for (const [id, want] of Object.entries(V1_EXPECTED.backups)) assert.equal(await restoredSha(v2, dir, id, V1_EXPECTED.device), want);
  assert.equal((await verifyRepository(v2)).ok, true);
});

test('copy: decrypts, re-ids under the destination keys, skips what the destination has, restores exactly', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-format-copy-');
  const img = image(2 * MiB, 3);
  const from = await initRepo(new LocalDirStore(path.join(dir, 'from')), { pieceSizeBytes: 64 * KiB });
  const toDir = path.join(dir, 'to');
  const to = await Repository.init(new LocalDirStore(toDir), { pieceSizeBytes: 64 * KiB, password: 'another password', scrypt: TEST_SCRYPT });
  const a = await createBackup(from, [source('/dev/a', img)]);
  // The destination holds the same image already (its own backup): copy stores nothing new.
  await createBackup(to, [source('/dev/a', img)]);
  const first = await copyBackups(from, to);
  assert.deepEqual(first.copied, [a.id]);
  assert.equal(first.newPieces, 0, 'every piece was there already');
  const fromIds = new Set((await from.manifest(a.id)).devices[0]!.pieces.filter((p) => typeof p === 'string'));
  const toIds = (await to.manifest(a.id)).devices[0]!.pieces.filter((p): p is string => typeof p === 'string');
  assert.ok(toIds.every((id) => !fromIds.has(id)), 'pieces are named by the destination id key');
  assert.equal(await restoredSha(to, dir, a.id, '/dev/a'), sha256(img));

  // A second backup with some new content: only it is copied, and only its new pieces stored.
  const changed = Buffer.from(img);
  randomBytes(3 * 64 * KiB).copy(changed, 5 * 64 * KiB);
  const b = await createBackup(from, [source('/dev/a', changed)]);
  // While it copies, each side's lock says what it is held for, so a prune refused says so.
  const purposes = (repoDir: string): unknown[] => fs.readdirSync(path.join(repoDir, 'locks')).map((name) => (JSON.parse(fs.readFileSync(path.join(repoDir, 'locks', name), 'utf8')) as { purpose?: string }).purpose);
  let held: Record<string, unknown[]> | undefined;
  const progress = { start: () => (held = { from: purposes(path.join(dir, 'from')), to: purposes(toDir) }), advance: () => undefined };
  const again = await copyBackups(from, to, { progress });
  assert.deepEqual(held, { from: ['copy-from'], to: ['copy-to'] });
  assert.deepEqual(again.copied, [b.id]);
  assert.deepEqual(again.skipped, [a.id]);
  assert.equal(again.newPieces, 3);
  assert.equal(await restoredSha(to, dir, b.id, '/dev/a'), sha256(changed));
  assert.equal((await verifyRepository(to)).ok, true);
  assert.deepEqual((await copyBackups(from, to)).copied, [], 'nothing left to copy');

  // The command line: into an unencrypted repository, with each side's password in its own variable.
  const plainDir = path.join(dir, 'plain');
  assert.equal((await bdsnap(['init', '--repo', plainDir, '--no-encryption', '--piece-size', '64K'])).exitCode, 0);
  const r = await bdsnap(['copy', '--from', toDir, '--repo', plainDir, b.id, '--json'], { BDSNAP_FROM_REPO_PASSWORD: 'another password', BDSNAP_REPO_PASSWORD: undefined });
  assert.equal(r.exitCode, 0, r.stderr);
  assert.deepEqual((JSON.parse(r.stdout) as { copied: string[] }).copied, [b.id]);
  assert.equal(await restoredSha(await Repository.open(new LocalDirStore(plainDir)), dir, b.id, '/dev/a'), sha256(changed));
});

test('prune drops unused packs and repacks mostly unused ones; every remaining backup restores exactly', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-format-prune-');
  const repoDir = path.join(dir, 'repo');
  const repo = await initRepo(new LocalDirStore(repoDir), { pieceSizeBytes: 64 * KiB, packSizeBytes: MiB, codec: 'lz4' });
  const packBytes = (): number => fs.readdirSync(path.join(repoDir, 'packs'), { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile()).reduce((n, e) => n + fs.statSync(path.join(e.parentPath, e.name)).size, 0);
  // Random content: every piece is stored raw, 64 KiB, 16 to a pack.
  const one = randomBytes(4 * MiB);
  const a = await createBackup(repo, [source('/dev/a', one)]);
  // b keeps one piece in four of a's; c is new throughout.
  const two = randomBytes(4 * MiB);
  for (let i = 0; i < 64; i += 4) one.copy(two, i * 64 * KiB, i * 64 * KiB, (i + 1) * 64 * KiB);
  const b = await createBackup(repo, [source('/dev/a', two)]);
  const three = randomBytes(MiB);
  const c = await createBackup(repo, [source('/dev/c', three)]);
  await repo.forget([a.id]);
  const sizeBefore = packBytes();
  const s = await repo.prune();
  assert.ok(s.repackedPacks >= 4, `a's four packs are a quarter used: repacked ${s.repackedPacks}`);
  assert.equal(s.repackedPieces, 16);
  assert.equal(s.deletedPieces, 48);
  assert.ok(sizeBefore - packBytes() >= 2.9 * MiB, `freed ${sizeBefore - packBytes()} bytes`);
  const after = await openRepo(new LocalDirStore(repoDir));
  assert.equal((await verifyRepository(after)).ok, true);
  assert.equal(await restoredSha(after, dir, b.id, '/dev/a'), sha256(two));
  assert.equal(await restoredSha(after, dir, c.id, '/dev/c'), sha256(three));
  // A second prune has nothing to do.
  const again = await after.prune();
  assert.deepEqual([again.deletedPieces, again.repackedPacks, again.deletedPacks], [0, 0, 0]);
  assert.equal(await restoredSha(after, dir, b.id, '/dev/a'), sha256(two));
});

test('key list, add and remove through the command line; the key in use and the last key stay', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-format-keys-');
  const repoDir = path.join(dir, 'repo');
  const pwFile = path.join(dir, 'pw');
  fs.writeFileSync(pwFile, 'first password\n', { mode: 0o600 });
  const newFile = path.join(dir, 'new');
  fs.writeFileSync(newFile, 'second password\n', { mode: 0o600 });
  const none = { BDSNAP_REPO_PASSWORD: undefined };
  let r = await bdsnap(['init', '--repo', repoDir, '--password-file', pwFile], none);
  assert.equal(r.exitCode, 0, r.stderr);
  assert.match(r.stdout, /encrypted with AES-256-GCM/);
  r = await bdsnap(['key', 'list', '--repo', repoDir, '--password-file', pwFile, '--json'], none);
  assert.equal(r.exitCode, 0, r.stderr);
  const [firstKey] = JSON.parse(r.stdout) as Array<{ id: string; current: boolean }>;
  assert.equal(firstKey!.current, true);
  r = await bdsnap(['key', 'add', '--repo', repoDir, '--password-file', pwFile, '--new-password-file', newFile], none);
  assert.equal(r.exitCode, 0, r.stderr);
  r = await bdsnap(['key', 'list', '--repo', repoDir, '--json'], { BDSNAP_REPO_PASSWORD: 'second password' });
  const keys = JSON.parse(r.stdout) as Array<{ id: string; current: boolean }>;
  assert.equal(keys.length, 2);
  const secondKey = keys.find((k) => k.current)!;
  assert.notEqual(secondKey.id, firstKey!.id);
  assertFails(await bdsnap(['key', 'remove', secondKey.id, '--repo', repoDir], { BDSNAP_REPO_PASSWORD: 'second password' }), /is the one this password opens/);
  r = await bdsnap(['key', 'remove', firstKey!.id.slice(0, 8), '--repo', repoDir], { BDSNAP_REPO_PASSWORD: 'second password' });
  assert.equal(r.exitCode, 0, r.stderr);
  assertFails(await bdsnap(['list', '--repo', repoDir, '--password-file', pwFile], none), /wrong password/);
  r = await bdsnap(['list', '--repo', repoDir], { BDSNAP_REPO_PASSWORD: 'second password' });
  assert.equal(r.exitCode, 0, r.stderr);
  // The only key left is the one in use: it cannot go.
  assertFails(await bdsnap(['key', 'remove', secondKey.id, '--repo', repoDir], { BDSNAP_REPO_PASSWORD: 'second password' }), /is the one this password opens/);

  // --no-encryption says loudly what it means; such a repository has no keys.
  const plainDir = path.join(dir, 'plain');
  r = await bdsnap(['init', '--repo', plainDir, '--no-encryption'], none);
  assert.equal(r.exitCode, 0, r.stderr);
  assert.match(r.stderr, /WARNING: .* is NOT encrypted \(--no-encryption\): anyone who can read it reads every backed-up byte/);
  assertFails(await bdsnap(['key', 'add', '--repo', plainDir, '--new-password-file', newFile], none), /is not encrypted: it has no keys/);
});

test('a password file another user owns or can read is refused: they would choose, or learn, the password of the repository', async (t) => {
  if (process.geteuid?.() !== 0) {
    t.skip('needs root, to give a file to another user');
    return;
  }
  const dir = makeTempDir(t, 'bdsnap-format-pwfile-');
  const repoDir = path.join(dir, 'repo');
  const none = { BDSNAP_REPO_PASSWORD: undefined };
  // Theirs: what they wrote there would become the password of root's new repository.
  const theirs = path.join(dir, 'theirs');
  fs.writeFileSync(theirs, 'a password they chose\n', { mode: 0o600 });
  fs.chownSync(theirs, 65534, 65534);
  assertFails(await bdsnap(['init', '--repo', repoDir, '--password-file', theirs], none), /the password file .*theirs is owned by uid 65534, who could change it/);
  assert.equal(fs.existsSync(repoDir), false, 'no repository was made with it');
  // Root's, but readable by everyone.
  const open = path.join(dir, 'open');
  fs.writeFileSync(open, 'a password everyone reads\n');
  fs.chmodSync(open, 0o644);
  assertFails(await bdsnap(['init', '--repo', repoDir, '--password-file', open], none), /the password file .*open is open to other users \(mode 644\).*chmod 600/);
  assert.equal(fs.existsSync(repoDir), false);
  // A private one of root's works, for the new password of key add too.
  const own = path.join(dir, 'own');
  fs.writeFileSync(own, 'the first password\n', { mode: 0o600 });
  assert.equal((await bdsnap(['init', '--repo', repoDir, '--password-file', own], none)).exitCode, 0);
  assertFails(await bdsnap(['key', 'add', '--repo', repoDir, '--password-file', own, '--new-password-file', theirs], none), /owned by uid 65534/);
  const keys = await bdsnap(['key', 'list', '--repo', repoDir, '--password-file', own, '--json'], none);
  assert.equal((JSON.parse(keys.stdout) as unknown[]).length, 1, 'no key was added with their password');
});
