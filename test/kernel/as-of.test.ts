/**
 * `<device>@asof:<mount time>`: a device as it was at the start of an earlier session, served
 * read-only by the daemon without writing the device. Through real clients: nbdcopy of the
 * export equals `restore --output` of that session, and `bdsnap mount` of it shows the files of
 * that time, read-only, while the device itself cannot be mounted; a view a restore would refuse
 * is refused too, and so is a view of a device another daemon holds (the refusal names that daemon).
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { CleanupStack } from '../../testkit/cleanup.js';
import { startDaemon, type RunningDaemon } from '../../testkit/daemon.js';
import { fillRandom, makeImage, makeTempDir, sha256File } from '../../testkit/files.js';
import { mountCycle, type Listed } from '../helpers/mount-cycle.js';
import { run } from '../../testkit/process.js';
import { needs } from '../../testkit/needs.js';
import { nbdUri } from '../../testkit/server.js';

const IMAGE_BYTES = 64 << 20;

async function sessionsOf(daemon: RunningDaemon, device: string): Promise<Listed[]> {
  return (JSON.parse((await daemon.cli(['list', device, '--json'])).stdout) as { sessions: Listed[] }).sessions;
}

/** nbdcopy of an export of the daemon into `file`; the run's result (allowed to fail). */
function copyExport(daemon: RunningDaemon, exportName: string, file: string): ReturnType<typeof run> {
  return run('nbdcopy', ['--', nbdUri(daemon.server.socketPath, exportName), file], { allowFailure: true, timeoutMs: 60_000 });
}

