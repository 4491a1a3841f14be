/**
 * An incremental copy with standard tools only, at library level: a device served through a
 * TrackingDevice is written by libnbd; at each "snapshot" the change map advances and a copy
 * of the image file stands in for the snapshot image, served with the frozen map's
 * qemu:dirty-bitmap contexts. Image 1 is copied whole with nbdcopy; of image 2 only the
 * extents that nbdinfo --map=qemu:dirty-bitmap:<generation>:1 reports as changed are copied
 * (by libnbd in Python) onto that copy, which must then equal image 2 byte for byte. Between
 * the two snapshots the change map is dropped without close and reopened, as after a kill.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { FileDevice } from '../../src/device/file-device.js';
import { NbdServer } from '../../src/nbd/server.js';
import { StaticExports, type StaticExport } from '../../src/nbd/static-exports.js';
import { ChangeMap, TrackingDevice, dirtyBitmapContextName } from '../../src/snapshot/change-map/index.js';
import { makeImage, sha256File } from '../../testkit/files.js';
import { nbdshEnv, requireTool, run } from '../../testkit/process.js';
import { nbdUri } from '../../testkit/server.js';
import { tempDir } from './helpers.js';

const SIZE = 32 << 20;

async function serve(dir: string, name: string, exports: StaticExport[]): Promise<{ socketPath: string; close: () => Promise<void> }> {
  const server = new NbdServer({ exports: new StaticExports(exports) });
  const socketPath = path.join(dir, `${name}.sock`);
  await server.listenUnix(socketPath);
  return { socketPath, close: () => server.close() };
}

/** libnbd writes: scattered 4 KiB writes, a few big ones, a zero and a trim, placed by `seed`. */
async function writeWorkload(uri: string, seed: number): Promise<void> {
  const script = `
import nbd, random
random.seed(${seed})
h = nbd.NBD()
h.connect_uri(${JSON.stringify(uri)})
size = h.get_size()
for i in range(150):
    off = random.randrange(0, size // 4096) * 4096
    h.pwrite(random.randbytes(4096), off)
for i in range(3):
    off = random.randrange(0, size // 65536 - 16) * 65536 + 512
    h.pwrite(random.randbytes(1 << 20), off)
# libnbd takes (count, offset)
h.zero((1 << 20) + random.randrange(1, 64) * 4096, ${seed} * (5 << 20) + 4096)
h.trim(8192, ${seed} * (5 << 20) + (3 << 20))
h.flush()
h.shutdown()
`;
  await run('/usr/bin/python3', ['-c', script], { env: nbdshEnv() });
}

test('incremental copy with nbdcopy, nbdinfo --map=qemu:dirty-bitmap and libnbd equals the image, across a kill', async (t) => {
  requireTool('nbdcopy');
  requireTool('nbdinfo');
  const dir = tempDir(t);
  const devicePath = path.join(dir, 'device.img');
  const mapFile = path.join(dir, 'device.cbt');
  makeImage(devicePath, SIZE, 0x5a);
  const mapOptions = { file: mapFile, deviceSizeBytes: SIZE, durability: 'process' as const, bootId: 'test-boot' };

  // Period 1: writes through the tracked device, then snapshot 1.
  let { map } = await ChangeMap.open(mapOptions);
  const generation = map.generation;
  let device = await FileDevice.open(devicePath);
  let live = await serve(dir, 'live1', [{ name: 'live', device: new TrackingDevice(device, map) }]);
  await writeWorkload(nbdUri(live.socketPath, 'live'), 1);
  await live.close();
  await device.close();
  const frozen1 = map.advance();
  const image1 = path.join(dir, 'image1.img');
  fs.copyFileSync(devicePath, image1);

  // Period 2: more writes; the map is dropped without close halfway (a kill) and reopened.
  device = await FileDevice.open(devicePath);
  live = await serve(dir, 'live2', [{ name: 'live', device: new TrackingDevice(device, map) }]);
  await writeWorkload(nbdUri(live.socketPath, 'live'), 2);
  await live.close();
  const reopened = await ChangeMap.open(mapOptions);
  assert.equal(reopened.reset, null, 'kept after a kill on the same boot');
  map = reopened.map;
  assert.equal(map.generation, generation);
  assert.equal(map.number, 2);
  live = await serve(dir, 'live3', [{ name: 'live', device: new TrackingDevice(device, map) }]);
  await writeWorkload(nbdUri(live.socketPath, 'live'), 3);
  await live.close();
  await device.close();
  const frozen2 = map.advance();
  const image2 = path.join(dir, 'image2.img');
  fs.copyFileSync(devicePath, image2);
  await map.close(null);

  // The images, served with their frozen maps.
  const images = await serve(dir, 'images', [
    { name: 'image1', device: await FileDevice.open(image1, { readOnly: true }), metaContexts: frozen1.contextSources() },
    { name: 'image2', device: await FileDevice.open(image2, { readOnly: true }), metaContexts: frozen2.contextSources() },
  ]);
  t.after(() => images.close());
  const context = dirtyBitmapContextName(generation, 1);
  assert.deepEqual(frozen2.contextNames(), [context]);

  // Full copy of image 1.
  const backup = path.join(dir, 'backup.img');
  fs.writeFileSync(backup, '');
  await run('nbdcopy', [nbdUri(images.socketPath, 'image1'), backup]);
  assert.equal(await sha256File(backup), await sha256File(image1));

  // The changed extents of image 2 since snapshot 1, read with nbdinfo.
  const out = await run('nbdinfo', [`--map=${context}`, '--json', nbdUri(images.socketPath, 'image2')]);
  const extents = JSON.parse(out.stdout) as Array<{ offset: number; length: number; type: number }>;
  const changed = extents.filter((e) => (e.type & 1) !== 0);
  const changedBytes = changed.reduce((n, e) => n + e.length, 0);
  assert.ok(changedBytes > 0 && changedBytes < SIZE, `some but not all of the device changed (${changedBytes} bytes)`);
  assert.deepEqual(changed.map((e) => ({ offsetBytes: e.offset, lengthBytes: e.length })), frozen2.changedSince(1));

  // Copy only those ranges, with libnbd, onto the copy of image 1.
  const script = `
import json, nbd, sys
ranges = json.loads(sys.stdin.read())
h = nbd.NBD()
h.connect_uri(${JSON.stringify(nbdUri(images.socketPath, 'image2'))})
with open(${JSON.stringify(backup)}, "r+b") as f:
    for off, length in ranges:
        done = 0
        while done < length:
            n = min(length - done, 1 << 20)
            f.seek(off + done)
            f.write(h.pread(n, off + done))
            done += n
h.shutdown()
`;
  await run('/usr/bin/python3', ['-c', script], { env: nbdshEnv(), input: JSON.stringify(changed.map((e) => [e.offset, e.length])) });
  assert.equal(await sha256File(backup), await sha256File(image2), 'image 1 plus the changed extents of image 2 is image 2');
  // And the map did its job: the copy of image 1 alone is not image 2.
  assert.notEqual(await sha256File(image1), await sha256File(image2));
});
