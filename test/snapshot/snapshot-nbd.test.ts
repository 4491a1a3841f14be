/**
 * Real clients: a SnapshotImage served by the project's NBD server and read with nbdcopy while
 * nbdcopy writes new data to the device through the same server; the copy of the image equals
 * the device content recorded at the point, byte for byte, and the device what was written.
 * nbdinfo --map shows the image's base:allocation.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { FileDevice } from '../../src/device/file-device.js';
import { NbdServer } from '../../src/nbd/server.js';
import { StaticExports } from '../../src/nbd/static-exports.js';
import { DiffStorage, SnapshotLayer } from '../../src/snapshot/index.js';
import { fillRandom, makeImage, makeTempDir, sha256File } from '../../testkit/files.js';
import { requireTool, run } from '../../testkit/process.js';
import { nbdUri } from '../../testkit/server.js';

const IMAGE_BYTES = 16 << 20;

test('nbdcopy reads a snapshot image exactly while nbdcopy rewrites the device', { timeout: 120_000 }, async (t) => {
  requireTool('nbdcopy');
  requireTool('nbdinfo');
  const dir = makeTempDir(t);
  const image = path.join(dir, 'disk.img');
  makeImage(image, IMAGE_BYTES, 'random', 7);
  const source = path.join(dir, 'new.img');
  makeImage(source, IMAGE_BYTES, 'random', 8);
  const dev = await FileDevice.open(image);
  const layer = new SnapshotLayer(dev, { chunkSize: 65536 });
  const storeDir = path.join(dir, 'store');
  fs.mkdirSync(storeDir, { mode: 0o700 });
  const storage = await DiffStorage.create({ id: 'nbd', dirs: [storeDir], chunkSize: 65536 });
  await layer.hold();
  const snap = layer.addPoint(storage, 0);
  layer.release();
  const recorded = await sha256File(image);

  // Some first writes before the copy starts, so that the image reads from both places.
  const early = Buffer.alloc(3 << 20);
  fillRandom(early, 9);
  await layer.write(early, 5 << 20);
  await layer.write(Buffer.alloc(1000, 1), 100);

  const snapName = `${image}@nbd`;
  const server = new NbdServer({ exports: new StaticExports([{ name: image, device: layer }, { name: snapName, device: snap }]) });
  const socketPath = path.join(dir, 'nbd.sock');
  await server.listenUnix(socketPath);
  t.after(async () => {
    await server.close();
    await layer.close();
    await storage.close();
    await dev.close();
  });

  const copy = path.join(dir, 'copy.img');
  await Promise.all([
    run('nbdcopy', ['--connections', '2', nbdUri(socketPath, snapName), copy]),
    run('nbdcopy', ['--flush', source, nbdUri(socketPath, image)]),
  ]);
  assert.equal(await sha256File(copy), recorded, 'the image read through NBD is the device at the point');
  assert.equal(await sha256File(image), await sha256File(source), 'the device holds what was written');

  // Every chunk has changed now: the image is all data from the storage, and still exact.
  const again = path.join(dir, 'again.img');
  await run('nbdcopy', [nbdUri(socketPath, snapName), again]);
  assert.equal(await sha256File(again), recorded);
  const map = await run('nbdinfo', ['--map', nbdUri(socketPath, snapName)]);
  assert.match(map.stdout, /data/);
});
