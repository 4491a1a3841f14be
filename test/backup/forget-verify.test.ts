/**
 * `backup forget` by policy and `backup list --host` as real processes over backups of several
 * hosts, and `backup verify --read-data-subset N/T`: the T slices read every piece exactly once,
 * and a damaged piece is found by its slice alone. `backup prune` refuses, deleting no pack,
 * while kept backups name pieces no index places.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { LocalDirStore, createBackup, inDataSubset, parseDataSubset, verifyRepository, type BackupSource } from '../../src/backup/index.js';
import { manifestObject, packObject, randomObjectName } from '../../src/repository/format.js';
import type { GetOptions } from '../../src/repository/object-store.js';
import { fillRandom, makeTempDir } from '../../testkit/files.js';
import { run, type RunResult } from '../../testkit/process.js';
import { BDSNAP_MAIN } from '../../testkit/server.js';
import { TEST_PASSWORD, flipByteAt, initRepo, pieceBytes } from './helpers.js';

const KiB = 1024;

function bdsnap(...args: string[]): Promise<RunResult> {
  return run(process.execPath, [BDSNAP_MAIN, 'backup', ...args], { allowFailure: true, timeoutMs: 60_000, env: { ...process.env, BDSNAP_REPO_PASSWORD: TEST_PASSWORD } });
}

function assertFails(r: RunResult, pattern: RegExp): void {
  assert.equal(r.exitCode, 1, `${r.command}: ${r.stderr}`);
  assert.equal(r.stderr.trim().split('\n').length, 1, `one line on stderr: ${r.stderr}`);
  assert.match(r.stderr, pattern);
}

/** A device held in memory, so these tests need no daemon. */
function source(device: string, data: Buffer): BackupSource {
  return { device, sizeBytes: data.length, changed: null, why: 'test', read: async (target, offsetBytes) => void data.copy(target, 0, offsetBytes, offsetBytes + target.length) };
}

function randomData(bytes: number, seed: number): Buffer {
  const b = Buffer.alloc(bytes);
  fillRandom(b, seed);
  return b;
}

/** Records which pieces are read: a piece is a byte range of a pack, named here as 'object@offset'. */
/** Records the byte ranges of packs read (a read may cover several pieces). */
class ReadRecordingStore extends LocalDirStore {
  readonly packReads: Array<{ object: string; offsetBytes: number; lengthBytes: number }> = [];
  override get(name: string, options?: GetOptions): Promise<Buffer> {
    if (name.startsWith('packs/') && options && 'offsetBytes' in options) this.packReads.push({ object: name, ...options });
    return super.get(name, options);
  }
}

