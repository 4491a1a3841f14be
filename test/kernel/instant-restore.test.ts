/**
 * `backup restore --instant`: the daemon serves the backup on the target at once and copies the
 * rest behind. Through the kernel: an ext4 backed up, then zeroed, is mounted through bdsnap right
 * after the command returns, its files are exact while the copy runs, a file written meanwhile
 * survives, and `e2fsck -fn` passes at the end. Across SIGKILLs of the daemon mid-copy: it resumes
 * and the target ends as the backup plus every write a client flushed. A qemu guest boots on a
 * disk under instant restore, reads and writes it while the copy runs, and shuts down cleanly.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { LocalDirStore, Repository, backupDevices } from '../../src/backup/index.js';
import { NbdClient } from '../../src/nbd/client.js';
import { CleanupStack } from '../../testkit/cleanup.js';
import { TEST_REPO_PASSWORD, sandbox, startDaemon, type RunningDaemon } from '../../testkit/daemon.js';
import { makeImage, makeTempDir, sha256File } from '../../testkit/files.js';
import { run } from '../../testkit/process.js';
import { needs } from '../../testkit/needs.js';
import { ServeSnapshotProvider } from '../../testkit/snapshot-provider.js';
import { GUEST_TOOLS, guestKernelRoot, runGuest } from '../helpers/guest.js';
import { ext4WithFiles } from '../helpers/ext4.js';

const MiB = 1 << 20;

interface RestoreInfo { target: string; state: string; doneBytes: number; totalBytes: number; error: string | null }

async function restores(daemon: RunningDaemon): Promise<RestoreInfo[]> {
  return (JSON.parse((await daemon.cli(['status', '--json'])).stdout) as { restores: RestoreInfo[] }).restores;
}

/** Until the daemon lists no restore of `target` any more (it finished and nobody holds it). */
async function waitDone(daemon: RunningDaemon, target: string, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const r = (await restores(daemon)).find((x) => x.target === target);
    if (!r) return;
    if (r.state === 'failed') throw new Error(`the restore failed: ${r.error}`);
    if (Date.now() > deadline) throw new Error(`the restore did not finish in ${timeoutMs} ms: ${JSON.stringify(r)}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** A backup of `image` in a new local repository; its id. */
async function backUp(dir: string, image: string): Promise<{ repoDir: string; id: string }> {
  const repoDir = path.join(dir, 'repo');
  await Repository.init(new LocalDirStore(repoDir), { password: TEST_REPO_PASSWORD });
  const repo = await Repository.open(new LocalDirStore(repoDir), { password: () => TEST_REPO_PASSWORD });
  const { id } = await backupDevices(repo, new ServeSnapshotProvider(dir), [image]);
  return { repoDir, id };
}

function zeroFile(file: string): void {
  const size = fs.statSync(file).size;
  fs.truncateSync(file, 0);
  fs.truncateSync(file, size);
}

test('instant restore: ext4 usable at once, exact files, a write during the copy survives', { timeout: 300_000 }, async (t) => {
  if (!needs(t, { root: true, paths: ['/dev/fuse'], tools: ['nbdfuse', 'losetup', 'fusermount3', 'mkfs.ext4', 'e2fsck', 'mount', 'umount'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup, 'bdsnap-instant-');
  const image = path.join(dir, 'fs.img');
  const files = new Map<string, Buffer>(Array.from({ length: 12 }, (_, k) => [`f${k}.bin`, crypto.randomBytes(Math.floor((k + 1) * 1.5 * MiB) + 777)] as const));
  ext4WithFiles(image, 256 * MiB, files);
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  const { repoDir, id } = await backUp(dir, image);
  zeroFile(image);

  // The copy is held to 16 MiB/s so that the files are read while it runs.
  const daemon = await startDaemon(cleanup, { password: false, extraArgs: ['--restore-rate', '16M'] });
  const started = Date.now();
  const r = await daemon.cli(['backup', 'restore', '--repo', repoDir, id, image, '--instant', '--json']);
  assert.equal((JSON.parse(r.stdout) as RestoreInfo).target, image);
  await daemon.cli(['mount', image, mnt]);
  const usableMs = Date.now() - started;
  try {
    const during = await restores(daemon);
    assert.equal(during[0]?.state, 'running', 'the copy still runs while the files are read');
    assert.ok(during[0]!.doneBytes < during[0]!.totalBytes);
    for (const [name, data] of files) assert.deepEqual(fs.readFileSync(path.join(mnt, name)), data, `${name} while the copy runs`);
    const written = crypto.randomBytes(5 * MiB);
    fs.writeFileSync(path.join(mnt, 'new.bin'), written);
    files.set('new.bin', written);
    await run('sync', []);
    t.diagnostic(`mounted ${usableMs} ms after the command began; restores then: ${JSON.stringify(during)}`);
    const refused = await daemon.cli(['snapshot', 'create', image], undefined, true);
    assert.notEqual(refused.exitCode, 0, 'a device under restore is not snapshotted');
    assert.match(refused.stderr, /being restored|open through the restore/);
  } finally {
    await daemon.cli(['umount', mnt]);
  }
  await waitDone(daemon, image);
  await daemon.server.stop();
  await run('e2fsck', ['-fn', image]);
  await run('mount', ['-o', 'loop,ro', image, mnt]);
  try {
    for (const [name, data] of files) assert.deepEqual(fs.readFileSync(path.join(mnt, name)), data, `${name} after the restore`);
  } finally {
    await run('umount', [mnt]);
  }
});

test('instant restore: a qemu guest mounts its disk while the copy runs, writes, and shuts down cleanly', { timeout: 300_000 }, async (t) => {
  if (!needs(t, { root: true, paths: [guestKernelRoot()], tools: [...GUEST_TOOLS, 'mkfs.ext4', 'e2fsck', 'mount', 'umount'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup, 'bdsnap-instant-guest-');
  const image = path.join(dir, 'disk.img');
  const files = new Map<string, Buffer>(Array.from({ length: 6 }, (_, k) => [`f${k}.bin`, crypto.randomBytes((k + 1) * 3 * MiB + 4321)] as const));
  ext4WithFiles(image, 256 * MiB, files);
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  const { repoDir, id } = await backUp(dir, image);
  zeroFile(image);

  // At 1 MiB/s the copy of 256 MiB (less what the guest reads) outlasts its boot and work; checked below.
  const box = sandbox(t, 'bdsnap-instant-guest-box-');
  let daemon = await startDaemon(t, { sandbox: box, password: false, extraArgs: ['--restore-rate', '1M'] });
  await daemon.cli(['backup', 'restore', '--repo', repoDir, id, image, '--instant']);
  const written = crypto.randomBytes(7 * MiB + 999);
  const guest = await runGuest({
    workDir: dir,
    socketPath: path.join(box.runDir, 'nbd.sock'),
    exportName: image,
    files: { 'payload.bin': written },
    script: [
      'mount -t ext4 /dev/vda /mnt',
      'sha256sum /mnt/f*.bin',
      'cp /payload.bin /mnt/guest.bin',
      'sync',
      'umount /mnt',
      'echo GUEST-CLEAN',
    ].join('\n'),
  });
  files.set('guest.bin', written);
  const after = (await restores(daemon)).find((x) => x.target === image);
  t.diagnostic(`guest ran ${guest.durationMs} ms; restore then: ${JSON.stringify(after)}`);
  assert.equal(guest.scriptStatus, 0, `the guest's script failed:\n${guest.console}`);
  assert.match(guest.console, /GUEST-CLEAN/);
  assert.equal(after?.state, 'running', 'the copy still ran when the guest had shut down');
  assert.ok(after.doneBytes < after.totalBytes);
  for (const [name, data] of files) {
    if (name === 'guest.bin') continue;
    const sum = crypto.createHash('sha256').update(data).digest('hex');
    assert.match(guest.console, new RegExp(`${sum}\\s+/mnt/${name}`), `the guest read ${name} exactly`);
  }

  // The rest of the copy at full speed: a restart resumes it from its map.
  await daemon.server.stop();
  daemon = await startDaemon(t, { sandbox: box, password: false });
  await waitDone(daemon, image);
  await daemon.server.stop();
  await run('e2fsck', ['-fn', image]);
  await run('mount', ['-o', 'loop,ro', image, mnt]);
  try {
    for (const [name, data] of files) assert.deepEqual(fs.readFileSync(path.join(mnt, name)), data, `${name} after the restore`);
  } finally {
    await run('umount', [mnt]);
  }
});

