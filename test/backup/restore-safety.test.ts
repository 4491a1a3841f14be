/**
 * A restore ends with the backup's content or leaves the target as it was, driven through the
 * real `bdsnap backup restore`: a damaged piece is found before a byte is written in place, and
 * leaves no file under --output (written under a temporary name until whole); a failure
 * in the middle of the writes (a full undo space, a full disk under --output, a piece that
 * reads at the check and fails at the write) puts an image
 * file or a loop device back byte for byte, and removes an output file the restore created,
 * never one that was there before.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { LocalDirStore, Repository, backupDevices, restoreBackup } from '../../src/backup/index.js';
import { PACKS_PREFIX, expandSlots } from '../../src/repository/format.js';
import type { GetOptions } from '../../src/repository/object-store.js';
import { FileDevice } from '../../src/device/file-device.js';
import { lockDirectory } from '../../src/device/device-lock.js';
import { cleanupOf } from '../../testkit/cleanup.js';
import { cli, sandbox, startDaemon } from '../../testkit/daemon.js';
import { makeImage, makeTempDir, sha256File } from '../../testkit/files.js';
import { needs } from '../../testkit/needs.js';
import { run, type RunResult } from '../../testkit/process.js';
import { BDSNAP_MAIN } from '../../testkit/server.js';
import { BdsnapError } from '../../src/errors.js';
import { CountingStore, TEST_PASSWORD, flipByteAt, initRepo, openRepo, pieceBytes } from './helpers.js';
import { ServeSnapshotProvider } from '../../testkit/snapshot-provider.js';
import { useOwnRestoreDir } from '../../testkit/restore-dir.js';

// The children find the repository password where a user would put it.
process.env.BDSNAP_REPO_PASSWORD = TEST_PASSWORD;
useOwnRestoreDir();

const MiB = 1024 * 1024;
const IMAGE_BYTES = 64 * MiB;

function bdsnap(args: string[], env: NodeJS.ProcessEnv = {}): Promise<RunResult> {
  return run(process.execPath, [BDSNAP_MAIN, 'backup', ...args], { allowFailure: true, timeoutMs: 60_000, env: { ...process.env, ...env } });
}

function assertFails(r: RunResult, pattern: RegExp): void {
  assert.equal(r.exitCode, 1, `${r.command}: ${r.stdout}${r.stderr}`);
  assert.equal(r.stderr.trim().split('\n').length, 1, `one line on stderr: ${r.stderr}`);
  assert.match(r.stderr, pattern);
}

/** Overwrite `ranges` of a file or device with random bytes, as use after a backup would. */
function scribble(target: string, ranges: Array<[offsetBytes: number, lengthBytes: number]>): void {
  const fd = fs.openSync(target, 'r+');
  try {
    for (const [at, length] of ranges) fs.writeSync(fd, randomBytes(length), 0, length, at);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** A tmpfs of `sizeBytes` at a new directory under `dir`, unmounted after the test. */
async function smallTmpfs(t: { after(fn: () => unknown): void }, dir: string, sizeBytes: number): Promise<string> {
  const mnt = fs.mkdtempSync(path.join(dir, 'tmpfs-'));
  await run('mount', ['-t', 'tmpfs', '-o', `size=${sizeBytes},mode=0700`, 'tmpfs', mnt]);
  cleanupOf(t).after(() => run('umount', [mnt]));
  return mnt;
}

async function loopDevice(t: { after(fn: () => unknown): void }, image: string): Promise<string> {
  const loop = (await run('losetup', ['--find', '--show', image])).stdout.trim();
  cleanupOf(t).after(() => run('losetup', ['-d', loop], { allowFailure: true }));
  return loop;
}

/** A repository with a backup of `device`, which is then changed so that a restore has work to do. */
async function backedUp(dir: string, device: string, copy: boolean): Promise<{ repoDir: string; repo: Repository; id: string }> {
  const repoDir = path.join(dir, 'repo');
  const repo = fs.existsSync(repoDir) ? await openRepo(new LocalDirStore(repoDir)) : await initRepo(new LocalDirStore(repoDir));
  const { id } = await backupDevices(repo, new ServeSnapshotProvider(dir, { copy }), [device]);
  const entry = (await repo.manifest(id)).devices[0]!;
  assert.equal(entry.sizeBytes, IMAGE_BYTES);
  return { repoDir, repo, id };
}

/** A piece the restore of `id` needs late (slots are written in order), used by one slot only. */
async function lateUniquePiece(repo: Repository, id: string): Promise<string> {
  const entry = (await repo.manifest(id)).devices[0]!;
  const slots = expandSlots(entry, repo.pieceSizeBytes);
  const once = slots.filter((h): h is string => h !== null && slots.indexOf(h) === slots.lastIndexOf(h));
  const late = once.filter((h) => slots.indexOf(h) > slots.length / 2);
  assert.ok(late.length > 0, 'the image has pieces used once in its second half');
  return late[late.length - 1]!;
}

/** Flip a byte in the middle of a piece's stored bytes. */
async function flipByte(repo: Repository, repoDir: string, id: string): Promise<void> {
  const at = await pieceBytes(repo, repoDir, id);
  flipByteAt(at.file, at.offsetBytes + Math.floor(at.lengthBytes / 2));
}

test('a damaged piece: restore onto an image file or a loop device refuses before writing a byte, and --output leaves no file', async (t) => {
  if (!needs(t, { root: true, tools: ['losetup'] })) return;
  const dir = makeTempDir(t, 'bdsnap-restore-damaged-');
  const image = path.join(dir, 'disk.img');
  makeImage(image, IMAGE_BYTES, 'mixed', 21);
  const fileBackup = await backedUp(dir, image, true);
  const loop = await loopDevice(t, image);
  const { repoDir, repo, id: loopId } = await backedUp(dir, loop, false);
  // Both backups hold the same bytes, so they share the piece damaged below.
  const victim = await lateUniquePiece(repo, loopId);
  assert.ok((await repo.manifest(fileBackup.id)).devices[0]!.pieces.includes(victim));
  await flipByte(repo, repoDir, victim);
  scribble(loop, [[0, 8 * MiB], [40 * MiB, MiB]]);
  const refused = (id: string): RegExp => new RegExp(
    `^bdsnap: cannot restore backup ${id}: piece ${victim} is damaged: [^;]+, in pack packs/[0-9a-f/]+; nothing was written; 'bdsnap backup verify --repo ${repoDir} ${id}' lists every damaged or missing piece of it; then run 'bdsnap backup create --repo ${repoDir} [^']+' \\(.*\\), or forget the backup with 'bdsnap backup forget --repo ${repoDir} ${id}'$`, 'm');

  const before = await sha256File(loop);
  let r = await bdsnap(['restore', '--repo', repoDir, loopId, loop]);
  assert.equal(await sha256File(loop), before, 'the loop device is unchanged');
  assertFails(r, refused(loopId));

  // A new file is written under a temporary name, so its pieces are checked as they are
  // written: the damaged one is named the same way, and nothing is left in the directory.
  const outDir = fs.mkdtempSync(path.join(dir, 'out-'));
  const out = path.join(outDir, 'out.img');
  r = await bdsnap(['restore', '--repo', repoDir, loopId, loop, '--output', out]);
  assert.deepEqual(fs.readdirSync(outDir), [], 'no output file, temporary or not, is left');
  assertFails(r, new RegExp(
    `^bdsnap: cannot restore backup ${loopId}: piece ${victim} is damaged: [^;]+, in pack packs/[0-9a-f/]+; the partly written ${outDir}/\\.out\\.img\\.bdsnap-restore-[0-9a-f]{8} was removed; 'bdsnap backup verify --repo ${repoDir} ${loopId}' lists every damaged or missing piece of it; then run 'bdsnap backup create --repo ${repoDir} [^']+' \\(.*\\), or forget the backup with 'bdsnap backup forget --repo ${repoDir} ${loopId}'$`, 'm'));

  await run('losetup', ['-d', loop]);
  r = await bdsnap(['restore', '--repo', repoDir, fileBackup.id, image]);
  assert.equal(await sha256File(image), before, 'the image file is unchanged');
  assertFails(r, refused(fileBackup.id));
});

test('a failure in the middle of a restore in place (the undo space fills): the image file and the loop device are put back exactly', async (t) => {
  if (!needs(t, { root: true, tools: ['losetup'] })) return;
  const dir = makeTempDir(t, 'bdsnap-restore-rollback-');
  const image = path.join(dir, 'disk.img');
  makeImage(image, IMAGE_BYTES, 'mixed', 22);
  const { repoDir, id } = await backedUp(dir, image, true);
  // Changed all over, so the restore rewrites far more than the 6 MiB its undo space holds:
  // it fails after it has written several MiB.
  scribble(image, Array.from({ length: IMAGE_BYTES / (4 * MiB) }, (_, k): [number, number] => [k * 4 * MiB, MiB]));
  const undoSpace = await smallTmpfs(t, dir, 6 * MiB);
  const putBack = new RegExp(`^bdsnap: restore of ${image} from backup ${id} stopped at \\d+: cannot keep the original bytes at \\d+ in .*: .*no space left on device.*; ${image} was put back as it was \\(\\d+ bytes rewritten\\)$`, 'im');

  const before = await sha256File(image);
  let r = await bdsnap(['restore', '--repo', repoDir, id, image], { BDSNAP_RESTORE_DIR: undoSpace });
  assert.equal(await sha256File(image), before, 'the image file is as it was');
  assertFails(r, putBack);
  assert.deepEqual(fs.readdirSync(undoSpace), [], 'the undo log is removed');

  // The same on a block device: a loop device over the image.
  const loop = await loopDevice(t, image);
  const loopBackup = await backedUp(dir, loop, false);
  scribble(loop, Array.from({ length: IMAGE_BYTES / (4 * MiB) }, (_, k): [number, number] => [k * 4 * MiB + 2 * MiB, MiB]));
  const loopBefore = await sha256File(loop);
  r = await bdsnap(['restore', '--repo', repoDir, loopBackup.id, loop], { BDSNAP_RESTORE_DIR: undoSpace });
  assert.equal(await sha256File(loop), loopBefore, 'the loop device is as it was');
  assertFails(r, new RegExp(`; ${loop} was put back as it was`, 'm'));

  // With room for its undo log, the same restore completes.
  r = await bdsnap(['restore', '--repo', repoDir, loopBackup.id, loop]);
  assert.equal(r.exitCode, 0, r.stderr);
  assert.equal(await sha256File(loop), before);
});

test('--output on a full disk: the file the restore created is removed; a file that was there is put back, never removed; a symbolic link is refused', async (t) => {
  if (!needs(t, { root: true })) return;
  const dir = makeTempDir(t, 'bdsnap-restore-output-');
  const image = path.join(dir, 'disk.img');
  makeImage(image, IMAGE_BYTES, 'mixed', 23);
  const { repoDir, id } = await backedUp(dir, image, true);
  const small = await smallTmpfs(t, dir, 16 * MiB);

  const out = path.join(small, 'out.img');
  let r = await bdsnap(['restore', '--repo', repoDir, id, image, '--output', out]);
  assert.deepEqual(fs.readdirSync(small), [], 'the output file is removed');
  assertFails(r, new RegExp(`^bdsnap: restore of ${out} from backup ${id} stopped at \\d+: .*no space left on device.*; the partly written ${small}/\\.out\\.img\\.bdsnap-restore-[0-9a-f]{8} was removed$`, 'im'));

  // A file that was there: restored in place, and on failure given back its bytes and size.
  const existing = path.join(small, 'existing.img');
  makeImage(existing, 4 * MiB, 'random', 5);
  const existingBefore = await sha256File(existing);
  const undoSpace = await smallTmpfs(t, dir, 6 * MiB);
  r = await bdsnap(['restore', '--repo', repoDir, id, image, '--output', existing], { BDSNAP_RESTORE_DIR: undoSpace });
  assert.equal(fs.statSync(existing).size, 4 * MiB);
  assert.equal(await sha256File(existing), existingBefore);
  assertFails(r, new RegExp(`; ${existing} was put back as it was`, 'm'));

  // A symbolic link is not followed, dangling or not; the refusal says where it points.
  const link = path.join(dir, 'link.img');
  fs.symlinkSync(existing, link);
  r = await bdsnap(['restore', '--repo', repoDir, id, image, '--output', link]);
  assert.equal(await sha256File(existing), existingBefore);
  assertFails(r, new RegExp(`^bdsnap: ${link} is a symbolic link; it is not written through, .*: it points to ${existing}; give the path of the file itself \\(${existing}\\) if that is the one meant, or remove the link$`, 'm'));
  const dangling = path.join(dir, 'dangling.img');
  fs.symlinkSync(path.join(dir, 'nowhere.img'), dangling);
  assertFails(await bdsnap(['restore', '--repo', repoDir, id, image, '--output', dangling]), new RegExp(`^bdsnap: ${dangling} is a symbolic link; .*: it points to ${dir}/nowhere.img, which does not exist;`, 'm'));
  assert.equal(fs.existsSync(path.join(dir, 'nowhere.img')), false);
  // Nor a second name of another file (a hard link planted where the output goes).
  const hard = path.join(path.dirname(existing), 'hard.img');
  fs.linkSync(existing, hard);
  assertFails(await bdsnap(['restore', '--repo', repoDir, id, image, '--output', hard]), /has 2 names \(hard links\); it is not overwritten/);
  assert.equal(await sha256File(existing), existingBefore);
});

test('a symbolic link given as the target, in place or as --output, is refused naming it as typed, where it points, why and what to do; nothing is written through it', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-restore-link-');
  const image = path.join(dir, 'disk.img');
  makeImage(image, IMAGE_BYTES, 'mixed', 29);
  const { repoDir, id } = await backedUp(dir, image, true);
  const other = path.join(dir, 'other.img');
  makeImage(other, MiB, 'random', 3);
  const otherBefore = await sha256File(other);
  const why = 'it is not written through, since whoever can change a link can point it at another file';

  // --output named relative to a directory reached through a link: the name as typed, the path
  // it makes (the real directory's), and the file the link points to.
  const real = path.join(dir, 'real');
  fs.mkdirSync(real);
  const linked = path.join(dir, 'linked');
  fs.symlinkSync(real, linked);
  fs.symlinkSync(other, path.join(real, 'out.img'));
  const r = await run(process.execPath, [BDSNAP_MAIN, 'backup', 'restore', '--repo', repoDir, id, image, '--output', 'out.img'], { allowFailure: true, cwd: linked, timeoutMs: 60_000 });
  assertFails(r, new RegExp(`^bdsnap: out\\.img \\(${real}/out\\.img\\) is a symbolic link; ${why}: it points to ${other}; give the path of the file itself \\(${other}\\) if that is the one meant, or remove the link$`, 'm'));
  assert.equal(await sha256File(other), otherBefore, 'nothing was written through the link');
  assert.deepEqual(fs.readdirSync(real), ['out.img'], 'no temporary file either');

  // A dangling link: where a file would be made, and it is not.
  const dangling = path.join(dir, 'dangling.img');
  fs.symlinkSync(path.join(dir, 'nowhere.img'), dangling);
  assertFails(await bdsnap(['restore', '--repo', repoDir, id, image, '--output', dangling]),
    new RegExp(`^bdsnap: ${dangling} is a symbolic link; ${why}: it points to ${dir}/nowhere\\.img, which does not exist; give the path the file is to have \\(${dir}/nowhere\\.img\\) if that is the one meant, or remove the link$`, 'm'));
  assert.equal(fs.existsSync(path.join(dir, 'nowhere.img')), false);

  // The daemon's instant restore refuses the link in the same words.
  const daemon = await startDaemon(t, { password: false });
  const instant = await run(process.execPath, [BDSNAP_MAIN, 'backup', 'restore', '--repo', repoDir, id, image, '--output', path.join(linked, 'out.img'), '--instant'],
    { allowFailure: true, env: { ...process.env, BDSNAP_RUN_DIR: daemon.runDir }, timeoutMs: 60_000 });
  assertFails(instant, new RegExp(`^bdsnap: ${linked}/out\\.img is a symbolic link; ${why}: it points to ${other}; give the path of the file itself \\(${other}\\) if that is the one meant, or remove the link$`, 'm'));
  assert.equal(await sha256File(other), otherBefore, 'nothing was written through the link');

  // In place: a link to the backup's device is not its name; the refusal says it leads there.
  const before = await sha256File(image);
  const alias = path.join(dir, 'alias.img');
  fs.symlinkSync(image, alias);
  assertFails(await bdsnap(['restore', '--repo', repoDir, id, alias]),
    new RegExp(`^bdsnap: backup ${id} has no device ${alias}: that name is a symbolic link to ${image}, which the backup has; a restore takes the device by the name its backup gives it: give ${image}$`, 'm'));
  assert.equal(await sha256File(image), before, 'the device was not written');

  // The backup's own name of the device, replaced by a link since: a refusal of what it leads to names both.
  const moved = path.join(dir, 'moved.img');
  fs.renameSync(image, moved);
  fs.symlinkSync(real, image);
  assertFails(await bdsnap(['restore', '--repo', repoDir, id, image]),
    new RegExp(`^bdsnap: ${image} leads to ${real} through a symbolic link, and ${real} is not a regular file or a block device; refusing to write to it$`, 'm'));
});

/** The files of `dir` but the restore's temporary ones, and those apart. */
function outputsIn(dir: string): { named: string[]; temps: string[] } {
  const names = fs.readdirSync(dir).sort();
  return { named: names.filter((n) => !n.includes('.bdsnap-restore-')), temps: names.filter((n) => n.includes('.bdsnap-restore-')) };
}

test('--output names its file only once whole and durable: killed while writing or just before the naming, the name stays free; a file that appears under it meanwhile is neither replaced nor written', async (t) => {
  if (!needs(t, { root: true, tools: ['strace'] })) return;
  const dir = makeTempDir(t, 'bdsnap-restore-naming-');
  const image = path.join(dir, 'disk.img');
  makeImage(image, IMAGE_BYTES, 'mixed', 26);
  const { repoDir, id } = await backedUp(dir, image, true);
  const backedUpSha = await sha256File(image);
  const outDir = fs.mkdtempSync(path.join(dir, 'out-'));
  const out = path.join(outDir, 'out.img');
  // strace kills the restore at a chosen system call, as a crash or the OOM killer would.
  const killedAt = async (inject: string[]): Promise<RunResult> => {
    const r = await run('strace', ['-f', '-qq', '-o', '/dev/null', ...inject, process.execPath, BDSNAP_MAIN, 'backup', 'restore', '--repo', repoDir, id, image, '--output', out], { allowFailure: true, timeoutMs: 60_000 });
    assert.notEqual(r.exitCode, 0, `the restore was killed: ${r.stdout}${r.stderr}`);
    return r;
  };

  // Killed at its 20th write of a piece (of about 190): a partial file, under a temporary name.
  await killedAt(['-e', 'trace=pwrite64', '-e', 'inject=pwrite64:signal=SIGKILL:when=20']);
  let seen = outputsIn(outDir);
  assert.deepEqual(seen.named, [], 'nothing under the output name');
  assert.equal(seen.temps.length, 1, 'the partial restore is under a temporary name');
  const partial = path.join(outDir, seen.temps[0]!);
  assert.notEqual(await sha256File(partial), backedUpSha, 'the restore was killed before it ended');

  // Killed as it names the file: whole and durable under its temporary name, the name still free.
  await killedAt(['-P', out, '-e', 'trace=link', '-e', 'inject=link:signal=SIGKILL']);
  seen = outputsIn(outDir);
  assert.deepEqual(seen.named, [], 'nothing under the output name');
  assert.equal(seen.temps.length, 2);
  const whole = path.join(outDir, seen.temps.find((n) => path.join(outDir, n) !== partial)!);
  assert.equal(await sha256File(whole), backedUpSha, 'the killed restore had written and synced everything');

  // Run again: the name holds the backup; the two files of the killed runs are left as they
  // are (another restore could be writing one), and named.
  const r = await bdsnap(['restore', '--repo', repoDir, id, image, '--output', out]);
  assert.equal(r.exitCode, 0, r.stderr);
  const leftovers = seen.temps.map((n) => path.join(outDir, n)).join(', ');
  assert.equal(r.stderr, `bdsnap: note: 2 files of earlier restores into ${out} that did not finish (killed) are beside it: ${leftovers}; remove them once no other restore into ${out} runs\n`);
  assert.equal(await sha256File(out), backedUpSha);
  assert.equal(fs.statSync(out).nlink, 1, 'the temporary name is gone');
  assert.deepEqual(outputsIn(outDir), { named: ['out.img'], temps: seen.temps });

  // A file that appears under the name while the restore writes (the store's reads plant it):
  // the restore refuses to replace it and removes its own file.
  const planted = path.join(outDir, 'theirs.img');
  let plantedAt = -1;
  class PlantingStore extends CountingStore {
    override get(name: string, range?: GetOptions): Promise<Buffer> {
      if (plantedAt < 0 && name.startsWith(PACKS_PREFIX) && fs.readdirSync(outDir).some((n) => n.startsWith('.theirs.img.bdsnap-restore-'))) {
        plantedAt = this.gets;
        fs.writeFileSync(planted, 'theirs');
      }
      return super.get(name, range);
    }
  }
  const remote = await openRepo(new PlantingStore(new LocalDirStore(repoDir)));
  await assert.rejects(restoreBackup(remote, id, image, { output: planted }), (err: BdsnapError) => {
    assert.match(err.message, new RegExp(`^${planted} appeared while it was being written; refusing to replace it; the partly written ${outDir}/\\.theirs\\.img\\.bdsnap-restore-[0-9a-f]{8} was removed$`));
    return true;
  });
  assert.ok(plantedAt >= 0, 'the file was planted during the restore');
  assert.equal(fs.readFileSync(planted, 'utf8'), 'theirs', 'the planted file is untouched');
  assert.deepEqual(outputsIn(outDir), { named: ['out.img', 'theirs.img'], temps: seen.temps });
});

/** A store whose reads of one piece (a range of its pack) fail from the `failFrom`-th on, as a failing disk or network would. */
class FailingStore extends CountingStore {
  readonly #victim: { object: string; offsetBytes: number };
  readonly #failFrom: number;
  #reads = 0;

  constructor(inner: LocalDirStore, victim: { object: string; offsetBytes: number }, failFrom: number) {
    super(inner);
    this.#victim = victim;
    this.#failFrom = failFrom;
  }

  override get(name: string, range?: GetOptions): Promise<Buffer> {
    // A read covers the victim when its range holds the victim's start (reads may span pieces).
    const at = range && 'offsetBytes' in range ? range : { offsetBytes: 0, lengthBytes: Infinity };
    const covers = at.offsetBytes <= this.#victim.offsetBytes && this.#victim.offsetBytes < at.offsetBytes + at.lengthBytes;
    if (name === this.#victim.object && covers && ++this.#reads >= this.#failFrom) {
      return Promise.reject(new BdsnapError('EIO', `reading ${name} failed: input/output error`));
    }
    return super.get(name, range);
  }
}

test('a store without local files: each piece is read once, so a second read that would fail is never made; existing files of any size are restored exactly', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-restore-readfail-');
  const image = path.join(dir, 'disk.img');
  makeImage(image, IMAGE_BYTES, 'mixed', 24);
  const { repoDir, repo, id } = await backedUp(dir, image, true);
  const victim = await lateUniquePiece(repo, id);
  const backedUpSha = await sha256File(image);
  scribble(image, Array.from({ length: IMAGE_BYTES / (4 * MiB) }, (_, k): [number, number] => [k * 4 * MiB, MiB]));
  // Through get() (no local paths): any second read of the piece fails. The check pass keeps
  // what it read, and the write pass writes that.
  const victimAt = (await repo.pieceIndex()).get(victim)!;
  const store = new FailingStore(new LocalDirStore(repoDir), victimAt, 2);
  await restoreBackup(await openRepo(store), id, image);
  assert.equal(await sha256File(image), backedUpSha, 'the image is restored exactly from one read of each piece');

  // The pieces are kept under TMPDIR: one without room for them is refused before a piece is read.
  scribble(image, [[0, MiB]]);
  const scribbled = await sha256File(image);
  const savedTmp = process.env.TMPDIR;
  process.env.TMPDIR = await smallTmpfs(t, dir, 4 * MiB);
  try {
    const counting = new CountingStore(new LocalDirStore(repoDir));
    const opened = await openRepo(counting);
    await opened.pieceIndex();
    const gets = counting.gets;
    await assert.rejects(restoreBackup(opened, id, image), /cannot make a place for the pieces a restore reads, under .*: it needs \d+ bytes .*; set TMPDIR to a directory with room/);
    assert.equal(counting.gets, gets + 1, 'the manifest was read, and no piece');
  } finally {
    if (savedTmp === undefined) delete process.env.TMPDIR;
    else process.env.TMPDIR = savedTmp;
  }
  assert.equal(await sha256File(image), scribbled, 'the image is untouched');

  // An existing output file longer or shorter than the device is given its size and content.
  for (const sizeBytes of [IMAGE_BYTES + 3 * MiB + 512, 5 * MiB]) {
    const existing = path.join(dir, `existing-${sizeBytes}.img`);
    makeImage(existing, sizeBytes, 'random', 9);
    await restoreBackup(repo, id, image, { output: existing });
    assert.equal(fs.statSync(existing).size, IMAGE_BYTES);
    assert.equal(await sha256File(existing), backedUpSha);
  }
});

