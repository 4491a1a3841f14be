/**
 * Host facts: the one mountinfo parser (escapes undone, checked against the kernel's own
 * escaping with a real mount whose path holds a space, a tab and a newline), dev_t decoding
 * with large minor numbers, atomic file replacement, loop-device listing and /proc identity.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { decodeDevT, encodeDevT, formatDevT } from '../../src/host/dev-t.js';
import { writeFileAtomic, writeFileAtomicSync } from '../../src/host/atomic-file.js';
import { listLoopDevices, loopBackingFile } from '../../src/host/loop-devices.js';
import { isMountpoint, parseMountInfo, readMountInfo, unescapeMountField } from '../../src/host/mountinfo.js';
import { processCommandLine, processStartTime, processStartTimeSync } from '../../src/host/processes.js';
import { preadFully, pwriteFully, writevFully, writevFullySync } from '../../src/host/fd-io.js';
import { BdsnapError } from '../../src/errors.js';
import { CleanupStack } from '../../testkit/cleanup.js';
import { makeTempDir } from '../../testkit/files.js';
import { needs } from '../../testkit/needs.js';
import { rawProcStat, spawnZombie } from '../../testkit/process.js';


test('mountinfo: fields are split and every path field unescaped', () => {
  const text = [
    '36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue',
    '37 35 0:42 / /mnt/tab\\011and\\012newline\\134back rw - tmpfs my\\040source rw',
    '38 35 259:1048577 / /big rw shared:2 master:3 - xfs /dev/nvme0n1p1 rw',
    'garbage line without separator',
    '',
  ].join('\n');
  const entries = parseMountInfo(text);
  assert.equal(entries.length, 3, 'a malformed line is skipped');
  assert.deepEqual(entries.map((e) => e.mountPoint), ['/mnt/with space', '/mnt/tab\tand\nnewline\\back', '/big']);
  assert.equal(entries[0]!.root, '/mnt1');
  assert.equal(entries[0]!.fsType, 'ext3');
  assert.equal(entries[0]!.source, '/dev/root');
  assert.equal(entries[1]!.source, 'my source');
  assert.equal(entries[2]!.majorMinor, '259:1048577');
  assert.equal(entries[2]!.fsType, 'xfs', 'optional fields before the separator are skipped');
  assert.equal(unescapeMountField('a\\040b\\011c\\012d\\134e'), 'a b\tc\nd\\e');
});

test('mountinfo: a real mount on a path with a space, a tab and a newline is found', async (t) => {
  if (!needs(t, { root: true, tools: ['mount', 'umount'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup, 'bdsnap-mountinfo-');
  const target = path.join(dir, 'a b\tc\nd');
  fs.mkdirSync(target);
  assert.equal(await isMountpoint(target), false);
  const mounted = spawnSync('mount', ['-t', 'tmpfs', 'bdsnap-test', target], { encoding: 'utf8' });
  assert.equal(mounted.status, 0, `mount: ${mounted.stderr}`);
  cleanup.after(() => spawnSync('umount', [target]));
  assert.equal(await isMountpoint(target), true);
  const entry = (await readMountInfo()).find((m) => m.mountPoint === target);
  assert.equal(entry?.fsType, 'tmpfs');
  assert.equal(entry?.source, 'bdsnap-test');
});

test('mountinfo: an unreadable table is an error, not an empty one', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-mountinfo-');
  const missing = path.join(dir, 'no-such-file');
  await assert.rejects(readMountInfo(missing), (e: unknown) => e instanceof BdsnapError && e.code === 'EIO' && e.message.includes(missing));
  await assert.rejects(isMountpoint('/', missing), (e: unknown) => e instanceof BdsnapError && e.code === 'EIO');
});

test('dev_t: large major and minor numbers survive the round trip', () => {
  for (const [major, minor] of [[8, 1], [7, 0], [259, 1048577], [4095, 255], [4096, 256], [0xfffff, 0xfffff], [1, (1 << 20) - 1]] as const) {
    const dev = encodeDevT(major, minor);
    assert.deepEqual(decodeDevT(dev), { major, minor }, `${major}:${minor}`);
    assert.deepEqual(decodeDevT(Number(dev)), { major, minor }, `${major}:${minor} as a number`);
  }
  // Known encodings (glibc makedev): 8:1 is 0x801; 259:1048577 sets bit 32 (the minor's 0x100000).
  assert.equal(formatDevT(0x801), '8:1');
  assert.equal(encodeDevT(259, 1048577), 0x100010301n);
  assert.equal(formatDevT(0x100010301n), '259:1048577');
  assert.equal(formatDevT(Number(0x100010301n)), '259:1048577');
  // A major above 4095 lives at bit 44 and up: it must not leak into the minor.
  assert.equal(formatDevT(encodeDevT(4096, 256)), '4096:256');
  // A minor above 255 must not be read with a 32-bit shift (the old bug).
  const dev = Number(encodeDevT(7, 300));
  assert.equal(formatDevT(dev), '7:300');
  if (fs.existsSync('/dev/loop0')) {
    const st = fs.statSync('/dev/loop0');
    assert.equal(formatDevT(st.rdev), fs.readFileSync('/sys/block/loop0/dev', 'utf8').trim(), 'agrees with sysfs for /dev/loop0');
  }
});

test('writeFileAtomic: replaces with the exact mode and leaves no temporary file, even when rename fails', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-atomic-');
  const file = path.join(dir, 'state.json');
  await writeFileAtomic(file, 'one', 0o600);
  await writeFileAtomic(file, 'two', 0o640);
  assert.equal(fs.readFileSync(file, 'utf8'), 'two');
  assert.equal(fs.statSync(file).mode & 0o777, 0o640);
  // Many concurrent writers in one process: each has its own temporary file, one wins whole.
  await Promise.all(Array.from({ length: 20 }, (_, k) => writeFileAtomic(file, `writer ${k} `.repeat(1000))));
  assert.match(fs.readFileSync(file, 'utf8'), /^(writer \d+ )\1*$/);
  assert.deepEqual(fs.readdirSync(dir), ['state.json']);
  // Rename onto a non-empty directory fails: the temporary file must go too.
  const blocked = path.join(dir, 'blocked');
  fs.mkdirSync(blocked);
  fs.writeFileSync(path.join(blocked, 'x'), '');
  await assert.rejects(writeFileAtomic(blocked, 'data'), (e: unknown) => e instanceof BdsnapError);
  assert.deepEqual(fs.readdirSync(dir).sort(), ['blocked', 'state.json'], 'no temporary file is left behind');
});

test('writeFileAtomicSync: writes its parts in order with the exact mode, and leaves no temporary file when rename fails', (t) => {
  const dir = makeTempDir(t, 'bdsnap-atomic-sync-');
  const file = path.join(dir, 'map');
  const parts = [Buffer.from('header '), Buffer.alloc(0), Buffer.alloc(1 << 20, 0x41)];
  writeFileAtomicSync(file, 'old', 0o644);
  writeFileAtomicSync(file, parts, 0o600);
  assert.deepEqual(fs.readFileSync(file), Buffer.concat(parts));
  assert.equal(fs.statSync(file).mode & 0o777, 0o600);
  assert.deepEqual(fs.readdirSync(dir), ['map']);
  const blocked = path.join(dir, 'blocked');
  fs.mkdirSync(blocked);
  fs.writeFileSync(path.join(blocked, 'x'), '');
  assert.throws(() => writeFileAtomicSync(blocked, [Buffer.from('data')]), (e: unknown) => e instanceof BdsnapError);
  assert.deepEqual(fs.readdirSync(dir).sort(), ['blocked', 'map'], 'no temporary file is left behind');
});

test('fd I/O: pwriteFully and preadFully move whole ranges; preadFully stops at the end', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-fdio-');
  const fd = fs.openSync(path.join(dir, 'f'), 'w+');
  t.after(() => fs.closeSync(fd));
  const data = Buffer.alloc(3 << 20, 0x5a);
  await pwriteFully(fd, data, 100);
  const back = Buffer.alloc(data.length);
  assert.equal(await preadFully(fd, back, 100), data.length);
  assert.deepEqual(back, data);
  assert.equal(await preadFully(fd, Buffer.alloc(50), data.length + 80), 20);
});

test('fd I/O: writevFully and writevFullySync put buffers one after the other at a position, empty ones too', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-fdio-');
  const fd = fs.openSync(path.join(dir, 'v'), 'w+');
  t.after(() => fs.closeSync(fd));
  const parts = [Buffer.from('head '), Buffer.alloc(0), Buffer.alloc(2 << 20, 0x41), Buffer.from(' tail')];
  const whole = Buffer.concat(parts);
  await writevFully(fd, parts, 10);
  writevFullySync(fd, parts, 10 + whole.length);
  const back = Buffer.alloc(2 * whole.length);
  assert.equal(await preadFully(fd, back, 10), back.length);
  assert.deepEqual(back, Buffer.concat([whole, whole]));
  assert.equal(fs.fstatSync(fd).size, 10 + 2 * whole.length);
});

test('loop devices: sysfs is listed, and an unreadable sysfs is an error', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-sysblock-');
  // A fake sysfs: loop0 attached (deleted file), loop1 free, sda not a loop device.
  fs.mkdirSync(path.join(dir, 'loop0', 'loop'), { recursive: true });
  fs.writeFileSync(path.join(dir, 'loop0', 'loop', 'backing_file'), '/images/a b.img (deleted)\n');
  fs.mkdirSync(path.join(dir, 'loop1'));
  fs.mkdirSync(path.join(dir, 'sda', 'loop'), { recursive: true });
  fs.writeFileSync(path.join(dir, 'sda', 'loop', 'backing_file'), '/nope\n');
  fs.writeFileSync(path.join(dir, 'loop0', 'dev'), '7:0\n');
  assert.deepEqual(await listLoopDevices(dir), [{ name: 'loop0', devicePath: '/dev/loop0', backingFile: '/images/a b.img', backingFileDeleted: true, majorMinor: '7:0' }]);
  assert.equal(await loopBackingFile('/dev/loop1', dir), null);
  await assert.rejects(listLoopDevices(path.join(dir, 'missing')), (e: unknown) => e instanceof BdsnapError && e.code === 'EIO');
  // A backing_file that exists but cannot be read (a directory here) is an error too.
  fs.mkdirSync(path.join(dir, 'loop2', 'loop', 'backing_file'), { recursive: true });
  await assert.rejects(listLoopDevices(dir), (e: unknown) => e instanceof BdsnapError && e.code === 'EIO');
});

test('process identity: start time and command line of a live process; null once it is gone', async () => {
  const child = spawn('sleep', ['30'], { stdio: 'ignore' });
  const pid = child.pid!;
  const start = await processStartTime(pid);
  assert.match(start ?? '', /^\d+$/);
  assert.equal(await processStartTime(pid), start, 'stable');
  assert.notEqual(await processStartTime(process.pid), start);
  assert.deepEqual(await processCommandLine(pid), ['sleep', '30']);
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGKILL');
  await exited;
  assert.equal(await processStartTime(pid), null);
  assert.equal(await processCommandLine(pid), null);
});

test('process identity: a zombie (exited, not yet reaped by its parent) is gone, though /proc still lists it', async (t) => {
  const zombie = await spawnZombie(t);
  assert.equal(rawProcStat(zombie.pid)?.state, 'Z', 'the pid is still in /proc, as a zombie');
  assert.equal(await processStartTime(zombie.pid), null);
  assert.equal(processStartTimeSync(zombie.pid), null);
  // Its parent, alive, is not.
  assert.match((await processStartTime(zombie.parentPid)) ?? '', /^\d+$/);
  // "Cannot tell" stays an error, never "gone": a stat line that does not parse.
  const proc = makeTempDir(t, 'bdsnap-proc-');
  fs.mkdirSync(path.join(proc, '42'));
  fs.writeFileSync(path.join(proc, '42', 'stat'), '42 (x) ? 1 2\n');
  await assert.rejects(processStartTime(42, proc), (e: unknown) => e instanceof BdsnapError && e.code === 'EIO');
});