test('instant restore across SIGKILLs: it resumes, and flushed writes survive', { timeout: 300_000 }, async (t) => {
  if (!needs(t, { root: true })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup, 'bdsnap-instant-kill-');
  const image = path.join(dir, 'disk.img');
  makeImage(image, 192 * MiB, 'random', 11);
  const { repoDir, id } = await backUp(dir, image);
  const expected = fs.readFileSync(image);
  const out = path.join(dir, 'out.img');
  const box = sandbox(t, 'bdsnap-instant-box-');
  const args = { sandbox: box, password: false as const, extraArgs: ['--restore-rate', '12M'] };
  let daemon = await startDaemon(t, args);
  await daemon.cli(['backup', 'restore', '--repo', repoDir, id, image, '--output', out, '--instant']);
  for (let round = 0; round < 3; round++) {
    // A client writes and flushes at a place of its own each round, then the daemon dies.
    const client = await NbdClient.connect({ socketPath: path.join(box.runDir, 'nbd.sock'), exportName: out });
    const at = (round * 37 + 5) * MiB + 4096 * round;
    const data = crypto.randomBytes(64 * 1024 + round * 4096);
    await client.write(data, at);
    await client.flush();
    data.copy(expected, at);
    await new Promise((resolve) => setTimeout(resolve, 200 + round * 300));
    const before = (await restores(daemon)).find((x) => x.target === out);
    assert.equal(before?.state, 'running', `killed while the copy runs (round ${round})`);
    daemon.server.kill('SIGKILL');
    await daemon.server.stop();
    await client.close().catch(() => undefined);
    daemon = await startDaemon(t, args);
    const resumed = (await restores(daemon)).find((x) => x.target === out);
    assert.ok(resumed && resumed.doneBytes >= before!.doneBytes - 32 * MiB, `resumed from its map: ${JSON.stringify(resumed)} after ${JSON.stringify(before)}`);
  }
  await waitDone(daemon, out);
  await daemon.server.stop();
  assert.equal(await sha256File(out), crypto.createHash('sha256').update(expected).digest('hex'), 'the backup plus every flushed write');
});

