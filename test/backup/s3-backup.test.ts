/**
 * `bdsnap backup` with `--repo s3:...` against a real radosgw, through the real daemon and CLI:
 * REPO spellings that are not supported are refused (never made into a local directory), a
 * busy ext4 is backed up full and incrementally and restores exactly, and two processes
 * backing up copies of one image at the same time into one bucket store its data once (after
 * prune) and each restore exactly; a bucket holding an encrypted repository shows none of its data;
 * and a prune of a bucket whose index object is lost refuses, deleting no pack.
 */

import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { BDSNAP_MAIN } from '../../testkit/bdsnap-cli.js';
import { ok, sandbox, startDaemon, type Sandbox } from '../../testkit/daemon.js';
import { makeImage, makeTempDir } from '../../testkit/files.js';
import { newS3Store, rgwForFile } from '../helpers/rgw.js';
import { parseRepoLocation } from '../../src/repository/location.js';
import { S3Store } from '../../src/repository/s3-store.js';
import { createBackup, restoreBackup, type BackupSource } from '../../src/backup/index.js';
import { BdsnapError } from '../../src/errors.js';
import { busyExt4Backups, type Created } from './daemon-cycles.js';
import { initRepo, markedImage, plaintextIn } from './helpers.js';

const rgw = rgwForFile();

test('a REPO that looks like a URL and is not a supported one is refused, and nothing is created', { timeout: 60_000 }, (t) => {
  const cwd = makeTempDir(t, 'bdsnap-repo-spelling-');
  const refused = [
    'sftp:backup@host:/srv/repo', 'rest:http://host:8000/', 'b2:bucket/path', 'http://127.0.0.1:40080/bucket/r1',
    'https://s3.example.net/bucket', 's3:127.0.0.1:40080/bucket', 's3:ftp://host/bucket', 's3:http://127.0.0.1:40080/',
    's3:http://127.0.0.1:40080/Bad_Bucket', 's3:http://key:secret@127.0.0.1:40080/bucket', 's3:http://127.0.0.1:40080/bucket/../x',
    'S3:http://127.0.0.1:40080/bucket?x=1', 'file:///tmp/repo',
  ];
  for (const repo of refused) {
    for (const args of [['backup', 'init', '--repo', repo], ['backup', 'list', '--repo', repo], ['backup', 'create', 'dev', '--repo', repo]]) {
      const r = spawnSync(process.execPath, [BDSNAP_MAIN, ...args], { cwd, encoding: 'utf8', timeout: 30_000, env: { ...process.env, AWS_ACCESS_KEY_ID: 'x', AWS_SECRET_ACCESS_KEY: 'y' } });
      assert.notEqual(r.status, 0, `${args.join(' ')} succeeded`);
      const lines = r.stderr.trim().split('\n');
      assert.equal(lines.length, 1, `one line on stderr for ${repo}: ${r.stderr}`);
      assert.match(lines[0]!, /--repo ".*": .*; a repository is a directory or s3:http\[s\]:\/\/HOST\[:PORT\]\/BUCKET\[\/PREFIX\]/, repo);
      assert.doesNotMatch(r.stderr, /secret/, 'a credential in the URL is not echoed');
    }
  }
  assert.deepEqual(fs.readdirSync(cwd), [], 'no local directory was made of a URL');
  // A directory with a colon in its name is still a directory when spelled as a path.
  const local = ok(sandbox(t), ['backup', 'init', '--repo', path.join(cwd, 'sftp:looks-like-a-url')]);
  assert.match(local, /initialized/);
  assert.deepEqual(parseRepoLocation('s3:https://s3.example.net:9000/backups/bdsnap/host1/'), { kind: 's3', endpoint: 'https://s3.example.net:9000', bucket: 'backups', prefix: 'bdsnap/host1/' });
  assert.deepEqual(parseRepoLocation('./s3:x'), { kind: 'local', dir: './s3:x' });
});

