/**
 * Device stamps: the comparison rules on crafted stamps (a set-back mtime is caught by the
 * ctime; block counters compare within one boot only; a loop device's backing file vouches
 * across boots), and stamps read from a real loop device, moved by a write through it and by
 * a write to its backing file.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { compareDeviceStamps, parseDeviceStamp, readDeviceStamp, type BlockStamp, type FileStamp } from '../../src/host/device-stamp.js';
import { cleanupOf } from '../../testkit/cleanup.js';
import { makeImage, makeTempDir } from '../../testkit/files.js';
import { needs } from '../../testkit/needs.js';

const FILE: FileStamp = { kind: 'file', dev: '2049', ino: '131', sizeBytes: 1 << 20, mtimeNs: '1700000000123456789', ctimeNs: '1700000000123456789' };
const BLOCK: BlockStamp = {
  kind: 'block', majorMinor: '8:16', sizeBytes: 1 << 30, diskId: 'wwid=naa.5000c500a1b2c3d4', bootId: 'boot-1',
  sectorsWritten: 800, sectorsDiscarded: 8,
};
const LOOP: BlockStamp = { ...BLOCK, majorMinor: '7:3', diskId: '', loop: { backingFile: FILE, offsetBytes: 0, sizeLimitBytes: 0 } };

function differs(a: Parameters<typeof compareDeviceStamps>[0], b: Parameters<typeof compareDeviceStamps>[1]): { proven: boolean; detail: string } {
  const r = compareDeviceStamps(a, b);
  assert.equal(r.same, false, `${JSON.stringify(a)} vs ${JSON.stringify(b)} compare as the same`);
  return r as { proven: boolean; detail: string };
}

test('file stamps: equal is the same; any of dev, ino, size, mtime, ctime differing is a change that names it', () => {
  assert.deepEqual(compareDeviceStamps(FILE, { ...FILE }), { same: true });
  const setBack = differs(FILE, { ...FILE, ctimeNs: '1700000100000000000' });
  assert.equal(setBack.proven, true);
  assert.match(setBack.detail, /ctime 2023-11-14T22:13:20\.123456789Z \(1700000000123456789 ns\) -> 2023-11-14T22:15:00\.000000000Z \(1700000100000000000 ns\)/);
  assert.doesNotMatch(setBack.detail, /mtime/);
  assert.match(differs(FILE, { ...FILE, ino: '132' }).detail, /file 2049:131 -> 2049:132/);
  assert.match(differs(FILE, { ...FILE, sizeBytes: 4096 }).detail, /size/);
  assert.match(differs(FILE, { ...FILE, mtimeNs: '1' }).detail, /mtime/);
  assert.match(differs(FILE, BLOCK).detail, /was an image file and is now a block device/);
});

test('block stamps: counters compare within one boot; disk id, number and size always', () => {
  assert.deepEqual(compareDeviceStamps(BLOCK, { ...BLOCK }), { same: true });
  for (const k of ['sectorsWritten', 'sectorsDiscarded'] as const) {
    const r = differs(BLOCK, { ...BLOCK, [k]: BLOCK[k] + 1 });
    assert.equal(r.proven, true);
    assert.match(r.detail, new RegExp(`written while it was not served \\(${k} `));
  }
  const rebooted = differs(BLOCK, { ...BLOCK, bootId: 'boot-2', sectorsWritten: 0 });
  assert.equal(rebooted.proven, false, 'counters of another boot prove nothing');
  assert.match(rebooted.detail, /host restarted .*boot boot-1, now boot-2/);
  assert.equal(differs(BLOCK, { ...BLOCK, bootId: '' }).proven, false);
  assert.equal(differs({ ...BLOCK, bootId: '' }, { ...BLOCK, bootId: '' }).proven, false, 'an unknown boot is never the same boot');
  // Another disk under the same number is a change even in another boot.
  const swapped = differs(BLOCK, { ...BLOCK, bootId: 'boot-2', diskId: 'wwid=naa.5000c500ffffffff' });
  assert.equal(swapped.proven, true);
  assert.match(swapped.detail, /diskId/);
  assert.match(differs(BLOCK, { ...BLOCK, majorMinor: '8:32' }).detail, /majorMinor "8:16" -> "8:32"/);
  assert.match(differs(BLOCK, { ...BLOCK, sizeBytes: 1 << 29 }).detail, /sizeBytes/);
});

test('loop stamps: the backing file is compared too, and vouches for the content across a reboot', () => {
  assert.deepEqual(compareDeviceStamps(LOOP, { ...LOOP, bootId: 'boot-2', sectorsWritten: 0 }), { same: true });
  const written = differs(LOOP, { ...LOOP, loop: { ...LOOP.loop!, backingFile: { ...FILE, ctimeNs: '1800000000000000000' } } });
  assert.equal(written.proven, true);
  assert.match(written.detail, /backing file ctime/);
  assert.match(differs(LOOP, { ...LOOP, loop: { ...LOOP.loop!, offsetBytes: 4096 } }).detail, /loop offset 0 -> 4096/);
  assert.match(differs(LOOP, { ...LOOP, sectorsWritten: 900 }).detail, /sectorsWritten 800 -> 900/);
  assert.match(differs(LOOP, { ...LOOP, loop: undefined }).detail, /no longer a loop device/);
});

test('stamps survive their JSON form; anything else does not parse', () => {
  assert.deepEqual(parseDeviceStamp(JSON.stringify(LOOP)), LOOP);
  assert.deepEqual(parseDeviceStamp(JSON.stringify(FILE)), FILE);
  assert.equal(parseDeviceStamp('{"kind":"block"}'), undefined);
  assert.equal(parseDeviceStamp(JSON.stringify({ ...FILE, extra: 1 })), undefined);
  assert.equal(parseDeviceStamp('not json'), undefined);
});

test('a real loop device: a write through it and a write to its backing file both move its stamp', { timeout: 30_000 }, async (t) => {
  if (!needs(t, { root: true, tools: ['losetup'] })) return;
  const dir = makeTempDir(t, 'bdsnap-stamp-');
  const image = makeImage(path.join(dir, 'disk.img'), 4 << 20, 'random', 3);
  const loop = execFileSync('losetup', ['--find', '--show', image], { encoding: 'utf8' }).trim();
  cleanupOf(t).after(() => execFileSync('losetup', ['-d', loop]));

  const first = await readDeviceStamp(loop);
  assert.equal(first.kind, 'block');
  assert.equal((first as BlockStamp).sizeBytes, 4 << 20);
  assert.equal((first as BlockStamp).loop?.backingFile.ino, fs.statSync(image, { bigint: true }).ino.toString());
  assert.deepEqual(compareDeviceStamps(first, await readDeviceStamp(loop)), { same: true }, 'nothing happened: the same');

  const fd = fs.openSync(loop, 'r+');
  fs.writeSync(fd, Buffer.alloc(4096, 0x5a), 0, 4096, 8192);
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  const afterLoopWrite = await readDeviceStamp(loop);
  const r = differs(first, afterLoopWrite);
  assert.equal(r.proven, true);
  assert.match(r.detail, /sectorsWritten|backing file/);
  assert.ok((afterLoopWrite as BlockStamp).sectorsWritten >= (first as BlockStamp).sectorsWritten + 8, 'the kernel counted the sectors');

  const file = fs.openSync(image, 'r+');
  fs.writeSync(file, Buffer.alloc(512, 1), 0, 512, 0);
  fs.closeSync(file);
  const afterFileWrite = differs(afterLoopWrite, await readDeviceStamp(loop));
  assert.match(afterFileWrite.detail, /backing file .*ctime/);
  assert.doesNotMatch(afterFileWrite.detail, /sectorsWritten/, 'a write to the file bypasses the loop device\'s counters');
});
