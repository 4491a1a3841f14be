/**
 * A snapshot image mounted with `bdsnap mount` under a real kernel ext4: `status`, `status
 * --json`, `snapshot info` and `snapshot info --json` show the mount; `snapshot destroy` is
 * refused while it is mounted (the mount keeps reading and writing), and so is a second mount
 * of the image; `destroy --force` unmounts cleanly, then destroys. Needs root, FUSE and loop
 * devices.
 */

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { cleanupOf } from '../../testkit/cleanup.js';
import { cli, ok, sandbox, startDaemon, type RunningDaemon, type Sandbox } from '../../testkit/daemon.js';
import { makeImage } from '../../testkit/files.js';
import { isMounted } from '../../testkit/kernel.js';
import { needs } from '../../testkit/needs.js';
import { runSync } from '../../testkit/process.js';

const IMAGE_MIB = 16;
const KERNEL_NEEDS = { root: true, paths: ['/dev/fuse'], tools: ['nbdfuse', 'fusermount3', 'losetup', 'mkfs.ext4', 'mount', 'umount'] };

interface StatusJson {
  devices: Array<{ device: string; imageMounts: Array<{ snapshot: string; exportName: string; mountpoint: string; loopDevice: string | null }> }>;
}

interface InfoJson {
  images: Array<{ exportName: string; mountpoint: string | null; loopDevice: string | null; connections: number }>;
}

/** A daemon, an ext4 image holding `hello`, a snapshot of it mounted through bdsnap. */
async function mountedImage(t: TestContext): Promise<{ box: Sandbox; daemon: RunningDaemon; device: string; id: string; exportName: string; imnt: string; loop: string }> {
  const box = sandbox(t);
  const daemon = await startDaemon(t, { sandbox: box, password: false });
  const seed = path.join(box.top, 'seed');
  fs.mkdirSync(seed);
  fs.writeFileSync(path.join(seed, 'hello'), 'at the take\n');
  const image = path.join(box.top, 'disk.img');
  makeImage(image, IMAGE_MIB << 20, 'zero');
  runSync('mkfs.ext4', ['-q', '-F', '-d', seed, image]);
  const device = fs.realpathSync(image);
  const imnt = path.join(box.top, 'image-mnt');
  fs.mkdirSync(imnt);
  cleanupOf(t).after(() => {
    if (isMounted(imnt)) cli(box, ['umount', imnt]);
    if (isMounted(imnt)) spawnSync('umount', ['-l', imnt]);
  });
  const { id } = JSON.parse(ok(box, ['snapshot', 'create', device, '--json'])) as { id: string };
  const exportName = `${device}@${id}`;
  const { loopDevice } = JSON.parse(ok(box, ['mount', exportName, imnt, '-t', 'ext4', '--json'])) as { loopDevice: string };
  return { box, daemon, device, id, exportName, imnt, loop: loopDevice };
}

test('a mounted snapshot image is shown by status and snapshot info, and destroy is refused while it is mounted', async (t) => {
  if (!needs(t, KERNEL_NEEDS)) return;
  const { box, device, id, exportName, imnt, loop } = await mountedImage(t);

  const status = JSON.parse(ok(box, ['status', '--json'])) as StatusJson;
  assert.deepEqual(status.devices.map((d) => [d.device, d.imageMounts]), [[device, [{ snapshot: id, exportName, mountpoint: imnt, loopDevice: loop }]]]);
  const table = ok(box, ['status']);
  assert.match(table, new RegExp(`^${exportName} +- +mounted +${imnt} `, 'm'), table);
  const info = JSON.parse(ok(box, ['snapshot', 'info', id, '--json'])) as InfoJson;
  assert.equal(info.images[0]?.mountpoint, imnt);
  assert.equal(info.images[0]?.loopDevice, loop);
  assert.ok((info.images[0]?.connections ?? 0) > 0, 'the mount is an NBD client of the image');
  assert.match(ok(box, ['snapshot', 'info', id]), new RegExp(`mounted at ${imnt} \\(${loop}\\)`));

  const refused = cli(box, ['snapshot', 'destroy', id]);
  assert.equal(refused.status, 1);
  assert.equal(refused.stderr.trim().split('\n').length, 1, refused.stderr);
  assert.match(refused.stderr, new RegExp(`snapshot ${id}: ${exportName} is mounted at ${imnt}; unmount it first \\(bdsnap umount ${imnt}\\) or destroy with --force`));
  const other = path.join(box.top, 'other-mnt');
  fs.mkdirSync(other);
  const twice = cli(box, ['mount', exportName, other, '-t', 'ext4']);
  assert.equal(twice.status, 1, 'one image is mounted once');
  assert.match(twice.stderr, new RegExp(`${exportName} is already mounted at ${imnt}`));

  // The mount lives on: it reads, and it writes through to the image without an error.
  assert.equal(fs.readFileSync(path.join(imnt, 'hello'), 'utf8'), 'at the take\n');
  fs.writeFileSync(path.join(imnt, 'after-refusal'), Buffer.alloc(1 << 20, 7));
  assert.equal(spawnSync('sync', ['-f', path.join(imnt, 'after-refusal')]).status, 0);
  assert.deepEqual((JSON.parse(ok(box, ['snapshot', 'list', '--json'])) as { snapshots: Array<{ id: string; state: string }> }).snapshots.map((s) => [s.id, s.state]), [[id, 'ok']]);

  // Unmounted, it goes at once (the mount's connections are let go by the time destroy looks).
  ok(box, ['umount', imnt]);
  const unmounted = JSON.parse(ok(box, ['status', '--json'])) as StatusJson;
  assert.deepEqual(unmounted.devices[0]?.imageMounts, []);
  ok(box, ['snapshot', 'destroy', id]);
});

test('destroy --force unmounts the image cleanly, then destroys the snapshot', async (t) => {
  if (!needs(t, KERNEL_NEEDS)) return;
  const { box, daemon, device, id, imnt } = await mountedImage(t);
  fs.writeFileSync(path.join(imnt, 'written'), Buffer.alloc(2 << 20, 9));
  const deviceBefore = runSync('sha256sum', [device]);

  assert.match(ok(box, ['snapshot', 'destroy', id, '--force']), new RegExp(`destroyed snapshot ${id}`));
  assert.equal(isMounted(imnt), false, 'the image was unmounted');
  assert.deepEqual((JSON.parse(ok(box, ['snapshot', 'list', '--json'])) as { snapshots: unknown[] }).snapshots, []);
  assert.deepEqual((JSON.parse(ok(box, ['status', '--json'])) as StatusJson).devices[0]?.imageMounts, []);
  assert.equal(fs.existsSync(path.join(box.stateDir, 'snapshots', id)), false, 'its storage is gone');
  assert.equal(runSync('sha256sum', [device]), deviceBefore, 'image writes never reached the device');
  const logged = (await daemon.server.stop(), daemon.logLines());
  assert.deepEqual(logged.filter((l) => l.event === 'umount-failed' || l.event === 'snapshot-destroy-forced'), [], 'a clean unmount, no client cut off');
});
