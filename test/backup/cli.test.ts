/** `bdsnap backup ...` as a real process: exit codes, stdout, stderr, --json. */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { LocalDirStore, backupDevices } from '../../src/backup/index.js';
import { makeImage, makeTempDir, sha256File } from '../../testkit/files.js';
import { run, type RunResult } from '../../testkit/process.js';
import { BDSNAP_MAIN } from '../../testkit/server.js';
import { TEST_PASSWORD, flipByteAt, openRepo, pieceBytes } from './helpers.js';
import { ServeSnapshotProvider } from '../../testkit/snapshot-provider.js';

// The children find the repository password where a user would put it.
process.env.BDSNAP_REPO_PASSWORD = TEST_PASSWORD;

const MiB = 1024 * 1024;

function bdsnap(...args: string[]): Promise<RunResult> {
  return run(process.execPath, [BDSNAP_MAIN, 'backup', ...args], { allowFailure: true, timeoutMs: 60_000 });
}

function assertFails(r: RunResult, pattern: RegExp): void {
  assert.equal(r.exitCode, 1, `${r.command}: ${r.stderr}`);
  assert.equal(r.stderr.trim().split('\n').length, 1, `one line on stderr: ${r.stderr}`);
  assert.match(r.stderr, pattern);
}

test('backup CLI: init, list, verify, restore, forget, prune; clear failures', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-backup-cli-');
  const repoDir = path.join(dir, 'repo');
  const image = path.join(dir, 'disk.img');
  makeImage(image, 8 * MiB, 'mixed', 7);

  let r = await bdsnap('init', '--repo', repoDir);
  assert.equal(r.exitCode, 0, r.stderr);
  assert.match(r.stdout, /initialized backup repository/);
  assertFails(await bdsnap('init', '--repo', repoDir), /^bdsnap: .* is already a backup repository$/m);
  assertFails(await bdsnap('list', '--repo', path.join(dir, 'nothing')), /is not a backup repository/);
  r = await bdsnap('list', '--repo', repoDir, '--json');
  assert.deepEqual(JSON.parse(r.stdout), []);
  assert.equal((await bdsnap('list', '--repo', repoDir)).stdout, 'no backups\n');

  // No daemon: create says so in one line.
  assertFails(await bdsnap('create', image, '--repo', repoDir, '--run-dir', path.join(dir, 'no-daemon')), /backup create takes snapshots through the daemon: the bdsnap daemon is not running/);

  // Backups made through the library (the daemon's snapshots are not there yet).
  const repo = await openRepo(new LocalDirStore(repoDir));
  const provider = new ServeSnapshotProvider(dir);
  const first = await backupDevices(repo, provider, [image]);
  provider.write(image, 4096, Buffer.alloc(4096, 1));
  const second = await backupDevices(repo, provider, [image]);

  r = await bdsnap('list', '--repo', repoDir, '--json');
  const listed = JSON.parse(r.stdout) as Array<{ id: string; devices: Array<{ kind: string }> }>;
  assert.deepEqual(listed.map((b) => b.id), [first.id, second.id]);
  assert.deepEqual(listed.map((b) => b.devices[0]!.kind), ['full', 'incremental']);
  r = await bdsnap('list', '--repo', repoDir);
  assert.match(r.stdout, new RegExp(`${second.id}\\s+${image}\\s+8 MiB\\s+incremental\\s+${first.id}`));

  r = await bdsnap('verify', '--repo', repoDir);
  assert.equal(r.exitCode, 0, r.stderr);
  assert.equal(r.stderr, '', 'no progress bar when not on a terminal');
  assert.match(r.stdout, new RegExp(`${first.id}: ok\\n${second.id}: ok`));

  const out = path.join(dir, 'out.img');
  r = await bdsnap('restore', '--repo', repoDir, second.id, image, '--output', out, '--json');
  assert.equal(r.exitCode, 0, r.stderr);
  assert.equal(JSON.parse(r.stdout).sizeBytes, 8 * MiB);
  assert.equal(await sha256File(out), await sha256File(image));
  assertFails(await bdsnap('restore', '--repo', repoDir, second.id, '/dev/null'), /has no device \/dev\/null/);
  assertFails(await bdsnap('restore', '--repo', repoDir, 'not-an-id', image, '--output', out), /is not a backup id/);
  assertFails(await bdsnap('restore', '--repo', repoDir, first.id, image, '--output', '/dev/null'), /not a regular file; refusing/);

  // Damage a piece of the first backup only: verify names it and exits 1.
  const m1 = await repo.manifest(first.id);
  const m2 = await repo.manifest(second.id);
  const inSecond = new Set(m2.devices[0]!.pieces);
  const victim = m1.devices[0]!.pieces.find((p): p is string => typeof p === 'string' && !inSecond.has(p))!;
  const at = await pieceBytes(repo, repoDir, victim);
  flipByteAt(at.file, at.offsetBytes + Math.floor(at.lengthBytes / 2));
  r = await bdsnap('verify', '--repo', repoDir);
  assertFails(r, new RegExp(`^bdsnap: 1 damaged backup: ${first.id}$`, 'm'));
  assert.match(r.stdout, new RegExp(`${first.id}: DAMAGED \\(1 damaged piece\\)`));
  assert.match(r.stdout, new RegExp(`piece ${victim}: damaged, used by ${first.id}`));
  r = await bdsnap('verify', '--repo', repoDir, second.id, '--json');
  assert.equal(r.exitCode, 0);
  assert.equal(JSON.parse(r.stdout).ok, true);

  r = await bdsnap('forget', '--repo', repoDir, first.id);
  assert.equal(r.exitCode, 0, r.stderr);
  assertFails(await bdsnap('forget', '--repo', repoDir, first.id), /there is no backup/);
  r = await bdsnap('prune', '--repo', repoDir, '--json');
  assert.equal(r.exitCode, 0, r.stderr);
  const pruned = JSON.parse(r.stdout) as { deletedPieces: number; backups: number };
  assert.equal(pruned.backups, 1);
  // The damaged piece was removed by verify already; prune deletes the rest only the first had.
  const onlyFirst = new Set(m1.devices[0]!.pieces.filter((p): p is string => typeof p === 'string' && !inSecond.has(p) && p !== victim));
  assert.equal(pruned.deletedPieces, onlyFirst.size);
  assert.equal((await (await openRepo(new LocalDirStore(repoDir))).storedPieceNames()).has(victim), false);
  r = await bdsnap('verify', '--repo', repoDir);
  assert.equal(r.exitCode, 0, r.stderr);
});
