/**
 * Replication of a kernel ext4 that stays mounted and busy through the source daemon, to a
 * second daemon: after each sync the standby's image passes `e2fsck -fn` and holds exactly the
 * files finished by the sync's snapshot; once the filesystem is unmounted, one more sync
 * makes the standby equal to the device byte for byte. Needs root, FUSE, loop devices.
 */

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import type { ReplicaInfo } from '../../src/service/control-protocol.js';
import { needs } from '../../testkit/needs.js';
import { ok, sandbox, startDaemon, type Sandbox } from '../../testkit/daemon.js';
import { checkFinishedFiles, highestFile, mkfsExt4, startFileWorkload, unmountAll } from '../helpers/ext4.js';
import { makeImage, sha256File } from '../../testkit/files.js';
import { runSync } from '../../testkit/process.js';
import { nbdUri } from '../../testkit/server.js';

const IMAGE_MIB = 64;
const KERNEL_NEEDS = { root: true, paths: ['/dev/fuse'], tools: ['nbdfuse', 'fusermount3', 'losetup', 'mkfs.ext4', 'e2fsck', 'fsfreeze', 'mount', 'umount'] };

/** Check a copy of the standby's image: clean, and its files those finished by the sync. */
function checkStandby(box: Sandbox, standbyImage: string, doneBefore: number, startedAfter: number, round: number): number {
  const copy = path.join(box.top, `standby-${round}.img`);
  fs.copyFileSync(standbyImage, copy);
  const fsck = spawnSync('e2fsck', ['-fn', copy], { encoding: 'utf8' });
  assert.equal(fsck.status, 0, `round ${round}: e2fsck -fn of the standby:\n${fsck.stdout}${fsck.stderr}`);
  const mnt = path.join(box.top, `standby-mnt-${round}`);
  fs.mkdirSync(mnt);
  runSync('mount', ['-o', 'loop,ro', copy, mnt]);
  try {
    return checkFinishedFiles(path.join(mnt, 'w'), doneBefore, startedAfter, `round ${round}: the standby`);
  } finally {
    runSync('umount', [mnt]);
    fs.rmSync(copy, { force: true });
  }
}

test('a busy ext4 replicated to a second daemon: each sync leaves a clean filesystem with the files finished by it; idle, the standby equals the device', { timeout: 300_000 }, async (t) => {
  if (!needs(t, KERNEL_NEEDS)) return;
  const src = sandbox(t, 'bdsnap-rep-src-');
  const dst = sandbox(t, 'bdsnap-rep-dst-');
  const image = makeImage(path.join(src.top, 'disk.img'), IMAGE_MIB << 20, 'zero');
  mkfsExt4(image);
  const device = fs.realpathSync(image);
  const standbyImage = makeImage(path.join(dst.top, 'disk.img'), IMAGE_MIB << 20, 'random', 3);
  await startDaemon(t, { sandbox: src, password: false });
  await startDaemon(t, { sandbox: dst, activate: [standbyImage] });
  const mnt = path.join(src.top, 'mnt');
  fs.mkdirSync(mnt);
  ok(src, ['mount', device, mnt, '-t', 'ext4']);
  try {
    fs.mkdirSync(path.join(mnt, 'w'));
    const replica = JSON.parse(ok(src, ['replica', 'add', device, '--to', nbdUri(path.join(dst.runDir, 'nbd.sock'), fs.realpathSync(standbyImage)), '--json'])) as ReplicaInfo;
    // The freeze of each sync's snapshot blocks the workload, not this test.
    const workload = startFileWorkload(path.join(mnt, 'w'));
    const tops: number[] = [];
    try {
      for (let round = 0; round < 3; round++) {
        await new Promise((r) => setTimeout(r, 500));
        const doneBefore = highestFile(path.join(mnt, 'w')) - 1;
        const synced = JSON.parse(ok(src, ['replica', 'sync', replica.id, '--json'])) as ReplicaInfo;
        const startedAfter = highestFile(path.join(mnt, 'w'));
        assert.equal(synced.lastSync?.full, round === 0, `round ${round}: ${synced.lastSync?.why}`);
        tops.push(checkStandby(src, standbyImage, doneBefore, startedAfter, round));
      }
    } finally {
      await workload.stop();
    }
    ok(src, ['umount', mnt]);
    ok(src, ['replica', 'sync', replica.id]);
    assert.equal(await sha256File(standbyImage), await sha256File(device), 'idle, the standby equals the device');
    t.diagnostic(`the standby's last file after each busy sync: ${tops.join(' ')}`);
  } finally {
    unmountAll(src, [mnt]);
  }
});