test('verify --read-data-subset: T slices read every piece once; a damaged piece is found by its slice alone', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-subset-');
  const repoDir = path.join(dir, 'repo');
  const store = new ReadRecordingStore(repoDir);
  const repo = await initRepo(store, { pieceSizeBytes: 64 * KiB });
  await createBackup(repo, [source('/dev/a', randomData(4096 * KiB, 1))], { host: 'web1' });
  await createBackup(repo, [source('/dev/a', randomData(2048 * KiB, 2)), source('/dev/b', randomData(1024 * KiB, 3))], { host: 'web2' });
  const all = [...(await repo.storedPieceNames())].sort();
  assert.equal(all.length, 64 + 32 + 16);
  const index = await repo.pieceIndex();
  const where = (id: string): string => `${index.get(id)!.object}@${index.get(id)!.offsetBytes}`;
  /** The pieces the recorded reads covered, each as `where` names it. */
  const piecesRead = (): string[] => store.packReads.flatMap((r) => all.filter((id) => {
    const at = index.get(id)!;
    return at.object === r.object && at.offsetBytes >= r.offsetBytes && at.offsetBytes + at.lengthBytes! <= r.offsetBytes + r.lengthBytes;
  }).map(where));
  assert.equal(new Set(all.map(where)).size, all.length, 'each piece has its own place');
  assert.ok(new Set(all.map((id) => index.get(id)!.object)).size < all.length, 'pieces share packs, so slices are over pieces, not packs');

  const T = 5;
  const seen = new Map<string, number>();
  for (let n = 1; n <= T; n++) {
    store.packReads.length = 0;
    const summary = await verifyRepository(repo, { subset: { n, total: T } });
    assert.equal(summary.ok, true);
    assert.equal(summary.subset, `${n}/${T}`);
    // Only the slice's pieces are read: reads are coalesced, but never across a piece of another slice.
    const read = piecesRead();
    assert.equal(summary.checkedPieces, read.length);
    assert.ok(summary.checkedPieces > 0, `slice ${n}/${T} is not empty`);
    for (const name of read) seen.set(name, (seen.get(name) ?? 0) + 1);
    // The same slice on the next run.
    const again = await verifyRepository(repo, { subset: { n, total: T } });
    assert.equal(again.checkedPieces, summary.checkedPieces);
  }
  assert.deepEqual([...seen.keys()].sort(), all.map(where).sort(), 'every piece read by some slice');
  assert.deepEqual([...new Set(seen.values())], [1], 'by exactly one slice');

  // Damage one piece: every other slice passes; its own finds it and the command fails.
  const victim = all[17]!;
  const at = await pieceBytes(repo, repoDir, victim);
  flipByteAt(at.file, at.offsetBytes + Math.floor(at.lengthBytes / 2));
  const owner = [1, 2, 3, 4, 5].find((n) => inDataSubset(victim, { n, total: T }))!;
  for (let n = 1; n <= T; n++) {
    if (n === owner) continue;
    const r = await bdsnap('verify', '--repo', repoDir, '--read-data-subset', `${n}/${T}`);
    assert.equal(r.exitCode, 0, `slice ${n}: ${r.stdout}${r.stderr}`);
    assert.match(r.stdout, new RegExp(`checked \\(slice ${n}/${T}\\)`));
  }
  const r = await bdsnap('verify', '--repo', repoDir, '--read-data-subset', `${owner}/${T}`, '--json');
  assert.equal(r.exitCode, 1, r.stderr);
  const summary = JSON.parse(r.stdout) as { badPieces: Array<{ hash: string; problem: string }> };
  assert.deepEqual(summary.badPieces.map((b) => [b.hash, b.problem]), [[victim, 'damaged']]);

  assertFails(await bdsnap('verify', '--repo', repoDir, '--read-data-subset', '0/3'), /--read-data-subset takes N\/T/);
  assertFails(await bdsnap('verify', '--repo', repoDir, '--read-data-subset', '4/3'), /--read-data-subset takes N\/T/);
  assert.throws(() => parseDataSubset('1/0'), { code: 'EINVAL' });
  assert.deepEqual(parseDataSubset('7/7'), { n: 7, total: 7 });
});

