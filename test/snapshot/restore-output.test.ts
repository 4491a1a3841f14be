/**
 * `restore --output` as root in a directory another user can write (the README's example is
 * /tmp/before.img): a symlink or a hard link planted there by that user, or a file of theirs,
 * is never written through; a restore that fails after creating its output removes it, and the
 * name shows the restored copy only once whole (a failure or a kill leaves a file that was there
 * as it was). The attacker is a real unprivileged user (`nobody` through runuser).
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { FileDevice } from '../../src/device/file-device.js';
import { DATA_FILE, MANIFEST_FILE, sessionDirName } from '../../src/snapshot/format.js';
import { CowDevice, listSessions, restore } from '../../src/snapshot/index.js';
import { needs } from '../../testkit/needs.js';
import { cleanupOf } from '../../testkit/cleanup.js';
import { makeImage, sha256File } from '../../testkit/files.js';
import { isError, tempDir } from './helpers.js';
import { BDSNAP_MAIN } from '../../testkit/server.js';

const CS = 16384;

async function oneSession(image: string, root: string): Promise<string> {
  const dev = await FileDevice.open(image);
  try {
    const cow = CowDevice.create(dev, { devicePath: image, snapshotRoot: root, chunkSize: CS, deviceIdentity: { ...dev.identity } });
    await cow.write(randomBytes(70_000), 10_000);
    return (await cow.close())!.sessionDir;
  } finally {
    await dev.close();
  }
}

/** A directory like /tmp (world-writable, sticky) inside the test's own temp dir, which nobody can reach. */
function sharedDir(dir: string): string {
  fs.chmodSync(dir, 0o711);
  const shared = path.join(dir, 'shared');
  fs.mkdirSync(shared);
  fs.chmodSync(shared, 0o1777);
  return shared;
}

function asNobody(...args: string[]): void {
  execFileSync('runuser', ['-u', 'nobody', '--', ...args], { stdio: 'pipe' });
}

test('restore --output never writes through a symlink, a hard link or a file another user owns', async (t) => {
  if (!needs(t, { root: true, tools: ['runuser'] })) return;
  const dir = tempDir(t, 'bdsnap-output-');
  const image = makeImage(path.join(dir, 'disk.img'), 1 << 20, 'random', 3);
  const before = await sha256File(image);
  const sessionDir = await oneSession(image, path.join(dir, 'snap'));
  const shared = sharedDir(dir);
  const secret = path.join(dir, 'root-only');
  fs.writeFileSync(secret, 'root only\n', { mode: 0o600 });

  const planted = path.join(shared, 'before.img');
  asNobody('ln', '-s', secret, planted);
  await assert.rejects(restore(sessionDir, { output: planted }), isError('EPERM', /is a symbolic link; it is not written through/));
  assert.equal(fs.readFileSync(secret, 'utf8'), 'root only\n', 'the symlink target is untouched');
  fs.rmSync(planted);

  // A file of nobody's: writing it would hand the device's content to that user.
  const theirs = path.join(shared, 'theirs.img');
  asNobody('touch', theirs);
  await assert.rejects(restore(sessionDir, { output: theirs }), isError('EPERM', /belongs to uid \d+, not to this user/));
  assert.equal(fs.statSync(theirs).size, 0);

  // A hard link to a root file (protected_hardlinks stops nobody from making one of a root-only
  // file, so root makes it, as a careless script would).
  const linked = path.join(shared, 'linked.img');
  fs.linkSync(secret, linked);
  await assert.rejects(restore(sessionDir, { output: linked }), isError('EPERM', /has 2 names/));
  assert.equal(fs.readFileSync(secret, 'utf8'), 'root only\n');

  // A fresh name is created private to root and holds the restored copy.
  const fresh = path.join(shared, 'fresh.img');
  await restore(sessionDir, { output: fresh });
  assert.equal(await sha256File(fresh), before);
  assert.equal(fs.statSync(fresh).mode & 0o777, 0o600);
  assert.equal(fs.statSync(fresh).uid, 0);
  // Run again onto its own earlier output: allowed (ours, one link), rewritten through the descriptor.
  fs.appendFileSync(fresh, 'junk');
  await restore(sessionDir, { output: fresh });
  assert.equal(await sha256File(fresh), before);
});

test('a restore --output that fails after creating its file removes it', async (t) => {
  const dir = tempDir(t, 'bdsnap-output-');
  const image = makeImage(path.join(dir, 'disk.img'), 1 << 20, 'random', 4);
  const sessionDir = await oneSession(image, path.join(dir, 'snap'));
  // A real failure after the output exists: its filesystem is too small for the copy.
  if (!needs(t, { root: true })) return;
  const small = path.join(dir, 'small');
  fs.mkdirSync(small);
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=256k', 'tmpfs', small]);
  cleanupOf(t).after(() => execFileSync('umount', [small]));
  const out = path.join(small, 'out.img');
  await assert.rejects(restore(sessionDir, { output: out }), isError('ENOSPC'));
  assert.deepEqual(fs.readdirSync(small), [], 'the half-written output was removed');
  assert.ok(fs.existsSync(path.join(sessionDir, DATA_FILE)));
});

