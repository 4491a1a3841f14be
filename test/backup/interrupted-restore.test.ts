/**
 * A `bdsnap backup restore` in place killed half way leaves the target neither as it was nor
 * as the backup: it must not pass for whole. The daemon refuses to open such a device, naming
 * the command that finishes the restore, and the next restore into the target finishes it and
 * says so. Through the real CLI and daemon; the restore is killed by strace at its fifth
 * pwrite64 (an original kept or a range written).
 */

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { LocalDirStore, backupDevices } from '../../src/backup/index.js';
import { NbdClient } from '../../src/nbd/client.js';
import { cli, ok, sandbox, startDaemon, type Sandbox } from '../../testkit/daemon.js';
import { makeImage, sha256File } from '../../testkit/files.js';
import { needs } from '../../testkit/needs.js';
import { ServeSnapshotProvider } from '../../testkit/snapshot-provider.js';
import { passwdAndActivate } from '../service/helpers.js';
import { TEST_PASSWORD, initRepo } from './helpers.js';

const KILL_AT_FIFTH_PWRITE = ['strace', '-f', '-qq', '-o', '/dev/null', '-e', 'trace=pwrite64', '-e', 'inject=pwrite64:signal=SIGKILL:when=5'];
const MiB = 1024 * 1024;
const IMAGE_BYTES = 16 * MiB;

/**
 * A sandbox whose restores keep their journals and locks inside it, and a backup of `image`
 * (made now), which is then overwritten all over so that a restore rewrites every piece.
 */
async function backedUpImage(box: Sandbox, image: string): Promise<{ repoDir: string; id: string; backupHash: string }> {
  box.env.BDSNAP_RESTORE_DIR = path.join(box.top, 'restores');
  box.env.BDSNAP_LOCK_DIR = path.join(box.top, 'locks');
  box.env.BDSNAP_REPO_PASSWORD = TEST_PASSWORD;
  makeImage(image, IMAGE_BYTES, 'random', 31);
  const repoDir = path.join(box.top, 'repo');
  const repo = await initRepo(new LocalDirStore(repoDir));
  const { id } = await backupDevices(repo, new ServeSnapshotProvider(box.top, { copy: true }), [image]);
  const backupHash = await sha256File(image);
  makeImage(image, IMAGE_BYTES, 'random', 32);
  return { repoDir, id, backupHash };
}

test('a backup restore killed half way onto a device: the daemon refuses the device until the next restore finishes it', { timeout: 120_000 }, async (t) => {
  if (!needs(t, { root: true, tools: ['strace'] })) return;
  const box = sandbox(t);
  const image = path.join(box.top, 'c.img');
  const { repoDir, id, backupHash } = await backedUpImage(box, image);
  const before = await sha256File(image);
  await startDaemon(t, { sandbox: box, password: false });
  passwdAndActivate(box, image, TEST_PASSWORD);

  const killed = cli(box, ['backup', 'restore', '--repo', repoDir, id, image], '', KILL_AT_FIFTH_PWRITE);
  assert.equal(killed.status, null, `the restore was killed half way: ${killed.stdout}${killed.stderr}`);
  const torn = await sha256File(image);
  assert.notEqual(torn, before, 'the image was partly overwritten');
  assert.notEqual(torn, backupHash, 'the image is not the backup yet');

  // Neither a client nor a snapshot (so no backup of it) gets the torn device; the CLI says how to finish.
  const socketPath = path.join(box.runDir, 'nbd.sock');
  await assert.rejects(NbdClient.connect({ socketPath, exportName: image }), /refused/);
  const snapshot = cli(box, ['snapshot', 'create', image]);
  assert.notEqual(snapshot.status, 0, 'a snapshot of the torn device is refused');
  assert.match(snapshot.stderr, new RegExp(`${image} is half way through a restore of backup ${id} \\(started at [^,]+, interrupted\\); finish it first: bdsnap backup restore --repo ${repoDir} ${id} ${image}`));

  const again = ok(box, ['backup', 'restore', '--repo', repoDir, id, image]);
  assert.match(again, new RegExp(`^finished the interrupted restore of backup ${id} into ${image} \\(started at .*\\): every byte of it was written again from backup ${id}$`, 'm'));
  assert.equal(await sha256File(image), backupHash, 'the image is the backup, byte for byte');
  assert.deepEqual(fs.readdirSync(box.env.BDSNAP_RESTORE_DIR!), [], 'nothing of the restores is left');
  const client = await NbdClient.connect({ socketPath, exportName: image });
  await client.close();
});

test('a backup restore killed half way onto an existing --output file: the next restore into it finishes it and says so', { timeout: 120_000 }, async (t) => {
  if (!needs(t, { root: true, tools: ['strace'] })) return;
  const box = sandbox(t);
  const image = path.join(box.top, 'c.img');
  const { repoDir, id, backupHash } = await backedUpImage(box, image);
  const out = path.join(box.top, 'existing.img');
  makeImage(out, 4 * MiB, 'random', 33);
  const before = await sha256File(out);

  const killed = cli(box, ['backup', 'restore', '--repo', repoDir, id, image, '--output', out], '', KILL_AT_FIFTH_PWRITE);
  assert.equal(killed.status, null, `the restore was killed half way: ${killed.stdout}${killed.stderr}`);
  const torn = await sha256File(out);
  assert.notEqual(torn, before, 'the file was partly overwritten');
  assert.notEqual(torn, backupHash, 'the file is not the backup yet');

  const again = ok(box, ['backup', 'restore', '--repo', repoDir, id, image, '--output', out]);
  assert.match(again, new RegExp(`^finished the interrupted restore of backup ${id} into ${out} \\(started at .*\\)`, 'm'));
  assert.equal(await sha256File(out), backupHash, 'the file is the backup, byte for byte');
  assert.deepEqual(fs.readdirSync(box.env.BDSNAP_RESTORE_DIR!), [], 'nothing of the restores is left');
});