test('a device as at an earlier session start: exact, read-only, the device left alone', { timeout: 300_000 }, async (t) => {
  if (!needs(t, { root: true, paths: ['/dev/fuse'], tools: ['nbdfuse', 'nbdcopy', 'losetup', 'fusermount3', 'mkfs.ext4', 'mount', 'umount'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup, 'bdsnap-asof-');
  const image = path.join(dir, 'fs.img');
  makeImage(image, IMAGE_BYTES, 'zero');
  await run('mkfs.ext4', ['-q', '-F', '-b', '4096', image]);
  const h0 = await sha256File(image);
  const daemon = await startDaemon(cleanup, { activate: [image] });
  const device = daemon.server.exportNames[0] as string;
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);

  const sa = await mountCycle(daemon, device, mnt, 'a.bin', 1);
  const h1 = await sha256File(image);
  const sb = await mountCycle(daemon, device, mnt, 'b.bin', 2);
  const h2 = await sha256File(image);
  const times = new Map((await sessionsOf(daemon, device)).map((s) => [s.dir, s.mountTime]));
  const ta = times.get(sa)!;
  const tb = times.get(sb)!;

  // The export of each session start equals the device at that time, and restore --output of it.
  const copyA = path.join(dir, 'a.copy');
  const compact = ta.replace(/[-:]/g, '');
  const a = await copyExport(daemon, `${device}@asof:${compact}`, copyA);
  assert.equal(a.exitCode, 0, a.stderr);
  assert.equal(await sha256File(copyA), h0, 'as of Sa (compact time) is the first state');
  const copyB = path.join(dir, 'b.copy');
  assert.equal((await copyExport(daemon, `${device}@asof:${tb}`, copyB)).exitCode, 0);
  assert.equal(await sha256File(copyB), h1, 'as of Sb is the state after Sa');
  const restored = path.join(dir, 'b.restored');
  await daemon.cli(['restore', sb, '--output', restored]);
  assert.equal(await sha256File(restored), h1, 'restore --output of Sb agrees');
  assert.equal(await sha256File(image), h2, 'serving the views wrote nothing to the device');

  // Mounted: the files of that time, read-only; the device cannot be mounted meanwhile.
  const then = path.join(dir, 'then');
  fs.mkdirSync(then);
  await daemon.cli(['mount', `${device}@asof:${tb}`, then]);
  try {
    const expected = Buffer.alloc(1 << 20);
    fillRandom(expected, 1);
    assert.deepEqual(fs.readFileSync(path.join(then, 'a.bin')), expected, 'a.bin as written in Sa');
    assert.equal(fs.existsSync(path.join(then, 'b.bin')), false, 'b.bin was written after Sb started');
    assert.throws(() => fs.writeFileSync(path.join(then, 'new.bin'), 'x'), /EROFS|read-only/);
    const busy = await daemon.cli(['mount', device, mnt], undefined, true);
    assert.notEqual(busy.exitCode, 0, 'the device must not be mounted while it is viewed as of an earlier time');
    assert.match(busy.stderr, /is served as it was at/);
    // Nor restored: the refusal names the view and the unmount that ends it.
    const restoreBusy = await daemon.cli(['restore', sb], undefined, true);
    assert.notEqual(restoreBusy.exitCode, 0, 'the device must not be restored while it is viewed');
    assert.match(restoreBusy.stderr, new RegExp(`by the as-of view .*@asof:.* \\(\\d+ NBD client\\(s\\), mounted through bdsnap at ${then}\\), which needs the device still; the view ends when its last client lets go: run bdsnap umount ${then} first`), restoreBusy.stderr);
  } finally {
    await daemon.cli(['umount', then]);
  }
  assert.equal(await sha256File(image), h2, 'the mounted view wrote nothing to the device');
  await mountCycle(daemon, device, mnt, 'c.bin', 3);

  // Refused as a restore would be: an unknown time, and a device written outside bdsnap.
  const unknown = await copyExport(daemon, `${device}@asof:20000101T000000.000Z`, path.join(dir, 'x.copy'));
  assert.notEqual(unknown.exitCode, 0, 'an unknown session time is refused');
  const fd = fs.openSync(image, 'r+');
  fs.writeSync(fd, Buffer.from('outside'), 0, 7, IMAGE_BYTES - 4096);
  fs.closeSync(fd);
  const moved = await copyExport(daemon, `${device}@asof:${ta}`, path.join(dir, 'y.copy'));
  assert.notEqual(moved.exitCode, 0, `a device written outside bdsnap cannot be taken back: ${moved.stdout}`);
});

test('an as-of view of a device another daemon holds: refused, naming that daemon', { timeout: 300_000 }, async (t) => {
  if (!needs(t, { root: true, paths: ['/dev/fuse'], tools: ['nbdfuse', 'losetup', 'fusermount3', 'mkfs.ext4', 'mount', 'umount'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup, 'bdsnap-asof-other-');
  const image = path.join(dir, 'fs.img');
  makeImage(image, IMAGE_BYTES, 'zero');
  await run('mkfs.ext4', ['-q', '-F', '-b', '4096', image]);
  const b = await startDaemon(cleanup, { activate: [image] });
  const device = b.server.exportNames[0] as string;
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  const sa = await mountCycle(b, device, mnt, 'a.bin', 1);
  const ta = (await sessionsOf(b, device)).find((s) => s.dir === sa)!.mountTime;
  // Daemon A, with directories of its own, takes the device: a snapshot of it.
  const a = await startDaemon(cleanup, {});
  await a.cli(['snapshot', 'create', image]);
  const before = await sha256File(image);
  const then = path.join(dir, 'then');
  fs.mkdirSync(then);
  const refused = await b.cli(['mount', `${device}@asof:${ta}`, then], undefined, true);
  t.diagnostic(refused.stderr);
  assert.notEqual(refused.exitCode, 0, 'a view of a device another daemon holds is refused');
  assert.equal(refused.stderr.trim().split('\n').length, 1, `one line: ${refused.stderr}`);
  assert.match(refused.stderr, /is already open by process \d+, another bdsnap daemon \(run directory [^)]+\), not this one/, refused.stderr);
  assert.ok(refused.stderr.includes(a.runDir), `it names where the device can be freed: ${refused.stderr}`);
  assert.equal(await sha256File(image), before, 'the device is untouched');
});