test('restore --output names its file only once whole and durable: a failure or a kill leaves a file that was there as it was, and a new name free', async (t) => {
  if (!needs(t, { root: true, tools: ['strace'] })) return;
  const dir = tempDir(t, 'bdsnap-output-');
  const image = makeImage(path.join(dir, 'disk.img'), 1 << 20, 'random', 5);
  const before = await sha256File(image);
  const sessionDir = await oneSession(image, path.join(dir, 'snap'));
  const small = path.join(dir, 'small');
  fs.mkdirSync(small);
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=256k', 'tmpfs', small]);
  cleanupOf(t).after(() => execFileSync('umount', [small]));

  // A full disk: an earlier output there keeps its content, and nothing else is left.
  const earlier = path.join(small, 'out.img');
  fs.writeFileSync(earlier, 'an earlier restore\n', { mode: 0o600 });
  await assert.rejects(restore(sessionDir, { output: earlier }), isError('ENOSPC', /^cannot copy .*: no space left on device; the partly written .*\/\.out\.img\.bdsnap-restore-[0-9a-f]{8} was removed, and .*\/out\.img was not touched; free space there or give another --output$/));
  assert.equal(fs.readFileSync(earlier, 'utf8'), 'an earlier restore\n', 'the file that was there is as it was');
  assert.deepEqual(fs.readdirSync(small), ['out.img']);

  // Killed (strace, at the rename that would replace it, or at the link that would name a new
  // file): the name shows what it showed before; the whole copy waits under its temporary name.
  const out = path.join(dir, 'out');
  fs.mkdirSync(out);
  const lockDir = path.join(dir, 'locks');
  const killedAt = (target: string, call: 'rename' | 'link'): void => {
    // Device locks are taken with links, and a stale one (a killed restore's) is taken over with
    // a rename. So the link is picked by the output's path (strace's -P does not see a rename's
    // paths), and the restores lock in a directory of their own, where the first, killed at its
    // rename, finds no stale lock to take over.
    const inject = call === 'rename'
      ? ['-e', 'trace=rename,renameat,renameat2', '-e', 'inject=rename,renameat,renameat2:signal=SIGKILL']
      : ['-P', target, '-e', 'trace=link,linkat', '-e', 'inject=link,linkat:signal=SIGKILL'];
    const r = spawnSync('strace', ['-f', '-qq', '-o', '/dev/null', ...inject, process.execPath, BDSNAP_MAIN, 'restore', sessionDir, '--output', target], { encoding: 'utf8', timeout: 60_000, env: { ...process.env, BDSNAP_LOCK_DIR: lockDir } });
    assert.notEqual(r.status, 0, `the restore was killed: ${r.stdout}${r.stderr}`);
  };
  const existing = path.join(out, 'existing.img');
  fs.writeFileSync(existing, 'an earlier restore\n', { mode: 0o600 });
  killedAt(existing, 'rename');
  assert.equal(fs.readFileSync(existing, 'utf8'), 'an earlier restore\n', 'the file that was there is as it was');
  const fresh = path.join(out, 'fresh.img');
  killedAt(fresh, 'link');
  assert.equal(fs.existsSync(fresh), false, 'nothing under the new name');
  const temps = fs.readdirSync(out).filter((n) => n.includes('.bdsnap-restore-'));
  assert.equal(temps.length, 2, `one temporary file per killed restore: ${fs.readdirSync(out).join(', ')}`);
  for (const n of temps) assert.equal(await sha256File(path.join(out, n)), before, 'each holds the whole restored copy');

  // Run again: both names get the restored copy, and each restore names the file the killed
  // one left (on the command line, as a note on stderr).
  const leftOf = (name: string): string[] => temps.filter((n) => n.startsWith(`.${name}.`)).map((n) => path.join(out, n));
  const again = spawnSync(process.execPath, [BDSNAP_MAIN, 'restore', sessionDir, '--output', existing], { encoding: 'utf8', timeout: 60_000, env: { ...process.env, BDSNAP_LOCK_DIR: lockDir } });
  assert.equal(again.status, 0, again.stderr);
  assert.equal(leftOf('existing.img').length, 1);
  assert.ok(again.stderr.includes(`bdsnap: note: a file of earlier restores into ${existing} that did not finish (killed) is beside it: ${leftOf('existing.img')[0]}; remove it once`), again.stderr);
  assert.deepEqual((await restore(sessionDir, { output: fresh })).leftovers, leftOf('fresh.img'));
  assert.equal(await sha256File(existing), before);
  assert.equal(await sha256File(fresh), before);
});