test('backup forget by policy: per host and device set, --dry-run prints the plan, --host limits it; list --host', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-forget-');
  const repoDir = path.join(dir, 'repo');
  const repo = await initRepo(new LocalDirStore(repoDir), { pieceSizeBytes: 64 * KiB });
  const a = randomData(512 * KiB, 1);
  const b = randomData(256 * KiB, 2);
  const made: Record<string, string[]> = { web1: [], web2: [], 'web1-ab': [], old: [] };
  for (let i = 0; i < 3; i++) made.web1!.push((await createBackup(repo, [source('/dev/a', a)], { host: 'web1' })).id);
  for (let i = 0; i < 2; i++) made.web2!.push((await createBackup(repo, [source('/dev/a', a)], { host: 'web2' })).id);
  made['web1-ab']!.push((await createBackup(repo, [source('/dev/a', a), source('/dev/b', b)], { host: 'web1' })).id);
  // A backup from before hosts were recorded: its manifest has no host.
  for (let i = 0; i < 2; i++) {
    const id = (await createBackup(repo, [source('/dev/a', a)], { host: 'x' })).id;
    const m = await repo.manifest(id);
    delete m.host;
    await repo.putManifest(m);
    made.old!.push(id);
  }
  const times = (await repo.backups()).map((r) => r.manifest!.startTime);
  assert.equal(new Set(times).size, times.length, 'distinct start times, so "newest" is one backup');

  // list --host and --json's host.
  let r = await bdsnap('list', '--repo', repoDir, '--host', 'web2', '--json');
  assert.equal(r.exitCode, 0, r.stderr);
  assert.deepEqual((JSON.parse(r.stdout) as Array<{ id: string; host: string }>).map((x) => [x.id, x.host]), made.web2!.map((id) => [id, 'web2']));
  r = await bdsnap('list', '--repo', repoDir, '--json');
  assert.deepEqual((JSON.parse(r.stdout) as Array<{ host: string | null }>).map((x) => x.host), ['web1', 'web1', 'web1', 'web2', 'web2', 'web1', null, null]);

  // Dry run: one group per host and device set; nothing removed.
  r = await bdsnap('forget', '--repo', repoDir, '--keep-last', '1', '--dry-run', '--json');
  assert.equal(r.exitCode, 0, r.stderr);
  const plan = JSON.parse(r.stdout) as { dryRun: boolean; groups: Array<{ host: string | null; devices: string[]; keep: Array<{ id: string; reasons: string[] }>; remove: Array<{ id: string }> }> };
  assert.equal(plan.dryRun, true);
  assert.deepEqual(plan.groups.map((g) => [g.host, g.devices, g.keep.map((k) => [k.id, k.reasons]), g.remove.map((x) => x.id)]), [
    [null, ['/dev/a'], [[made.old![1], ['last backup']]], [made.old![0]]],
    ['web1', ['/dev/a'], [[made.web1![2], ['last backup']]], [made.web1![1], made.web1![0]]],
    ['web1', ['/dev/a', '/dev/b'], [[made['web1-ab']![0], ['last backup']]], []],
    ['web2', ['/dev/a'], [[made.web2![1], ['last backup']]], [made.web2![0]]],
  ]);
  assert.equal((await repo.backupIds()).length, 8, 'a dry run removes nothing');
  r = await bdsnap('forget', '--repo', repoDir, '--keep-last', '1', '--dry-run');
  assert.match(r.stdout, new RegExp(`host web1, devices /dev/a: keep 1, remove 2\\n\\s+ACTION\\s+ID\\s+TIME\\s+REASONS\\n\\s+keep\\s+${made.web1![2]}\\s+\\S+\\s+last backup\\n\\s+would remove\\s+${made.web1![1]}`));
  assert.match(r.stdout, /would remove 4 backups \(dry run: nothing removed\)\n$/);

  // --host web1: only web1's groups.
  r = await bdsnap('forget', '--repo', repoDir, '--host', 'web1', '--keep-last', '1');
  assert.equal(r.exitCode, 0, r.stderr);
  assert.match(r.stdout, /removed 2 backups; run 'bdsnap backup prune'/);
  assert.deepEqual(await repo.backupIds(), [made.web1![2], ...made.web2!, made['web1-ab']![0], ...made.old!].sort());

  // A manifest that cannot be read is kept and named.
  fs.writeFileSync(path.join(repoDir, manifestObject(made.web2![0]!)), '{ torn');
  r = await bdsnap('forget', '--repo', repoDir, '--keep-within', '1h');
  assert.equal(r.exitCode, 0, r.stderr);
  assert.match(r.stdout, new RegExp(`keep ${made.web2![0]}: its manifest cannot be read`));
  assert.ok((await repo.backupIds()).includes(made.web2![0]!));
  r = await bdsnap('forget', '--repo', repoDir, made.web2![0]!);
  assert.equal(r.exitCode, 0, r.stderr);
  r = await bdsnap('prune', '--repo', repoDir);
  assert.equal(r.exitCode, 0, r.stderr);
  assert.equal((await verifyRepository(repo)).ok, true);

  assertFails(await bdsnap('create', '/dev/a', '--repo', repoDir, '--host', 'web 1'), /^bdsnap: bad --host "web 1": letters, digits/);
  assertFails(await bdsnap('forget', '--repo', repoDir), /say which backups to forget/);
  assertFails(await bdsnap('forget', '--repo', repoDir, '--keep-last', '0'), /the policy keeps nothing/);
  assertFails(await bdsnap('forget', '--repo', repoDir, '--keep-daily', 'many'), /--keep-daily takes a whole number/);
  assertFails(await bdsnap('forget', '--repo', repoDir, '--keep-within', 'soon'), /--keep-within takes a duration/);
  assertFails(await bdsnap('forget', '--repo', repoDir, made.web1![2]!, '--keep-last', '1'), /give backup ids, or a policy/);
});

