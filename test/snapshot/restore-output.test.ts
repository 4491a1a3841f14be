/**
 * `restore --output` as root in a directory another user can write (the README's example is
 * /tmp/before.img): a symlink or a hard link planted there by that user, or a file of theirs,
 * is never written through; a restore that fails after creating its output removes it. The
 * attacker is a real unprivileged user (`nobody` through runuser).
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { FileDevice } from '../../src/device/file-device.js';
import { DATA_FILE } from '../../src/snapshot/format.js';
import { CowDevice, listSessions, restore } from '../../src/snapshot/index.js';
import { needs } from '../../testkit/needs.js';
import { cleanupOf } from '../../testkit/cleanup.js';
import { makeImage, sha256File } from '../../testkit/files.js';
import { isError, tempDir } from './helpers.js';

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
