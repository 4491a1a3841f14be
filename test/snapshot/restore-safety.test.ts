/**
 * Restore fails closed: when it cannot tell whether the device is in use (mount table or sysfs
 * unreadable) it refuses with the reason, and a restore journal that does not validate stops it.
 * The host facts are read from injected paths, so these run without root and without mounts.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { FileDevice } from '../../src/device/file-device.js';
import { JOURNAL_FILE } from '../../src/snapshot/format.js';
import { CowDevice, checkNotInUse, restore } from '../../src/snapshot/index.js';
import { makeImage, sha256File } from '../../testkit/files.js';
import { isError, tempDir } from './helpers.js';

const CS = 16384;

/**
 * A fake host: an empty mount table, a sysfs with one free loop device, and a /dev without
 * loop nodes (so a crafted loop entry is judged by its name, never by a real device's ioctl).
 */
function fakeHost(dir: string): { mountinfo: string; sysBlock: string; dev: string } {
  fs.mkdirSync(dir, { recursive: true });
  const mountinfo = path.join(dir, 'mountinfo');
  fs.writeFileSync(mountinfo, '22 1 8:1 / / rw - ext4 /dev/sda1 rw\n');
  const sysBlock = path.join(dir, 'sys-block');
  fs.mkdirSync(path.join(sysBlock, 'loop0'), { recursive: true });
  const dev = path.join(dir, 'dev');
  fs.mkdirSync(dev);
  return { mountinfo, sysBlock, dev };
}

async function oneSession(image: string, root: string): Promise<string> {
  const dev = await FileDevice.open(image);
  try {
    const cow = CowDevice.create(dev, { devicePath: image, snapshotRoot: root, chunkSize: CS, deviceIdentity: { ...dev.identity } });
    await cow.write(randomBytes(3 * CS), CS);
    const summary = await cow.close();
    assert.equal(summary?.state, 'complete');
    return summary.sessionDir;
  } finally {
    await dev.close();
  }
}

test('checkNotInUse: an unreadable mount table or sysfs is a refusal with the reason, never a pass', async (t) => {
  const dir = tempDir(t);
  const image = makeImage(path.join(dir, 'a disk.img'), 1 << 20, 'random', 1);
  const host = fakeHost(dir);
  await checkNotInUse(image, host);
  const missing = path.join(dir, 'missing');
  await assert.rejects(checkNotInUse(image, { ...host, mountinfo: missing }), isError('EIO', /cannot tell whether .* is in use.*mount table/));
  // A directory where the table should be: open succeeds, read fails (EISDIR).
  await assert.rejects(checkNotInUse(image, { ...host, mountinfo: dir }), isError('EIO', /cannot tell/));
  await assert.rejects(checkNotInUse(image, { ...host, sysBlock: missing }), isError('EIO', /cannot tell whether .* is in use.*block devices/));
  // A loop entry whose backing_file cannot be read (here: a directory) is not skipped either.
  fs.mkdirSync(path.join(host.sysBlock, 'loop3', 'loop', 'backing_file'), { recursive: true });
  await assert.rejects(checkNotInUse(image, host), isError('EIO', /cannot tell/));
});

test('checkNotInUse: a mount or a loop device of a path with a space is found', async (t) => {
  const dir = tempDir(t);
  const image = makeImage(path.join(dir, 'a disk.img'), 1 << 20, 'random', 2);
  const host = fakeHost(dir);
  const escaped = image.replaceAll(' ', '\\040');
  fs.appendFileSync(host.mountinfo, `40 22 0:50 / /mnt/my\\040mount rw - ext4 ${escaped} rw\n`);
  await assert.rejects(checkNotInUse(image, host), isError('EBUSY', /mounted at \/mnt\/my mount/));
  const clean = fakeHost(path.join(dir, 'b'));
  fs.mkdirSync(path.join(clean.sysBlock, 'loop7', 'loop'), { recursive: true });
  fs.writeFileSync(path.join(clean.sysBlock, 'loop7', 'loop', 'backing_file'), `${image}\n`);
  await assert.rejects(checkNotInUse(image, clean), isError('EBUSY', /backing file of \/dev\/loop7/));
});

test('restore refuses, writing nothing, when the host cannot say the device is free', async (t) => {
  const dir = tempDir(t);
  const image = makeImage(path.join(dir, 'disk.img'), 1 << 20, 'random', 3);
  const sessionDir = await oneSession(image, path.join(dir, 'snap'));
  const changed = await sha256File(image);
  const host = fakeHost(dir);
  await assert.rejects(restore(sessionDir, { hostPaths: { ...host, mountinfo: path.join(dir, 'missing') } }), isError('EIO', /cannot tell/));
  await assert.rejects(restore(sessionDir, { hostPaths: { ...host, sysBlock: path.join(dir, 'missing') } }), isError('EIO', /cannot tell/));
  assert.equal(await sha256File(image), changed, 'nothing written');
  assert.equal(fs.existsSync(path.join(sessionDir, JOURNAL_FILE)), false, 'no journal either');
  const summary = await restore(sessionDir, { hostPaths: host });
  assert.equal(summary.digestCheck, 'verified', 'with a readable host the same restore goes through');
});

test('a restore journal that does not validate stops the restore', async (t) => {
  const dir = tempDir(t);
  const image = makeImage(path.join(dir, 'disk.img'), 1 << 20, 'random', 4);
  const sessionDir = await oneSession(image, path.join(dir, 'snap'));
  const changed = await sha256File(image);
  const journal = path.join(sessionDir, JOURNAL_FILE);
  const cases: Array<[string, string, RegExp]> = [
    ['not JSON', '{"state": "running"', /not a valid restore journal/],
    ['unknown state', JSON.stringify({ state: 'paused', devicePath: image, sessions: [], startedAt: 'x' }), /state/],
    ['sessions of the wrong type', JSON.stringify({ state: 'done', devicePath: image, sessions: 'all', startedAt: 'x' }), /sessions/],
    ['missing start time', JSON.stringify({ state: 'running', devicePath: image, sessions: [] }), /startedAt/],
    ['another device', JSON.stringify({ state: 'running', devicePath: '/dev/other', sessions: [sessionDir], startedAt: 'x' }), /not of /],
  ];
  for (const [name, text, message] of cases) {
    fs.writeFileSync(journal, text);
    await assert.rejects(restore(sessionDir), isError('ECORRUPT', message), name);
    assert.equal(await sha256File(image), changed, `${name}: nothing written`);
  }
});
