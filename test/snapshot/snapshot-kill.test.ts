/**
 * A real process killed with SIGKILL while writing through a SnapshotLayer with a point held:
 * the storage reopened by another process gives back the image exactly (the device at the
 * point, plus the image write acknowledged before the kill).
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { FileDevice } from '../../src/device/file-device.js';
import { DiffStorage, SnapshotLayer } from '../../src/snapshot/index.js';
import { makeImage } from '../../testkit/files.js';
import { IMAGE_WRITE } from './fixtures/snapshot-kill-writer.js';
import { killWhileWriting, tempDir } from './helpers.js';

const WRITER = fileURLToPath(new URL('./fixtures/snapshot-kill-writer.js', import.meta.url));

for (const [durability, chunkSize, runMs] of [['process', 65536, 400], ['process', 4096, 150], ['strict', 16384, 300]] as const) {
  test(`SIGKILL with a snapshot held (${durability}, ${chunkSize / 1024} KiB chunks): the reopened image is exact`, { timeout: 60_000 }, async (t) => {
    const dir = tempDir(t, 'bdsnap-snapkill-');
    const image = makeImage(path.join(dir, 'disk.img'), 16 << 20, 'random', 1);
    const storeDir = path.join(dir, 'store');
    fs.mkdirSync(storeDir, { mode: 0o700 });
    const expected = fs.readFileSync(image);
    expected.fill(IMAGE_WRITE.fill, IMAGE_WRITE.offsetBytes, IMAGE_WRITE.offsetBytes + IMAGE_WRITE.lengthBytes);
    await killWhileWriting(WRITER, [image, storeDir, String(chunkSize), durability], runMs);

    const dev = await FileDevice.open(image);
    t.after(() => dev.close());
    const onDevice = Buffer.alloc(dev.size);
    await dev.read(onDevice, 0);
    assert.ok(!onDevice.equals(expected), 'the writer changed the device');
    const storage = await DiffStorage.open({ id: 'kill', dirs: [storeDir], chunkSize, durability });
    t.after(() => storage.close());
    assert.equal(storage.state, 'ok');
    const layer = new SnapshotLayer(dev, { chunkSize });
    const point = layer.addPoint(storage, 0);
    const got = Buffer.alloc(dev.size);
    await point.read(got, 0);
    assert.ok(got.equals(expected), 'the image is the device at the point, plus its acknowledged write');
  });
}