test('sessions of /x/a_b are not taken for sessions of /x/a', async (t) => {
  const dir = tempDir(t, 'bdsnap-names-');
  const a = makeImage(path.join(dir, 'a'), 256 << 10, 'random', 1);
  const ab = makeImage(path.join(dir, 'a_b'), 256 << 10, 'random', 2);
  const root = path.join(dir, 'snap');
  const sa = await oneSession(a, root);
  const sab = await oneSession(ab, root);
  // An unreadable session of a_b (its manifest damaged) must not block or join a's.
  fs.writeFileSync(path.join(sab, 'manifest.json'), '{');
  assert.deepEqual((await listSessions(root, a)).map((s) => s.dir), [sa]);
  assert.equal((await listSessions(root, ab)).length, 1, 'a_b still sees its own unreadable session');
  const before = (await restore(sa, { dryRun: true })).sessionsApplied;
  assert.deepEqual(before, [sa]);
});

test('restore --output of a session the device is already back at writes the copy and says so, not "nothing to do"', async (t) => {
  const dir = tempDir(t);
  const image = makeImage(path.join(dir, 'a.img'), 1 << 20, 'random', 12);
  const before = await sha256File(image);
  const root = path.join(dir, 'snap');
  const session = await oneSession(image, root);
  await restore(session);
  assert.equal(await sha256File(image), before);
  const out = path.join(dir, 'copy.img');
  const r = spawnSync(process.execPath, [BDSNAP_MAIN, 'restore', session, '--output', out], { encoding: 'utf8', timeout: 60_000 });
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /a\.img already holds the content from the start of .*: .*copy\.img was written as a copy of it/);
  assert.doesNotMatch(r.stdout, /nothing to do/);
  assert.equal(await sha256File(out), before, 'the copy is the restored content');
});

test('restore in place refuses sessions another user could have written: one of theirs named a root file they can read and put their content in it', async (t) => {
  if (!needs(t, { root: true })) return;
  const dir = tempDir(t, 'bdsnap-output-');
  fs.chmodSync(dir, 0o711);
  // A root file others may read but not write, as /etc/passwd is.
  const target = makeImage(path.join(dir, 'target'), 65536, 'random', 7);
  fs.chmodSync(target, 0o644);
  const before = await sha256File(target);
  // Their session: an image of theirs holding their content, the target's content written over
  // it (so the end digests are the target's), then the manifest pointed at the target.
  const theirs = path.join(dir, 'theirs');
  fs.mkdirSync(theirs);
  const own = makeImage(path.join(theirs, 'own.img'), 65536, 'zero');
  fs.writeFileSync(own, Buffer.alloc(65536, 0x45));
  const dev = await FileDevice.open(own);
  let made: string;
  try {
    const cow = CowDevice.create(dev, { devicePath: own, snapshotRoot: path.join(theirs, 'snap'), chunkSize: CS, deviceIdentity: { ...dev.identity } });
    await cow.write(fs.readFileSync(target), 0);
    made = (await cow.close())!.sessionDir;
  } finally {
    await dev.close();
  }
  const manifest = JSON.parse(fs.readFileSync(path.join(made, MANIFEST_FILE), 'utf8')) as Record<string, unknown> & { mountTime: string };
  const st = fs.statSync(target, { bigint: true });
  const stamp = { kind: 'file', dev: String(st.dev), ino: String(st.ino), sizeBytes: 65536, mtimeNs: String(st.mtimeNs), ctimeNs: String(st.ctimeNs) };
  Object.assign(manifest, { devicePath: target, deviceIdentity: { kind: 'file', dev: Number(st.dev), ino: Number(st.ino), rdev: 0 }, startStamp: stamp, endStamp: stamp });
  fs.writeFileSync(path.join(made, MANIFEST_FILE), JSON.stringify(manifest));
  const forged = path.join(theirs, 'snap', sessionDirName(target, new Date(manifest.mountTime)));
  fs.renameSync(made, forged);
  execFileSync('chown', ['-R', 'nobody', theirs]);

  const inPlace = spawnSync(process.execPath, [BDSNAP_MAIN, 'restore', forged], { encoding: 'utf8', timeout: 60_000 });
  assert.equal(await sha256File(target), before, 'the root file keeps its content');
  assert.equal(inPlace.status, 1, inPlace.stdout);
  assert.match(inPlace.stderr, /^bdsnap: refusing to restore in place from .*: another user who could write there could have chosen what is written to the device \(.*snap is owned by uid \d+, not by this user/);
  // A copy is still made: root's own new file, with what the session holds.
  const copy = path.join(dir, 'copy.img');
  const toCopy = spawnSync(process.execPath, [BDSNAP_MAIN, 'restore', forged, '--output', copy], { encoding: 'utf8', timeout: 60_000 });
  assert.equal(toCopy.status, 0, toCopy.stderr);
  assert.ok(fs.readFileSync(copy).equals(Buffer.alloc(65536, 0x45)));
});
