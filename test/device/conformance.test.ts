/**
 * The BlockDevice conformance suite (conformance.ts) run against every implementation: the
 * file device (read-write and read-only), the copy-before-write layer, its point-in-time view,
 * the dirty tracker and the NBD client talking to a real server over a unix socket.
 */

import fs from 'node:fs';
import path from 'node:path';
import type { TestContext } from 'node:test';
import type { BlockDevice } from '../../src/device/block-device.js';
import { FileDevice } from '../../src/device/file-device.js';
import { NbdClient } from '../../src/nbd/client.js';
import { NbdServer } from '../../src/nbd/server.js';
import { StaticExports } from '../../src/nbd/static-exports.js';
import { DirtyTracker } from '../../src/service/dirty-tracker.js';
import { CowDevice } from '../../src/snapshot/index.js';
import { CleanupStack } from '../helpers/cleanup.js';
import { fillRandom, makeTempDir } from '../helpers/files.js';
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

runBlockDeviceConformance('CowDevice over FileDevice', cowDevice, {
  knownGaps: { 'requests after close are refused': 'CowDevice refuses writes after close() but passes reads on to the base it does not own' },
});

runBlockDeviceConformance('point-in-time view of a CowDevice', async (t, content) => {
  const cow = await cowDevice(t, content);
  // Change the live device everywhere first: the view must still show `content`.
  const noise = Buffer.alloc(content.length);
  fillRandom(noise, 99);
  await cow.write(noise, 0);
  return cow.view();
}, {
  readOnly: true,
  knownGaps: {
    'close waits for requests in flight': 'the view\'s close() is a no-op that does not wait for its reads',
    'requests after close are refused': 'the view\'s close() is a no-op: it keeps reading while its session lives',
  },
});

runBlockDeviceConformance('DirtyTracker over FileDevice', async (t, content): Promise<BlockDevice> => {
  const { device } = await fileDevice(t, content);
  return new DirtyTracker(device, async () => undefined);
}, {
  knownGaps: {
    'close waits for requests in flight': 'DirtyTracker.close() is a no-op that does not wait for requests in flight',
    'requests after close are refused': 'DirtyTracker.close() leaves its base open (the attachment owns it) and passes later requests on',
  },
});

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
