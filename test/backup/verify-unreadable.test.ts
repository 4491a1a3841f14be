/**
 * `backup verify` when a pack cannot be read for a reason that is not the pack's (a disk that
 * fails reads, a store that does not answer): the pieces are reported as not read, verify
 * fails, and nothing is removed from the index. Once the store reads again, verify passes and
 * the backup restores exactly. Before, such pieces were called damaged and dropped from the
 * index, so a restore of an intact backup then failed.
 *
 * The disk: ext4 on nbdkit's memory plugin behind its error filter (every read fails with EIO
 * while a trigger file exists), attached through nbdfuse and a loop device. The store: the
 * real radosgw, its gateway killed under verify.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { CleanupStack } from '../../testkit/cleanup.js';
import { fillRandom, makeTempDir, sha256, sha256File } from '../../testkit/files.js';
import { attachKernel, mountDevice } from '../../testkit/kernel.js';
import { needs } from '../../testkit/needs.js';
import { run, requireTool } from '../../testkit/process.js';
import { BDSNAP_MAIN, launchServer } from '../../testkit/server.js';
import { LocalDirStore, createBackup, restoreBackup, verifyRepository, type BackupSource } from '../../src/backup/index.js';
import { S3Store } from '../../src/repository/s3-store.js';
import { parseRepoLocation } from '../../src/repository/location.js';
import { INDEX_PREFIX } from '../../src/repository/format.js';
import { TEST_PASSWORD, initRepo, openRepo } from './helpers.js';
import { rgwForFile } from '../helpers/rgw.js';

const rgw = rgwForFile({ own: true });
const DATA_BYTES = 6 << 20;

function source(device: string, data: Buffer): BackupSource {
  return { device, sizeBytes: data.length, changed: null, why: 'test', read: async (target, offsetBytes) => void data.copy(target, 0, offsetBytes, offsetBytes + target.length) };
}

function listDir(dir: string): string[] {
  return fs.readdirSync(dir).sort();
}

test('a disk that fails reads under verify: pieces not read, none dropped; verify passes and the backup restores once it reads again', { timeout: 180_000 }, async (t) => {
  if (!needs(t, { root: true, paths: ['/dev/fuse'], tools: ['nbdkit', 'nbdfuse', 'losetup', 'fusermount3', 'mkfs.ext4', 'mount', 'umount'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup, 'bdsnap-verify-eio-');
  const trigger = path.join(dir, 'fail-reads');
  const socketPath = path.join(dir, 'nbd.sock');
  const server = await launchServer(cleanup, {
    kind: 'nbdkit', command: requireTool('nbdkit'), socketPath, exportNames: [''],
    args: ['--foreground', '--exit-with-parent', '-U', socketPath, '--filter=error', 'memory', '128M', 'error=EIO', 'error-pread-rate=100%', `error-pread-file=${trigger}`],
  });
  const attachment = await attachKernel(server.socketPath);
  cleanup.after(() => attachment.detach());
  await run('mkfs.ext4', ['-q', '-F', '-b', '4096', attachment.loopDevice]);
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  const unmount = await mountDevice(attachment.loopDevice, mnt);
  cleanup.after(() => unmount());

  const repoDir = path.join(mnt, 'repo');
  const store = new LocalDirStore(repoDir);
  const data = Buffer.alloc(DATA_BYTES);
  fillRandom(data, 11);
  const backup = await createBackup(await initRepo(store, { pieceSizeBytes: 256 << 10 }), [source('/dev/a', data)], { host: 'h' });
  store.close();
  await run('sync', []);
  const indexBefore = listDir(path.join(repoDir, INDEX_PREFIX));

  // Everything but the packs' data in the page cache, then reads from the disk fail.
  await run('sh', ['-c', 'echo 3 > /proc/sys/vm/drop_caches']);
  for (const sub of ['config', 'keys', 'backups', INDEX_PREFIX]) {
    const p = path.join(repoDir, sub);
    for (const f of fs.statSync(p).isDirectory() ? listDir(p).map((n) => path.join(p, n)) : [p]) fs.readFileSync(f);
  }
  await run('find', [repoDir, '-type', 'f'], { timeoutMs: 10_000 });
  fs.writeFileSync(trigger, '');
  const env = { ...process.env, BDSNAP_REPO_PASSWORD: TEST_PASSWORD };
  const failing = await run(process.execPath, [BDSNAP_MAIN, 'backup', 'verify', '--repo', repoDir], { allowFailure: true, timeoutMs: 60_000, env });
  fs.rmSync(trigger);
  assert.equal(failing.exitCode, 1, `verify must fail while the disk fails reads: ${failing.stdout}${failing.stderr}`);
  assert.match(failing.stderr, /pieces? could not be read \(.*\): not checked, and kept in the index; run 'bdsnap backup verify' again/);
  assert.doesNotMatch(failing.stderr, /damaged/i);
  assert.match(failing.stdout, new RegExp(`${backup.id}: NOT CHECKED \\(\\d+ pieces? not read\\)`));
  assert.deepEqual(listDir(path.join(repoDir, INDEX_PREFIX)), indexBefore, 'verify wrote no index object: nothing was dropped');

  const passing = await run(process.execPath, [BDSNAP_MAIN, 'backup', 'verify', '--repo', repoDir, '--json'], { allowFailure: true, timeoutMs: 60_000, env });
  assert.equal(passing.exitCode, 0, passing.stderr);
  const summary = JSON.parse(passing.stdout) as { ok: boolean; badPieces: unknown[]; unreadPieces: unknown[]; checkedBytes: number };
  assert.equal(summary.ok, true);
  assert.deepEqual([summary.badPieces, summary.unreadPieces], [[], []]);
  assert.equal(summary.checkedBytes, DATA_BYTES);
  const out = path.join(dir, 'restored.img');
  const reading = new LocalDirStore(repoDir);
  try {
    await restoreBackup(await openRepo(reading), backup.id, '/dev/a', { output: out });
  } finally {
    reading.close();
  }
  assert.equal(await sha256File(out), sha256(data));
});

test('the S3 gateway gone under verify: pieces not read, none dropped; verify passes and the backup restores once it is back', { timeout: 300_000 }, async (t) => {
  const r = await rgw(t);
  if (!r) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup, 'bdsnap-verify-s3-');
  Object.assign(process.env, r.env);
  const at = parseRepoLocation(r.newRepo());
  if (at.kind !== 's3') throw new Error('not s3');
  const creating = new S3Store(at);
  cleanup.after(() => creating.close());
  await creating.createBucket();
  const data = Buffer.alloc(DATA_BYTES);
  fillRandom(data, 12);
  const backup = await createBackup(await initRepo(creating, { pieceSizeBytes: 256 << 10 }), [source('/dev/a', data)], { host: 'h' });
  const indexBefore = (await creating.names(INDEX_PREFIX)).sort();

  // A store that gives up after 1 s, and a gateway killed as the pieces are about to be read.
  const impatient = new S3Store(at, { retryForMs: 1_000 });
  cleanup.after(() => impatient.close());
  let killed: Promise<void> | undefined;
  const summary = await verifyRepository(await openRepo(impatient), {
    progress: { start: () => void (killed = r.killGateway()), advance: () => {} },
  });
  assert.ok(killed, 'the pieces were about to be read');
  await killed;
  assert.equal(summary.ok, false);
  assert.deepEqual(summary.badPieces, [], 'nothing called damaged or missing');
  assert.ok(summary.unreadPieces.length > 0, 'pieces not read');
  for (const u of summary.unreadPieces) assert.equal(u.code, 'EIO', u.detail);
  assert.deepEqual(summary.backups, [{ id: backup.id, ok: false, unchecked: true, problem: summary.backups[0]!.problem }]);

  await r.startGateway();
  assert.deepEqual((await creating.names(INDEX_PREFIX)).sort(), indexBefore, 'verify wrote no index object: nothing was dropped');
  const again = await verifyRepository(await openRepo(creating));
  assert.equal(again.ok, true, JSON.stringify(again.badPieces));
  const out = path.join(dir, 'restored.img');
  await restoreBackup(await openRepo(creating), backup.id, '/dev/a', { output: out });
  assert.equal(await sha256File(out), sha256(data));
});
