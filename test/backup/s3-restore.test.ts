/**
 * Restore from a repository in S3 (a real radosgw): each pack's pieces are fetched in a few
 * range GETs, each piece once, and the image comes back exactly; a damaged piece still refuses
 * the restore before the target is touched, and the spool of fetched pieces leaves nothing.
 */

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { makeTempDir } from '../../testkit/files.js';
import { rgwForFile, type Rgw } from '../helpers/rgw.js';
import { parseRepoLocation, type RepoLocation } from '../../src/repository/location.js';
import { PACKS_PREFIX } from '../../src/repository/format.js';
import { S3Store } from '../../src/repository/s3-store.js';
import { createBackup, restoreBackup, type BackupSource } from '../../src/backup/index.js';
import { CountingStore, initRepo, openRepo } from './helpers.js';

const rgw = rgwForFile();
const MiB = 1024 * 1024;
const PIECE = 256 * 1024;

/** Random data, a run of zeroes and one piece repeated: every kind of slot. */
function mixedImage(): Buffer {
  const repeated = randomBytes(PIECE);
  return Buffer.concat([randomBytes(20 * MiB), Buffer.alloc(2 * MiB), repeated, repeated, repeated, randomBytes(3 * PIECE + 4096)]);
}

/** A new bucket holding one backup of `image` as device `/dev/mixed`; its id and location. */
async function backedUp(r: Rgw, image: Buffer): Promise<{ id: string; at: RepoLocation & { kind: 's3' } }> {
  Object.assign(process.env, r.env);
  const at = parseRepoLocation(r.newRepo('restore'));
  if (at.kind !== 's3') throw new Error('not s3');
  const store = new S3Store(at);
  try {
    await store.createBucket();
    const repo = await initRepo(store);
    const source: BackupSource = { device: '/dev/mixed', sizeBytes: image.length, changed: null, why: 'test', read: async (to, offset) => void image.copy(to, 0, offset, offset + to.length) };
    const summary = await createBackup(repo, [source]);
    return { id: summary.id, at };
  } finally {
    store.close();
  }
}

test('a restore from S3 fetches each pack\'s pieces in a few range GETs, each piece once, and restores exactly', { timeout: 120_000 }, async (t) => {
  const r = await rgw(t);
  if (!r) return;
  const image = mixedImage();
  const { id, at } = await backedUp(r, image);
  const dir = makeTempDir(t, 'bdsnap-s3-restore-');
  const s3 = new S3Store(at);
  const counting = new CountingStore(s3);
  try {
    const repo = await openRepo(counting);
    const opened = counting.gets;
    const out = path.join(dir, 'restored.img');
    await restoreBackup(repo, id, '/dev/mixed', { output: out });
    assert.ok(fs.readFileSync(out).equals(image), 'the image restores exactly');
    const distinct = Math.ceil(20 * MiB / PIECE) + 1 + 4;
    const gets = counting.gets - opened;
    // The index and the manifest, then a GET per few MiB of packs; one GET per piece was 2 x distinct.
    assert.ok(gets <= 4 + Math.ceil(image.length / (4 * MiB)) + (await counting.names(PACKS_PREFIX)).length, `${gets} GETs for ${distinct} distinct pieces`);
  } finally {
    s3.close();
  }
});

test('a damaged piece in S3: restore onto an existing file refuses before writing a byte; the spool leaves nothing behind; a new file is not left', { timeout: 120_000 }, async (t) => {
  const r = await rgw(t);
  if (!r) return;
  const image = mixedImage();
  const { id, at } = await backedUp(r, image);
  const dir = makeTempDir(t, 'bdsnap-s3-restore-');
  const store = new S3Store(at);
  const tmp = path.join(dir, 'tmp');
  fs.mkdirSync(tmp);
  const savedTmp = process.env.TMPDIR;
  try {
    // One byte of the last pack flipped: the pieces before it in that pack stay good.
    const packs = (await store.list(PACKS_PREFIX)).sort((a, b) => a.name.localeCompare(b.name));
    const pack = packs[packs.length - 1]!;
    const bytes = await store.get(pack.name);
    bytes[bytes.length - 100]! ^= 0x5a;
    await store.put(pack.name, bytes);
    const target = path.join(dir, 'existing.img');
    const before = randomBytes(image.length);
    fs.writeFileSync(target, before);
    process.env.TMPDIR = tmp;
    const repo = await openRepo(store);
    await assert.rejects(restoreBackup(repo, id, '/dev/mixed', { output: target }), /cannot restore backup .*nothing was written/);
    assert.ok(fs.readFileSync(target).equals(before), 'the existing file is untouched');
    assert.deepEqual(fs.readdirSync(tmp), [], 'no spool is left in TMPDIR');
    // A new file is written as the pieces come (no spool): the damaged one is named, and the
    // partly written file, which never had the name, is removed.
    const outDir = path.join(dir, 'out');
    fs.mkdirSync(outDir);
    await assert.rejects(restoreBackup(repo, id, '/dev/mixed', { output: path.join(outDir, 'new.img') }), (err: Error) => {
      assert.match(err.message, /^cannot restore backup \S+: piece [0-9a-f]+ is damaged: [^;]+; the partly written \S+\/\.new\.img\.bdsnap-restore-[0-9a-f]{8} was removed; 'bdsnap backup verify /);
      return true;
    });
    assert.deepEqual(fs.readdirSync(outDir), [], 'no output file, temporary or not, is left');
    assert.deepEqual(fs.readdirSync(tmp), [], 'nothing was spooled');
  } finally {
    if (savedTmp === undefined) delete process.env.TMPDIR;
    else process.env.TMPDIR = savedTmp;
    store.close();
  }
});
