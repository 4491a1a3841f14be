/**
 * An instant restore outlives a repair of its repository: a piece of the backup is damaged
 * while the restore runs, the copy and a client's read fail on it, `backup verify` drops it and
 * the next `backup create` of the device stores it again; the same running daemon then finds it
 * and ends with the target exact, without a restart. When the backup itself is removed meanwhile
 * (`backup forget` refuses it, so behind bdsnap's back), the restore does not take the repaired pieces: it goes on reporting why, and the
 * slot stays unwritten. A prune meanwhile is refused, saying that an instant restore reads the
 * repository. All through the real daemon and CLI; and the reload itself refuses a
 * manifest that names other pieces than it did.
 */

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { randomBytes } from 'node:crypto';
import { createBackup, type BackupSource } from '../../src/backup/index.js';
import { NbdClient } from '../../src/nbd/client.js';
import { openBackupDevices } from '../../src/repository/backup-device.js';
import { expandSlots, manifestObject } from '../../src/repository/format.js';
import { LocalDirStore } from '../../src/repository/object-store.js';
import { Repository } from '../../src/repository/repository.js';
import { TEST_REPO_PASSWORD } from '../../testkit/daemon.js';
import { makeTempDir } from '../../testkit/files.js';
import { flipByteAt, initRepo, pieceBytes } from '../backup/helpers.js';
import { instantRestoreOfImage, waitForRestore, type InstantRestoreSetup } from '../helpers/instant-restore.js';

const MiB = 1024 * 1024;

/**
 * A daemon, a repository with a backup of a 16 MiB image, an instant restore of it into a new
 * file, and the slot whose piece is then damaged (the last one: the copy, held to 4 MiB/s,
 * reaches it after the damage).
 */
async function restoreWithDamage(t: TestContext): Promise<InstantRestoreSetup & { slotAt: number; slotBytes: number }> {
  const setup = await instantRestoreOfImage(t, { rate: '4M', imageBytes: 16 * MiB, seed: 7 });
  const { repoDir, id } = setup;
  const repo = await Repository.open(new LocalDirStore(repoDir), { password: () => TEST_REPO_PASSWORD });
  const manifest = await repo.manifest(id);
  const slots = expandSlots(manifest.devices[0]!, manifest.pieceSizeBytes);
  const last = slots.length - 1;
  const at = await pieceBytes(repo, repoDir, slots[last]!);
  flipByteAt(at.file, at.offsetBytes + Math.floor(at.lengthBytes / 2));
  return { ...setup, slotAt: last * manifest.pieceSizeBytes, slotBytes: manifest.pieceSizeBytes };
}

test('a running instant restore picks up a piece that verify dropped and the next backup stored again, and ends exact without a restart', { timeout: 180_000 }, async (t) => {
  const { daemon, repoDir, image, out, slotAt, slotBytes } = await restoreWithDamage(t);
  // The restore holds the repository as a backup does, and a prune says so.
  const prune = await daemon.cli(['backup', 'prune', '--repo', repoDir], undefined, true);
  assert.notEqual(prune.exitCode, 0, 'prune is refused while an instant restore reads the repository');
  assert.match(prune.stderr, /an instant restore reads .*; prune once it is complete \('bdsnap status' on .* shows its progress\)\n$/);
  assert.doesNotMatch(prune.stderr, /backup is being created/);
  const failing = await waitForRestore(daemon, out, 'the copy reports the damaged piece', (r) => r?.state === 'running' && r.error !== null);
  t.diagnostic(`while damaged: ${failing?.error}`);
  assert.equal(failing?.secondsLeft, null, 'no time left is promised while the copy cannot have a piece');
  const client = await NbdClient.connect({ socketPath: path.join(daemon.runDir, 'nbd.sock'), exportName: out });
  try {
    await assert.rejects(client.read(Buffer.alloc(4096), slotAt), 'a client read of the damaged piece fails');
    // The repair: verify drops the damaged piece; the next backup of the device stores it again.
    const verify = await daemon.cli(['backup', 'verify', '--repo', repoDir], undefined, true);
    assert.notEqual(verify.exitCode, 0, 'verify reports the damaged piece');
    await daemon.cli(['backup', 'create', image, '--repo', repoDir]);
    const expected = fs.readFileSync(image);
    const got = Buffer.alloc(slotBytes);
    await client.read(got, slotAt);
    assert.ok(got.equals(expected.subarray(slotAt, slotAt + slotBytes)), 'a client read of the repaired piece gives the backup\'s data');
  } finally {
    await client.close();
  }
  const done = await waitForRestore(daemon, out, 'the restore completes once the piece is repaired', (r) => r === undefined || r.state === 'complete');
  assert.ok(done === undefined || done.error === null, `no error left: ${JSON.stringify(done)}`);
  assert.ok(daemon.server.running(), 'the same daemon, never restarted');
  assert.ok(fs.readFileSync(out).equals(fs.readFileSync(image)), 'the target ends equal to the backup');
});

