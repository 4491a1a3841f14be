/** `bdsnap backup ...` as a real process: exit codes, stdout, stderr, --json. */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { LocalDirStore, Repository, backupDevices } from '../../src/backup/index.js';
import { TEST_REPO_PASSWORD, cli, ok, sandbox, startDaemon } from '../../testkit/daemon.js';
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
  assertFails(r, new RegExp(`^bdsnap: 1 damaged backup: ${first.id}; run 'bdsnap backup create --repo ${repoDir} ${image}' .*, or forget the backup with 'bdsnap backup forget --repo ${repoDir} ${first.id}'$`, 'm'));
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

test('a flipped byte and a lost pack: verify and restore, before and after verify, call each piece by the same word, with its pack, and say what to do', { timeout: 120_000 }, async (t) => {
  const box = sandbox(t, 'bdsnap-backup-words-');
  box.env.BDSNAP_RESTORE_DIR = path.join(box.top, 'restores');
  box.env.BDSNAP_LOCK_DIR = path.join(box.top, 'locks');
  const image = makeImage(path.join(box.top, 'disk.img'), 8 * MiB, 'random', 11);
  const repoDir = path.join(box.top, 'repo');
  await startDaemon(t, { sandbox: box, password: false });
  ok(box, ['backup', 'init', '--repo', repoDir, '--pack-size', '1M']);
  const { id } = JSON.parse(ok(box, ['backup', 'create', image, '--repo', repoDir, '--json'])) as { id: string };
  const repo = await Repository.open(new LocalDirStore(repoDir), { password: () => TEST_REPO_PASSWORD });
  const pieces = (await repo.manifest(id)).devices[0]!.pieces.filter((p): p is string => typeof p === 'string');
  let index = await repo.pieceIndex();
  const packOf = (hash: string): string => index.get(hash)!.object;
  const victim = pieces[2]!;
  const victimPack = packOf(victim);
  const at = index.get(victim)!;
  flipByteAt(path.join(repoDir, at.object), at.offsetBytes + Math.floor(at.lengthBytes! / 2));

  const advice = `'bdsnap backup verify --repo ${repoDir} ${id}' lists every damaged or missing piece of it; then run 'bdsnap backup create --repo ${repoDir} ${image}' \\(it stores again the pieces the device still holds, which mends the backup\\), or forget the backup with 'bdsnap backup forget --repo ${repoDir} ${id}'`;
  const verifyAdvice = `run 'bdsnap backup create --repo ${repoDir} ${image}' \\(it stores again the pieces the device still holds, which mends the backup\\), or forget the backup with 'bdsnap backup forget --repo ${repoDir} ${id}'`;
  const refused = (args: string[], pattern: string): void => {
    const r = cli(box, ['backup', 'restore', '--repo', repoDir, id, image, ...args]);
    assert.equal(r.status, 1, r.stderr);
    assert.equal(r.stderr.trim().split('\n').length, 1, `one line on stderr: ${r.stderr}`);
    assert.match(r.stderr, new RegExp(`^bdsnap: cannot restore backup ${id}: ${pattern}$`, 'm'));
  };
  const verified = (lines: string[]): void => {
    const r = cli(box, ['backup', 'verify', '--repo', repoDir, id]);
    assert.equal(r.status, 1, r.stderr);
    for (const line of lines) assert.match(r.stdout, new RegExp(`^${line}$`, 'm'));
    assert.match(r.stderr, new RegExp(`^bdsnap: 1 damaged backup: ${id}; ${verifyAdvice}$`, 'm'));
  };
  const out = (name: string): string[] => ['--output', path.join(box.top, name)];
  // What the messages say to do mends the backup (the device still holds every piece): it restores exactly.
  const mend = async (name: string): Promise<void> => {
    ok(box, ['backup', 'create', image, '--repo', repoDir]);
    ok(box, ['backup', 'verify', '--repo', repoDir, id]);
    ok(box, ['backup', 'restore', '--repo', repoDir, id, image, ...out(name)]);
    assert.equal(await sha256File(path.join(box.top, name)), await sha256File(image));
  };

  // The flipped byte: damaged, in its pack, whoever looks and whenever (verify drops it from the index).
  refused(out('a.img'), `piece ${victim} is damaged: it fails authentication [^;]*, in pack ${victimPack}; the partly written \\S+ was removed; ${advice}`);
  verified([`${id}: DAMAGED \\(1 damaged piece\\)`, `piece ${victim}: damaged, used by ${id} \\(in pack ${victimPack}\\)`]);
  refused(out('b.img'), `1 of its pieces is damaged \\(${victim}; in pack ${victimPack}; removed from the index by an earlier verify\\); nothing was written; ${advice}`);
  verified([`${id}: DAMAGED \\(1 damaged piece\\)`, `piece ${victim}: damaged, used by ${id} \\(in pack ${victimPack}; removed from the index by an earlier verify\\)`]);
  await mend('c.img');

  // A lost pack: its pieces are missing, with the pack named, before verify and after.
  index = await repo.reloadPieceIndex();
  const lostPack = packOf(pieces.find((h) => packOf(h) !== victimPack && packOf(h) !== packOf(victim))!);
  const lost = pieces.filter((h) => packOf(h) === lostPack);
  fs.rmSync(path.join(repoDir, lostPack));
  refused(out('d.img'), `piece (${lost.join('|')}) is missing: pack ${lostPack} is not in ${repoDir}; the partly written \\S+ was removed; ${advice}`);
  verified([`${id}: DAMAGED \\(${lost.length} missing pieces\\)`, ...lost.map((h) => `piece ${h}: missing, used by ${id} \\(pack ${lostPack} is gone\\)`)]);
  refused(out('e.img'), `${lost.length} of its pieces are missing \\([^;]+; pack ${lostPack} is gone; removed from the index by an earlier verify\\); nothing was written; ${advice}`);
  verified(lost.map((h) => `piece ${h}: missing, used by ${id} \\(pack ${lostPack} is gone; removed from the index by an earlier verify\\)`));
  await mend('f.img');
});