test('instant restore with the repository gone: EIO for what is not copied, the rest still read, done once it is back', { timeout: 300_000 }, async (t) => {
  if (!needs(t, { root: true })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup, 'bdsnap-instant-gone-');
  const image = path.join(dir, 'disk.img');
  makeImage(image, 64 * MiB, 'random', 5);
  const { repoDir, id } = await backUp(dir, image);
  const expected = fs.readFileSync(image);
  const out = path.join(dir, 'out.img');
  const daemon = await startDaemon(cleanup, { password: false, extraArgs: ['--restore-rate', '2M'] });
  await daemon.cli(['backup', 'restore', '--repo', repoDir, id, image, '--output', out, '--instant']);
  // The restore reads the repository as a backup does: prune would delete the packs under it.
  const prune = await daemon.cli(['backup', 'prune', '--repo', repoDir], undefined, true);
  assert.notEqual(prune.exitCode, 0, `prune while an instant restore reads the repository: ${prune.stdout}`);
  const client = await NbdClient.connect({ socketPath: path.join(daemon.runDir, 'nbd.sock'), exportName: out });
  try {
    const early = Buffer.alloc(MiB);
    await client.read(early, 40 * MiB);
    assert.deepEqual(early, expected.subarray(40 * MiB, 41 * MiB), 'read from the backup before it is copied');
    // Every pack moves out of the repository (its directories stay: the store may hold them open).
    const pieces = path.join(repoDir, 'packs');
    const away = path.join(dir, 'away');
    fs.mkdirSync(away);
    const moved = fs.readdirSync(pieces).flatMap((hh) => fs.readdirSync(path.join(pieces, hh)).map((f) => path.join(hh, f)));
    for (const f of moved) fs.renameSync(path.join(pieces, f), path.join(away, f.replace('/', '-')));
    try {
      await assert.rejects(client.read(Buffer.alloc(MiB), 56 * MiB), /EIO|error/i, 'what the repository cannot give fails the read');
      const again = Buffer.alloc(MiB);
      await client.read(again, 40 * MiB);
      assert.deepEqual(again, early, 'what was copied still reads');
      const r = (await restores(daemon)).find((x) => x.target === out)!;
      assert.equal(r.state, 'running');
      assert.ok(r.error, 'status says why the copy is stuck');
    } finally {
      for (const f of moved) fs.renameSync(path.join(away, f.replace('/', '-')), path.join(pieces, f));
    }
  } finally {
    await client.close();
  }
  await waitDone(daemon, out, 120_000);
  assert.deepEqual(fs.readFileSync(out), expected, 'finished exactly once the repository is back');
});