test('a target whose size is not the backup\'s: a file is cut or grown to it, a larger block device keeps its range past the backup\'s end, and the restore says which', async (t) => {
  if (!needs(t, { root: true, tools: ['losetup'] })) return;
  const dir = makeTempDir(t, 'bdsnap-restore-sizes-');
  const image = path.join(dir, 'disk.img');
  makeImage(image, IMAGE_BYTES, 'mixed', 31);
  const backedUpSha = await sha256File(image);
  const { repoDir, id } = await backedUp(dir, image, true);
  const cases: Array<[number, string]> = [
    [IMAGE_BYTES + 3 * MiB, `the file was cut to the backup's size \\(the ${3 * MiB} bytes past it are gone\\)`],
    [5 * MiB, 'the file was grown to the backup\'s size'],
  ];
  for (const [sizeBytes, note] of cases) {
    const existing = path.join(dir, `existing-${sizeBytes}.img`);
    makeImage(existing, sizeBytes, 'random', 9);
    const r = await bdsnap(['restore', '--repo', repoDir, id, image, '--output', existing]);
    assert.equal(r.exitCode, 0, r.stderr);
    assert.match(r.stdout, new RegExp(`^${existing} held ${sizeBytes} bytes, the backup ${IMAGE_BYTES}: ${note}$`, 'm'));
    assert.equal(fs.statSync(existing).size, IMAGE_BYTES);
    assert.equal(await sha256File(existing), backedUpSha);
  }
  // The backup's size: nothing to say; --json says it with sizeBefore.
  const same = path.join(dir, 'same.img');
  makeImage(same, IMAGE_BYTES, 'random', 10);
  let r = await bdsnap(['restore', '--repo', repoDir, id, image, '--output', same]);
  assert.equal(r.exitCode, 0, r.stderr);
  assert.doesNotMatch(r.stdout, / held /);
  const longer = path.join(dir, 'longer.img');
  makeImage(longer, IMAGE_BYTES + MiB, 'random', 11);
  r = await bdsnap(['restore', '--repo', repoDir, id, image, '--output', longer, '--json']);
  assert.equal(r.exitCode, 0, r.stderr);
  assert.deepEqual((JSON.parse(r.stdout) as { sizeBefore?: unknown }).sizeBefore, { bytes: IMAGE_BYTES + MiB, tail: 'cut' });

  // A loop device grown past the backup of it: the backup's range is restored, the rest kept.
  const backing = path.join(dir, 'loop.img');
  makeImage(backing, IMAGE_BYTES, 'mixed', 32);
  const loop = await loopDevice(t, backing);
  const loopBackup = await backedUp(dir, loop, false);
  const original = fs.readFileSync(backing);
  fs.truncateSync(backing, IMAGE_BYTES + 4 * MiB);
  scribble(backing, [[IMAGE_BYTES, 4 * MiB], [0, MiB]]);
  await run('losetup', ['--set-capacity', loop]);
  const tail = fs.readFileSync(backing).subarray(IMAGE_BYTES);
  r = await bdsnap(['restore', '--repo', repoDir, loopBackup.id, loop]);
  assert.equal(r.exitCode, 0, r.stderr);
  assert.match(r.stdout, new RegExp(`^${loop} held ${IMAGE_BYTES + 4 * MiB} bytes, the backup ${IMAGE_BYTES}: the ${4 * MiB} bytes past the backup's end were left as they were$`, 'm'));
  const after = fs.readFileSync(loop);
  assert.ok(after.subarray(0, IMAGE_BYTES).equals(original), 'the backup\'s range is restored');
  assert.ok(after.subarray(IMAGE_BYTES).equals(tail), 'the range past it is as it was');
});

