/**
 * The BlockDevice conformance suite (conformance.ts) run against every implementation: the
 * file device (read-write and read-only), the copy-before-write layer, its point-in-time view,
 * the dirty tracker, the change tracker, the snapshot layer and a snapshot's image, and the NBD
 * client talking to a real server over a unix socket.
 */

import fs from 'node:fs';
import path from 'node:path';
import type { TestContext } from 'node:test';
import type { BlockDevice } from '../../src/device/block-device.js';
import { FileDevice } from '../../src/device/file-device.js';
import { NbdClient } from '../../src/nbd/client.js';
import { NbdServer } from '../../src/nbd/server.js';
import { StaticExports } from '../../src/nbd/static-exports.js';
import { DirtyTracker } from '../../src/device/dirty-tracker.js';
import { ChangeMap, CowDevice, DiffStorage, SnapshotLayer, TrackingDevice } from '../../src/snapshot/index.js';
import { CleanupStack } from '../../testkit/cleanup.js';
import { fillRandom, makeTempDir } from '../../testkit/files.js';
import { runBlockDeviceConformance } from './conformance.js';

/**
 * An image file holding `content` in a fresh temp dir and a FileDevice on it. Cleanup runs in
 * reverse order of setup (layers before the device they wrap): register layers on `cleanup`.
 */
async function fileDevice(t: TestContext, content: Buffer, readOnly = false): Promise<{ dir: string; image: string; device: FileDevice; cleanup: CleanupStack }> {
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup, 'bdsnap-conformance-');
  const image = path.join(dir, 'disk.img');
  fs.writeFileSync(image, content);
  const device = await FileDevice.open(image, { readOnly });
  cleanup.after(() => device.close());
  return { dir, image, device, cleanup };
}

async function cowDevice(t: TestContext, content: Buffer): Promise<CowDevice> {
  const { dir, image, device, cleanup } = await fileDevice(t, content);
  const cow = CowDevice.create(device, { devicePath: image, snapshotRoot: path.join(dir, 'snapshots') });
  cleanup.after(() => cow.close());
  return cow;
}

runBlockDeviceConformance('FileDevice', async (t, content) => (await fileDevice(t, content)).device);

runBlockDeviceConformance('FileDevice, read-only', async (t, content) => (await fileDevice(t, content, true)).device, { readOnly: true });

runBlockDeviceConformance('CowDevice over FileDevice', cowDevice);

runBlockDeviceConformance('point-in-time view of a CowDevice', async (t, content) => {
  const cow = await cowDevice(t, content);
  // Change the live device everywhere first: the view must still show `content`.
  const noise = Buffer.alloc(content.length);
  fillRandom(noise, 99);
  await cow.write(noise, 0);
  return cow.view();
}, { readOnly: true, ownedBy: 'its session: the session\'s close ends it' });

runBlockDeviceConformance('DirtyTracker over FileDevice', async (t, content): Promise<BlockDevice> => {
  const { device } = await fileDevice(t, content);
  return new DirtyTracker(device, async () => undefined);
}, { ownedBy: 'the daemon\'s attachment of the device' });

runBlockDeviceConformance('NbdClient to an NbdServer over a unix socket', async (t, content) => {
  const { dir, image, device, cleanup } = await fileDevice(t, content);
  const server = new NbdServer({ exports: new StaticExports([{ name: image, device, description: 'conformance' }]) });
  const socketPath = path.join(dir, 'nbd.sock');
  await server.listenUnix(socketPath);
  cleanup.after(() => server.close());
  const client = await NbdClient.connect({ socketPath, exportName: image });
  cleanup.after(() => client.close());
  return client;
});


runBlockDeviceConformance('TrackingDevice over FileDevice', async (t, content): Promise<BlockDevice> => {
  const { dir, device, cleanup } = await fileDevice(t, content);
  const { map } = await ChangeMap.open({ file: path.join(dir, 'cbt.map'), deviceSizeBytes: device.size, durability: 'process', bootId: 'conformance' });
  cleanup.after(() => map.close(null));
  return new TrackingDevice(device, map);
});

/** A SnapshotLayer over the file with one point taken at `content`, and that point's image. */
async function snapshotLayer(t: TestContext, content: Buffer): Promise<{ layer: SnapshotLayer; image: BlockDevice }> {
  const { dir, device, cleanup } = await fileDevice(t, content);
  const storageDir = path.join(dir, 'storage');
  fs.mkdirSync(storageDir, { mode: 0o700 });
  const storage = await DiffStorage.create({ id: 'conformance', dirs: [storageDir], chunkSize: 16 * 1024 });
  cleanup.after(() => storage.close());
  const layer = new SnapshotLayer(device, { chunkSize: 16 * 1024 });
  await layer.hold();
  const image = layer.addPoint(storage, 0);
  layer.release();
  cleanup.after(() => layer.removePoint(image));
  return { layer, image };
}

runBlockDeviceConformance('SnapshotLayer over FileDevice, with a snapshot held', async (t, content) => (await snapshotLayer(t, content)).layer,
  { ownedBy: 'the daemon\'s attachment of the device' });

runBlockDeviceConformance('a snapshot\'s image (writable) while the device moves on', async (t, content) => {
  const { layer, image } = await snapshotLayer(t, content);
  // Change the live device everywhere first: the image must still show `content`.
  const noise = Buffer.alloc(content.length);
  fillRandom(noise, 98);
  await layer.write(noise, 0);
  return image;
}, { ownedBy: 'its snapshot: destroy ends it' });
