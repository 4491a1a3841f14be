/**
 * Snapshots of a kernel ext4 that stays mounted and busy: the image taken with the freeze
 * passes `e2fsck -n` and holds exactly the files finished by the take; one taken with
 * --no-freeze mounts (its journal replays into the image, never into the device); and the
 * difference storage may not live on the device it protects. Needs root, FUSE, loop devices.
 */

import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { needs } from '../helpers/needs.js';
import { cli, daemonUri, ok, sandbox, startDaemon, type Sandbox } from '../helpers/daemon.js';
import { makeImage } from '../helpers/files.js';
import { isMounted } from '../helpers/kernel.js';
import { runSync } from '../helpers/process.js';

const IMAGE_MIB = 64;
/** The workload's files: `f<n>` holds the line "file <n>" repeated to this size. */
const FILE_BYTES = 24 * 1024;



function expectedFile(n: number): Buffer {
  const line = `file ${n}\n`;
  return Buffer.from(line.repeat(Math.ceil(FILE_BYTES / line.length))).subarray(0, FILE_BYTES);
}

function highestFile(dir: string): number {
  let top = 0;
  for (const name of fs.readdirSync(dir)) {
    const m = /^f(\d+)$/.exec(name);
    if (m) top = Math.max(top, Number(m[1]));
  }
  return top;
}

/** Take down what the body mounted, while the daemon still runs. */
function unmountAll(box: Sandbox, mountpoints: string[]): void {
  for (const mnt of mountpoints) {
    if (isMounted(mnt)) cli(box, ['umount', mnt]);
    if (isMounted(mnt)) spawnSync('umount', ['-l', mnt]);
  }
}

const KERNEL_NEEDS = { root: true, paths: ['/dev/fuse'], tools: ['nbdfuse', 'fusermount3', 'losetup', 'mkfs.ext4', 'e2fsck', 'fsfreeze', 'nbdcopy', 'mount', 'umount'] };

test('a busy ext4: the frozen image is clean and holds the files finished by the take; --no-freeze images replay their journal', { timeout: 300_000 }, async (t) => {
  if (!needs(t, KERNEL_NEEDS)) return;
  const box = sandbox(t);
  await startDaemon(t, { sandbox: box, password: false });
  const image = path.join(box.top, 'disk.img');
  makeImage(image, IMAGE_MIB << 20, 'zero');
  runSync('mkfs.ext4', ['-q', '-F', '-E', 'lazy_itable_init=0,lazy_journal_init=0', image]);
  const device = fs.realpathSync(image);
  const mnt = path.join(box.top, 'mnt');
  const imnt = path.join(box.top, 'image-mnt');
  fs.mkdirSync(mnt);
  fs.mkdirSync(imnt);
  try {
    await busyFilesystem(box, device, mnt, imnt);
  } finally {
    unmountAll(box, [imnt, mnt]);
  }
});

async function busyFilesystem(box: Sandbox, device: string, mnt: string, imnt: string): Promise<void> {
  ok(box, ['mount', device, mnt, '-t', 'ext4']);
  fs.mkdirSync(path.join(mnt, 'w'));

  // The workload runs in its own process: a freeze blocks its writes, not this test.
  const workload = spawn('bash', ['-c', `i=0; while :; do i=$((i+1)); yes "file $i" | head -c ${FILE_BYTES} > "$1/f$i"; done`, 'workload', path.join(mnt, 'w')], { stdio: 'ignore' });
  const stopped = new Promise((resolve) => workload.once('exit', resolve));
  try {
    await new Promise((r) => setTimeout(r, 700));
    await takeAndCheck(box, device, mnt, imnt, workload, stopped);
  } finally {
    workload.kill('SIGKILL');
    await stopped;
  }
}

async function takeAndCheck(box: Sandbox, device: string, mnt: string, imnt: string, workload: ChildProcess, stopped: Promise<unknown>): Promise<void> {

  // Storage on the very device being snapshotted is refused.
  const onDevice = cli(box, ['snapshot', 'create', device, '--storage', path.join(mnt, 'w')]);
  assert.notEqual(onDevice.status, 0);
  assert.match(onDevice.stderr, /is on .* itself/);

  const doneBefore = highestFile(path.join(mnt, 'w')) - 1;
  const snap = JSON.parse(ok(box, ['snapshot', 'create', device, '--json'])) as { id: string; frozen: string[]; stallMs: number };
  const startedAfter = highestFile(path.join(mnt, 'w'));
  assert.deepEqual(snap.frozen, [mnt], 'the filesystem was frozen around the take');
  const loose = JSON.parse(ok(box, ['snapshot', 'create', device, '--no-freeze', '--json'])) as { id: string; frozen: string[] };
  assert.deepEqual(loose.frozen, []);
  await new Promise((r) => setTimeout(r, 300));
  workload.kill('SIGKILL');
  await stopped;

  // The frozen image, copied out by a standard tool, is a clean filesystem.
  const copy = path.join(box.top, 'frozen.img');
  runSync('nbdcopy', [daemonUri(box, `${device}@${snap.id}`), copy]);
  const fsck = spawnSync('e2fsck', ['-fn', copy], { encoding: 'utf8' });
  assert.equal(fsck.status, 0, `e2fsck -fn of the frozen image:\n${fsck.stdout}${fsck.stderr}`);

  // Mounted through bdsnap, it holds every file finished before the take, complete, and none started after.
  ok(box, ['mount', `${device}@${snap.id}`, imnt, '-t', 'ext4']);
  const top = highestFile(path.join(imnt, 'w'));
  assert.ok(top >= doneBefore && top <= startedAfter, `the image's last file f${top} is outside [f${doneBefore}, f${startedAfter}]`);
  for (let n = 1; n <= top; n++) {
    const file = path.join(imnt, 'w', `f${n}`);
    const data = fs.readFileSync(file);
    // The last file may have been cut by the take; every earlier one is whole.
    if (n < top) assert.deepEqual(data, expectedFile(n), `f${n} in the image`);
    else assert.ok(expectedFile(n).subarray(0, data.length).equals(data), `f${n} is a prefix of its content`);
  }
  ok(box, ['umount', imnt]);

  // The --no-freeze image is writable: mounting it replays its journal into the image only.
  const deviceBefore = runSync('sha256sum', [device]);
  ok(box, ['umount', mnt]);
  const deviceIdle = runSync('sha256sum', [device]);
  ok(box, ['mount', `${device}@${loose.id}`, imnt, '-t', 'ext4']);
  assert.ok(fs.existsSync(path.join(imnt, 'w', 'f1')));
  ok(box, ['umount', imnt]);
  assert.equal(runSync('sha256sum', [device]), deviceIdle, 'mounting the image did not touch the device');
  assert.notEqual(deviceBefore, '', 'sha256sum ran');
  const looseCopy = path.join(box.top, 'loose.img');
  runSync('nbdcopy', [daemonUri(box, `${device}@${loose.id}`), looseCopy]);
  const fsck2 = spawnSync('e2fsck', ['-fn', looseCopy], { encoding: 'utf8' });
  assert.equal(fsck2.status, 0, `e2fsck -fn of the replayed image:\n${fsck2.stdout}${fsck2.stderr}`);
  ok(box, ['snapshot', 'destroy', snap.id]);
  ok(box, ['snapshot', 'destroy', loose.id]);
}