/** Overwrite the whole of this process's open restore spool (an unlinked file) with random bytes; false when there is none. */
function scribbleOnSpool(): boolean {
  for (const fd of fs.readdirSync('/proc/self/fd')) {
    let link: string;
    try {
      link = fs.readlinkSync(`/proc/self/fd/${fd}`);
    } catch {
      continue;
    }
    if (!/bdsnap-restore-spool-[^/]+\/pieces \(deleted\)$/.test(link)) continue;
    const sizeBytes = fs.fstatSync(Number(fd)).size;
    scribble(`/proc/self/fd/${fd}`, [[0, sizeBytes]]);
    return true;
  }
  return false;
}

test('a spool changed between the check and the write (a disk error, another writer): the restore stops before writing a changed piece and the image is put back', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-restore-spool-');
  const image = path.join(dir, 'disk.img');
  makeImage(image, IMAGE_BYTES, 'mixed', 25);
  const { repoDir, repo, id } = await backedUp(dir, image, true);
  scribble(image, Array.from({ length: IMAGE_BYTES / (4 * MiB) }, (_, k): [number, number] => [k * 4 * MiB, MiB]));
  const scribbled = await sha256File(image);
  // The check pass has kept every distinct piece once this many bytes are counted.
  const P = repo.pieceSizeBytes;
  const slots = expandSlots((await repo.manifest(id)).devices[0]!, P);
  const checkedBytes = slots.reduce((n, h, i) => (h !== null && slots.indexOf(h) === i ? n + Math.min(P, IMAGE_BYTES - i * P) : n), 0);
  let counted = 0;
  let spoolChanged = false;
  const progress = {
    start: (): void => undefined,
    advance: (bytes: number): void => {
      counted += bytes;
      if (counted === checkedBytes) spoolChanged = scribbleOnSpool();
    },
  };
  // Through get() (no local paths), so the pieces go through the spool.
  const remote = await openRepo(new CountingStore(new LocalDirStore(repoDir)));
  await assert.rejects(restoreBackup(remote, id, image, { progress }), (err: BdsnapError) => {
    assert.match(err.message, /^restore of .* stopped at \d+: piece [0-9a-f]+ changed in the restore's spool under .* since it was checked .*, and was not written; run the restore again; /);
    return true;
  });
  assert.ok(spoolChanged, 'the spool was found and changed between the passes');
  assert.equal(await sha256File(image), scribbled, 'the image is as it was before the restore');
});