test('busy ext4 through bdsnap into radosgw: full, then incremental backups that restore exactly and pass e2fsck', { timeout: 400_000 }, async (t: TestContext) => {
  const r = await rgw(t);
  if (!r) return;
  const repo = r.newRepo('bdsnap');
  await busyExt4Backups(t, () => repo, r.env);
});

/** `bdsnap backup ...` as a process of its own; resolves with its output, rejects on failure. */
function cliAsync(box: Sandbox, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [BDSNAP_MAIN, ...args], { env: box.env, stdio: ['ignore', 'pipe', 'pipe'], timeout: 300_000 });
    let out = '';
    let err = '';
    p.stdout.on('data', (d: Buffer) => (out += d.toString()));
    p.stderr.on('data', (d: Buffer) => (err += d.toString()));
    p.once('exit', (code) => (code === 0 ? resolve(out) : reject(new Error(`bdsnap ${args.join(' ')} exited ${code}: ${err}`))));
  });
}

/** Bytes of every object under the repository's prefix. */
async function storedBytes(repo: string): Promise<number> {
  const at = parseRepoLocation(repo);
  if (at.kind !== 's3') throw new Error('not s3');
  const store = new S3Store(at);
  try {
    return (await store.list('')).reduce((sum, o) => sum + o.sizeBytes, 0);
  } finally {
    store.close();
  }
}

test('two processes back up copies of one image into one bucket at the same time: stored once after prune, each restores exactly', { timeout: 300_000 }, async (t) => {
  const r = await rgw(t);
  if (!r) return;
  Object.assign(process.env, r.env);
  const box = sandbox(t);
  Object.assign(box.env, r.env);
  const BYTES = 48 << 20;
  const a = makeImage(path.join(box.top, 'host-a.img'), BYTES, 'random', 7);
  const b = path.join(box.top, 'host-b.img');
  fs.copyFileSync(a, b);
  await startDaemon(t, { sandbox: box, password: false });
  const repo = r.newRepo('shared');
  ok(box, ['backup', 'init', '--repo', repo]);
  const [ca, cb] = (await Promise.all([a, b].map((dev) => cliAsync(box, ['backup', 'create', dev, '--repo', repo, '--json'])))).map((o) => JSON.parse(o) as Created);
  // Random data does not compress: one copy is BYTES and some headers. Each process packs what
  // the committed index lacks, so two at once may each store a copy, and never more.
  const stored = await storedBytes(repo);
  assert.ok(stored < BYTES * 2.2, `the bucket holds ${stored} bytes for two copies of a ${BYTES}-byte image`);
  // A third host with the same data, once the others are done, adds next to nothing.
  const c = path.join(box.top, 'host-c.img');
  fs.copyFileSync(a, c);
  const cc = JSON.parse(await cliAsync(box, ['backup', 'create', c, '--repo', repo, '--json'])) as Created & { devices: Array<{ newStoredBytes: number }> };
  assert.ok(cc.devices[0]!.newStoredBytes < BYTES / 100, `a later backup of the same data stored ${cc.devices[0]!.newStoredBytes} new bytes`);
  assert.ok(await storedBytes(repo) < stored + BYTES / 100);
  // Prune keeps one copy of each piece: the packs of the other copy go.
  await cliAsync(box, ['backup', 'prune', '--repo', repo]);
  assert.ok(await storedBytes(repo) < BYTES * 1.1, `after prune the bucket holds ${await storedBytes(repo)} bytes for one ${BYTES}-byte image`);
  const want = fs.readFileSync(a);
  for (const [created, dev] of [[ca, a], [cb, b], [cc, c]] as const) {
    const out = path.join(box.top, `restored-${path.basename(dev)}`);
    await cliAsync(box, ['backup', 'restore', '--repo', repo, created!.id, dev, '--output', out]);
    assert.ok(fs.readFileSync(out).equals(want), `the backup of ${path.basename(dev)} restores exactly`);
  }
  const list = JSON.parse(await cliAsync(box, ['backup', 'list', '--repo', repo, '--json'])) as Array<{ id: string }>;
  assert.deepEqual(list.map((l) => l.id).sort(), [ca!.id, cb!.id, cc.id].sort());
  await cliAsync(box, ['backup', 'verify', '--repo', repo]);
});