test('forgetting the base of an incremental (and pruning) leaves the incremental whole: every manifest stands alone', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-forgetbase-');
  const repoDir = path.join(dir, 'repo');
  const repo = await initRepo(new LocalDirStore(repoDir), { pieceSizeBytes: 64 * KiB });
  const data = randomData(1024 * KiB, 9);
  const full = await createBackup(repo, [source('/dev/a', data)], { host: 'web1' });
  randomData(8 * KiB, 10).copy(data, 300 * KiB);
  const inc = await createBackup(repo, [{ ...source('/dev/a', data), changed: [{ offsetBytes: 300 * KiB, lengthBytes: 8 * KiB }], base: full.id }], { host: 'web1' });
  assert.equal(inc.devices[0]!.kind, 'incremental');
  assert.equal(inc.devices[0]!.newPieces, 1);
  const r = await bdsnap('forget', '--repo', repoDir, '--keep-last', '1', '--json');
  assert.equal(r.exitCode, 0, r.stderr);
  assert.deepEqual(await repo.backupIds(), [inc.id]);
  const pruned = JSON.parse((await bdsnap('prune', '--repo', repoDir, '--json')).stdout) as { deletedPieces: number };
  assert.equal(pruned.deletedPieces, 1, 'only the piece the incremental replaced');
  const out = path.join(dir, 'out.img');
  const restored = await bdsnap('restore', '--repo', repoDir, inc.id, '/dev/a', '--output', out);
  assert.equal(restored.exitCode, 0, restored.stderr);
  assert.ok(fs.readFileSync(out).equals(data), 'the incremental restores exactly without its base');
});

test('prune removes a pack no index names (a create that ended before its index) and says so, where it removed no unused piece; the backup restores exactly', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-unindexed-');
  const repoDir = path.join(dir, 'repo');
  const repo = await initRepo(new LocalDirStore(repoDir), { pieceSizeBytes: 64 * KiB });
  const data = randomData(512 * KiB, 21);
  const made = await createBackup(repo, [source('/dev/a', data)], { host: 'web1' });
  const packs = objectsUnder(repoDir, 'packs');
  // What a create killed after writing a pack and before its index leaves: a pack no index names.
  const stray = packObject(randomObjectName());
  fs.mkdirSync(path.dirname(path.join(repoDir, stray)), { recursive: true });
  fs.copyFileSync(path.join(repoDir, packs[0]!), path.join(repoDir, stray));
  const r = await bdsnap('prune', '--repo', repoDir);
  assert.equal(r.exitCode, 0, r.stderr);
  assert.match(r.stdout, /^pruned 0 unused pieces \([\d.]+ \S+ freed, 1 pack removed, 1 of them named by no index \(written by a backup or prune that ended before its index\), 0 repacked\); \d+ pieces kept for 1 backup\n$/);
  assert.deepEqual(objectsUnder(repoDir, 'packs'), packs, 'the unnamed pack went, the others stay');
  const out = path.join(dir, 'out.img');
  const restored = await bdsnap('restore', '--repo', repoDir, made.id, '/dev/a', '--output', out);
  assert.equal(restored.exitCode, 0, restored.stderr);
  assert.ok(fs.readFileSync(out).equals(data));
});