test('an image opened while a restore in place runs (a daemon serving it, a snapshot, another opener) is refused; the restore completes', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-restore-locked-');
  const image = path.join(dir, 'disk.img');
  makeImage(image, IMAGE_BYTES, 'mixed', 31);
  const { repoDir, id } = await backedUp(dir, image, true);
  const backedUpHash = await sha256File(image);
  scribble(image, Array.from({ length: IMAGE_BYTES / (2 * MiB) }, (_, k): [number, number] => [k * 2 * MiB, MiB]));
  const box = sandbox(t);
  await startDaemon(t, { sandbox: box, password: false });
  const st = fs.statSync(image);
  const lockFile = path.join(lockDirectory(), `file-${st.dev}-${st.ino}.lock`);

  const restore = spawn(process.execPath, [BDSNAP_MAIN, 'backup', 'restore', '--repo', repoDir, id, image], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  restore.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
  const exited = new Promise<number | null>((resolve) => restore.once('exit', (code) => resolve(code)));
  // The restore's lock is in place: from here to its exit is the window.
  for (;;) {
    const owner = fs.existsSync(lockFile) ? fs.readFileSync(lockFile, 'utf8').split('\n')[0] : undefined;
    if (owner === String(restore.pid)) break;
    if (restore.exitCode !== null) assert.fail(`the restore ended before its lock was seen: ${stderr}`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
  // Held still inside its window (lock taken, not yet released) while the others try: a
  // stopped process keeps its lock, and the window no longer depends on how fast anything runs.
  process.kill(restore.pid!, 'SIGSTOP');
  let opened: string;
  let snapshot: ReturnType<typeof cli>;
  let served: ReturnType<typeof cli>;
  try {
    opened = await FileDevice.open(image).then(async (f) => { await f.close(); return 'opened'; }, (err: unknown) => (err as BdsnapError).code);
    snapshot = cli(box, ['snapshot', 'create', image]);
    served = cli(box, ['sffs', 'cat', image]);
    assert.equal(fs.readFileSync(lockFile, 'utf8').split('\n')[0], String(restore.pid), 'the restore still holds its lock');
  } finally {
    process.kill(restore.pid!, 'SIGCONT');
  }
  assert.equal(await exited, 0, stderr);
  assert.equal(opened, 'EBUSY', 'another opener is refused');
  assert.equal(snapshot.status, 1, 'a snapshot of the image being restored is refused');
  assert.match(snapshot.stderr, /is already open by process \d+/);
  assert.notEqual(served.status, 0, 'the daemon does not serve the image being restored');
  assert.equal(await sha256File(image), backedUpHash, 'the restore completed with the backup\'s content');
});

test('a restore in place does not follow a link another user put where the image was: the file it points at keeps its bytes', async (t) => {
  if (!needs(t, { root: true, tools: ['runuser'] })) return;
  const dir = makeTempDir(t, 'bdsnap-restore-link-');
  // The image in a directory of another user's (a VM disk in a home, say), backed up.
  const theirs = path.join(dir, 'theirs');
  fs.mkdirSync(theirs);
  fs.chmodSync(dir, 0o711);
  const image = path.join(theirs, 'disk.img');
  makeImage(image, IMAGE_BYTES, 'mixed', 29);
  const { repoDir, id } = await backedUp(dir, image, true);
  await run('chown', ['nobody', theirs]);
  // A root file the backup fits in; the image's name made a link to it.
  const victim = path.join(dir, 'victim.img');
  makeImage(victim, IMAGE_BYTES, 'random', 31);
  const before = await sha256File(victim);
  await run('runuser', ['-u', 'nobody', '--', 'sh', '-c', `mv ${image} ${theirs}/moved.img && ln -s ${victim} ${image}`]);
  const r = await bdsnap(['restore', '--repo', repoDir, id, image]);
  assert.equal(await sha256File(victim), before, 'the file the link points at keeps its bytes');
  assertFails(r, /theirs\/disk\.img leads to .*victim\.img through .*theirs\/disk\.img, a link another user can replace \(.*theirs belongs to uid \d+\); give the real path/);
});