test('an encrypted repository in S3: no marker text, no plain sha256 of a piece, in any object or name of the bucket', { timeout: 120_000 }, async (t) => {
  const r = await rgw(t);
  if (!r) return;
  Object.assign(process.env, r.env);
  const PIECE = 64 * 1024;
  const img = markedImage(4 << 20, 1);
  const source: BackupSource = { device: '/dev/marked', sizeBytes: img.length, changed: null, why: 'test', read: async (to, at) => void img.copy(to, 0, at, at + to.length) };
  const scan = async (encryption: boolean): Promise<ReturnType<typeof plaintextIn>> => {
    const at = parseRepoLocation(r.newRepo('bdsnap/host1'));
    if (at.kind !== 's3') throw new Error('not s3');
    const store = new S3Store(at);
    // The whole bucket, not only the repository's prefix.
    const bucket = new S3Store({ ...at, prefix: '' });
    try {
      await store.createBucket();
      // brotli: its literals keep the marker readable in an unencrypted piece, as zstd's do.
      const repo = await initRepo(store, { pieceSizeBytes: PIECE, encryption, codec: 'brotli' });
      await createBackup(repo, [source]);
      const objects = await Promise.all((await bucket.list('')).map(async (o) => ({ name: o.name, bytes: await bucket.get(o.name) })));
      assert.ok(objects.some((o) => o.name.startsWith('bdsnap/host1/packs/')), `the scan sees the packs: ${objects.map((o) => o.name).join(' ')}`);
      return plaintextIn(img, PIECE, objects);
    } finally {
      store.close();
      bucket.close();
    }
  };
  const plain = await scan(false);
  assert.equal(plain.marker, true, 'the scan finds the marker in an unencrypted repository');
  assert.ok(plain.hashes.length > 0, 'the scan finds plain sha256s in an unencrypted repository');
  const enc = await scan(true);
  assert.equal(enc.marker, false, 'no marker text in the bucket of an encrypted repository');
  assert.deepEqual(enc.hashes, [], 'no plain sha256 of a piece in the bucket of an encrypted repository');
});

test('prune of a bucket whose index object is lost refuses and deletes no pack, as in a directory; once the backup is forgotten it prunes', { timeout: 120_000 }, async (t) => {
  const r = await rgw(t);
  if (!r) return;
  const store = await newS3Store(r, t, 'lost-index');
  const repo = await initRepo(store, { pieceSizeBytes: 64 * 1024 });
  const img = markedImage(1 << 20, 2);
  const source: BackupSource = { device: '/dev/a', sizeBytes: img.length, changed: null, why: 'test', read: async (to, at) => void img.copy(to, 0, at, at + to.length) };
  const first = await createBackup(repo, [source]);
  const firstImage = Buffer.from(img);
  const indexes = new Set(await store.names('index/'));
  img.fill(7, 0, 64 * 1024);
  const second = await createBackup(repo, [source]);
  assert.equal(second.newPieces, 1);
  const lost = (await store.names('index/')).filter((n) => !indexes.has(n));
  assert.equal(lost.length, 1);
  await store.delete(lost[0]!);
  const packs = (await store.names('packs/')).sort();
  await assert.rejects(repo.prune(), (e: unknown) => e instanceof BdsnapError && e.code === 'ECORRUPT' && e.message.startsWith(`cannot prune: backup ${second.id} names 1 piece no index places`));
  assert.deepEqual((await store.names('packs/')).sort(), packs, 'prune deleted no pack');
  await repo.forget([second.id]);
  assert.equal((await repo.prune()).deletedPacks, 1, 'the second backup\'s pack');
  const out = path.join(makeTempDir(t, 'bdsnap-s3-lostindex-'), 'a.img');
  await restoreBackup(repo, first.id, '/dev/a', { output: out });
  assert.ok(fs.readFileSync(out).equals(firstImage), 'the kept backup restores exactly');
});