/** The objects under `prefix` of a local repository (packs/xx/..., index/...), sorted. */
function objectsUnder(repoDir: string, prefix: string): string[] {
  if (!fs.existsSync(path.join(repoDir, prefix))) return [];
  return fs.readdirSync(path.join(repoDir, prefix), { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile() && !e.name.startsWith('.'))
    .map((e) => path.relative(repoDir, path.join(e.parentPath, e.name))).sort();
}

test('prune refuses while kept backups name pieces no index places (an index object lost), deleting no pack; once a create stores them again, or the backup is forgotten, it prunes and every backup restores exactly', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-lostindex-');
  const repoDir = path.join(dir, 'repo');
  const repo = await initRepo(new LocalDirStore(repoDir), { pieceSizeBytes: 64 * KiB });
  const data = randomData(1024 * KiB, 21);
  const expected = new Map<string, Buffer>();
  /** A backup of /dev/a as it is now: full, or only `changed` read on top of `base`. Returns its id and the index objects it wrote. */
  const backUp = async (changed?: { offsetBytes: number; lengthBytes: number; seed: number }, base?: string): Promise<{ id: string; newPieces: number; indexes: string[] }> => {
    if (changed) randomData(changed.lengthBytes, changed.seed).copy(data, changed.offsetBytes);
    const before = new Set(objectsUnder(repoDir, 'index'));
    const s = await createBackup(repo, [changed ? { ...source('/dev/a', data), changed: [changed], base } : source('/dev/a', data)], { host: 'web1' });
    expected.set(s.id, Buffer.from(data));
    return { id: s.id, newPieces: s.newPieces, indexes: objectsUnder(repoDir, 'index').filter((n) => !before.has(n)) };
  };
  const full = await backUp();
  // inc1 stores two new pieces; inc2 one more, and names inc1's two (unchanged since).
  const inc1 = await backUp({ offsetBytes: 256 * KiB, lengthBytes: 128 * KiB, seed: 22 }, full.id);
  const inc2 = await backUp({ offsetBytes: 640 * KiB, lengthBytes: 64 * KiB, seed: 23 }, inc1.id);
  assert.deepEqual([inc1.newPieces, inc2.newPieces], [2, 1]);
  assert.equal(inc1.indexes.length, 1);
  const restoresExactly = async (ids: string[]): Promise<void> => {
    for (const id of ids) {
      const out = path.join(dir, `${id}.img`);
      const r = await bdsnap('restore', '--repo', repoDir, id, '/dev/a', '--output', out);
      assert.equal(r.exitCode, 0, r.stderr);
      assert.ok(fs.readFileSync(out).equals(expected.get(id)!), `${id} restores exactly`);
      fs.rmSync(out);
    }
  };

  // The index object of inc1's pack is lost: inc1 and inc2 name two pieces nothing places.
  fs.rmSync(path.join(repoDir, inc1.indexes[0]!));
  let r = await bdsnap('verify', '--repo', repoDir);
  assertFails(r, new RegExp(`^bdsnap: 2 damaged backups: ${inc1.id}, ${inc2.id}; run 'bdsnap backup create --repo ${repoDir} /dev/a' .*, or forget them with 'bdsnap backup forget --repo ${repoDir} ${inc1.id} ${inc2.id}'$`, 'm'));
  let packs = objectsUnder(repoDir, 'packs');
  assertFails(await bdsnap('prune', '--repo', repoDir),
    new RegExp(`^bdsnap: cannot prune: backups ${inc1.id}, ${inc2.id} name 2 pieces no index places .*; run 'bdsnap backup verify --repo ${repoDir}'.*backup create.*or forget`));
  assert.deepEqual(objectsUnder(repoDir, 'packs'), packs, 'prune deleted no pack');

  // A backup of the device, which still holds those pieces, stores them again: every backup is whole.
  const inc3 = await backUp({ offsetBytes: 0, lengthBytes: 0, seed: 24 }, inc2.id);
  assert.equal(inc3.newPieces, 2, 'the two pieces no index placed are read and stored again');
  r = await bdsnap('prune', '--repo', repoDir, '--json');
  assert.equal(r.exitCode, 0, r.stderr);
  assert.equal((JSON.parse(r.stdout) as { deletedPacks: number }).deletedPacks, 1, 'inc1\'s pack, now a copy of what the new one holds');
  assert.equal((await bdsnap('verify', '--repo', repoDir)).exitCode, 0);
  await restoresExactly([full.id, inc1.id, inc2.id, inc3.id]);

  // The index object of inc4's pack is lost, and inc4 alone names its piece: prune refuses until it is forgotten.
  const inc4 = await backUp({ offsetBytes: 900 * KiB, lengthBytes: 4 * KiB, seed: 25 }, inc3.id);
  assert.deepEqual([inc4.newPieces, inc4.indexes.length], [1, 1]);
  fs.rmSync(path.join(repoDir, inc4.indexes[0]!));
  packs = objectsUnder(repoDir, 'packs');
  assertFails(await bdsnap('prune', '--repo', repoDir), new RegExp(`^bdsnap: cannot prune: backup ${inc4.id} names 1 piece no index places`));
  assert.deepEqual(objectsUnder(repoDir, 'packs'), packs, 'prune deleted no pack');
  assert.equal((await bdsnap('forget', '--repo', repoDir, inc4.id)).exitCode, 0);
  r = await bdsnap('prune', '--repo', repoDir, '--json');
  assert.equal(r.exitCode, 0, r.stderr);
  assert.equal((JSON.parse(r.stdout) as { deletedPacks: number }).deletedPacks, 1, 'inc4\'s pack');
  assert.equal((await bdsnap('verify', '--repo', repoDir)).exitCode, 0);
  await restoresExactly([full.id, inc1.id, inc2.id, inc3.id]);
});