test('instant restore onto a target another daemon holds: refused, clearly, and nothing touched', { timeout: 120_000 }, async (t) => {
  if (!needs(t, { root: true })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup, 'bdsnap-instant-other-');
  const image = path.join(dir, 'disk.img');
  makeImage(image, 32 * MiB, 'random', 7);
  const { repoDir, id } = await backUp(dir, image);
  zeroFile(image);
  fs.writeFileSync(image, Buffer.alloc(MiB, 0x5a), { flag: 'r+' });
  const before = await sha256File(image);
  // Daemon A holds the image: a snapshot of it.
  const a = await startDaemon(cleanup, {});
  await a.cli(['snapshot', 'create', image]);
  // Daemon B, with run and state directories of its own, is asked to restore onto it.
  const b = await startDaemon(cleanup, { password: false });
  const refused = await b.cli(['backup', 'restore', '--repo', repoDir, id, image, '--instant'], undefined, true);
  t.diagnostic(refused.stderr);
  assert.notEqual(refused.exitCode, 0, `a restore onto a device another daemon holds: ${refused.stdout}`);
  assert.ok(refused.stderr.includes(image), `the message names the target: ${refused.stderr}`);
  assert.match(refused.stderr, /is already open by process \d+, another bdsnap daemon \(run directory [^)]+\), not this one/, refused.stderr);
  assert.ok(refused.stderr.includes(a.runDir), `it names where the device can be freed: ${refused.stderr}`);
  assert.equal(refused.stderr.trim().split('\n').length, 1, `one line: ${refused.stderr}`);
  assert.deepEqual(await restores(b), [], 'B runs no restore');
  const kept = path.join(b.stateDir, 'restores');
  assert.deepEqual(fs.existsSync(kept) ? fs.readdirSync(kept) : [], [], 'B keeps nothing to resume');
  assert.equal(await sha256File(image), before, 'the target is untouched');
  await b.server.stop();
  const again = await startDaemon(cleanup, { sandbox: b.sandbox, password: false });
  assert.deepEqual(await restores(again), [], 'nor does it resume one at its next start');
  assert.equal(await sha256File(image), before, 'the target is untouched after B restarts');
});

test('status during an instant restore shows the target attached and mounted where bdsnap mount has it, and not once unmounted', { timeout: 180_000 }, async (t) => {
  if (!needs(t, { root: true, paths: ['/dev/fuse'], tools: ['nbdfuse', 'losetup', 'fusermount3', 'mkfs.ext4', 'mount', 'umount'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup, 'bdsnap-instant-status-');
  const image = path.join(dir, 'fs.img');
  ext4WithFiles(image, 64 * MiB, new Map([['a.bin', crypto.randomBytes(3 * MiB)]]));
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  // Backed up through the daemon, so the device is registered and status has a row for it.
  const daemon = await startDaemon(cleanup, { password: false, extraArgs: ['--restore-rate', '4M'] });
  const repoDir = path.join(dir, 'repo');
  await daemon.cli(['backup', 'init', '--repo', repoDir]);
  const { id } = JSON.parse((await daemon.cli(['backup', 'create', image, '--repo', repoDir, '--json'])).stdout) as { id: string };
  zeroFile(image);
  await daemon.cli(['backup', 'restore', '--repo', repoDir, id, image, '--instant']);
  await daemon.cli(['mount', image, mnt]);
  interface Row { device: string; attached: boolean; connections: number; mountpoint: string | null; loopDevice: string | null }
  const status = async (): Promise<{ devices: Row[]; restores: Array<RestoreInfo & { mountpoint?: string | null; connections?: number }> }> =>
    JSON.parse((await daemon.cli(['status', '--json'])).stdout) as { devices: Row[]; restores: Array<RestoreInfo & { mountpoint?: string | null; connections?: number }> };
  try {
    const during = await status();
    t.diagnostic(JSON.stringify(during));
    assert.equal(during.restores[0]?.state, 'running', 'the copy still runs');
    const row = during.devices.find((d) => d.device === image);
    assert.ok(row, 'the target has its row');
    assert.equal(row.attached, true, 'the target is attached: bdsnap mount has it');
    assert.equal(row.mountpoint, mnt);
    assert.match(row.loopDevice ?? '', /^\/dev\/loop\d+$/);
    assert.ok(row.connections > 0);
    assert.equal(during.restores[0]?.mountpoint, mnt, 'the restore says where its target is mounted');
    const text = (await daemon.cli(['status'])).stdout;
    assert.match(text, new RegExp(`^${image}\\s+no\\s+mounted\\s+${mnt}\\s`, 'm'), text);
    assert.match(text, new RegExp(`restore of ${image} .*, mounted at ${mnt}`), text);
  } finally {
    await daemon.cli(['umount', mnt]);
  }
  const after = await status();
  const row = after.devices.find((d) => d.device === image);
  assert.equal(row?.attached, false, `unmounted, not attached: ${JSON.stringify(after)}`);
  assert.equal(row?.mountpoint, null);
  await waitDone(daemon, image, 120_000);
});