test('a running instant restore whose backup was removed does not take repaired pieces: it reports why and writes nothing for them', { timeout: 180_000 }, async (t) => {
  const { daemon, repoDir, id, image, out, slotAt, slotBytes } = await restoreWithDamage(t);
  await waitForRestore(daemon, out, 'the copy reports the damaged piece', (r) => r?.state === 'running' && r.error !== null);
  const forget = await daemon.cli(['backup', 'forget', '--repo', repoDir, id], undefined, true);
  assert.notEqual(forget.exitCode, 0, 'forget of the backup under restore is refused');
  // Removed all the same: by hand, or by a bdsnap too old to know the restore's lock.
  await new LocalDirStore(repoDir).delete(manifestObject(id));
  await daemon.cli(['backup', 'verify', '--repo', repoDir], undefined, true);
  await daemon.cli(['backup', 'create', image, '--repo', repoDir]);
  const stuck = await waitForRestore(daemon, out, 'the restore says its backup is gone', (r) => /no backup/.test(r?.error ?? ''));
  t.diagnostic(`status says: ${stuck?.error}`);
  assert.equal(stuck?.state, 'running', 'it keeps trying rather than ending or taking other data');
  const client = await NbdClient.connect({ socketPath: path.join(daemon.runDir, 'nbd.sock'), exportName: out });
  try {
    await assert.rejects(client.read(Buffer.alloc(4096), slotAt), 'a client read of the damaged piece still fails');
  } finally {
    await client.close();
  }
  const fd = fs.openSync(out, 'r');
  try {
    const slot = Buffer.alloc(slotBytes);
    fs.readSync(fd, slot, 0, slotBytes, slotAt);
    assert.ok(slot.equals(Buffer.alloc(slotBytes)), 'the slot of the damaged piece was never written');
  } finally {
    fs.closeSync(fd);
  }
});

test('a reload of a backup\'s source refuses a manifest that now names other pieces, and keeps reading the pieces it named', { timeout: 60_000 }, async (t) => {
  const dir = makeTempDir(t, 'bdsnap-instant-reload-');
  const image = randomBytes(2 * MiB);
  // Unencrypted: whoever can write the directory can replace a manifest.
  const repo = await initRepo(new LocalDirStore(path.join(dir, 'repo')), { encryption: false });
  const source: BackupSource = { device: '/dev/reload', sizeBytes: image.length, changed: null, why: 'test', read: async (to, offset) => void image.copy(to, 0, offset, offset + to.length) };
  const { id } = await createBackup(repo, [source]);
  const opened = await openBackupDevices(repo, id);
  try {
    await opened.refresh();
    const manifest = await repo.manifest(id);
    const pieces = [...manifest.devices[0]!.pieces];
    [pieces[0], pieces[1]] = [pieces[1]!, pieces[0]!];
    await repo.putManifest({ ...manifest, devices: [{ ...manifest.devices[0]!, pieces }] });
    await assert.rejects(opened.refresh(), (err: NodeJS.ErrnoException) => err.code === 'EMISMATCH' && /no longer names the pieces/.test(err.message));
    const got = Buffer.alloc(image.length);
    await opened.devices[0]!.device.read(got, 0);
    assert.ok(got.equals(image), 'the device still reads the backup as it was opened');
    await repo.forget([id]);
    await assert.rejects(opened.refresh(), (err: NodeJS.ErrnoException) => err.code === 'ENOENT');
  } finally {
    await opened.close();
  }
});
