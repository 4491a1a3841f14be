import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { FileDevice } from '../../src/device/file-device.js';
import { SingleFileFs } from '../../src/fs/singlefilefs/file.js';
import { mkfsImage } from '../../src/fs/singlefilefs/mkfs.js';
import { GRADING_SCENARIOS, SingleFileModel, changedBlocksBetween, expectedContent } from './scenarios.js';
import { RecordingDevice, tempDir } from './helpers.js';

const sha256 = (bytes: Buffer): string => createHash('sha256').update(bytes).digest('hex');

test('the scenario table covers every grading case', () => {
  const names = GRADING_SCENARIOS.map((s) => s.name).join('\n');
  for (const pattern of [/first block/, /k-th block/, /contiguous blocks from the first/, /contiguous blocks from the k-th/,
    /32768, 0, 8192, 800, 20488, 40960, 20480/, /4093/, /several writers/]) {
    assert.match(names, pattern);
  }
});

for (const scenario of GRADING_SCENARIOS) {
  test(`grading scenario over a FileDevice: ${scenario.name}`, async (t) => {
    const dir = tempDir(t);
    const image = path.join(dir, 'image');
    await mkfsImage(image, scenario.imageBlocks);

    const prepDevice = await FileDevice.open(image);
    const prepFs = await SingleFileFs.open(prepDevice);
    await scenario.prepare(prepFs);
    await prepFs.flush();
    await prepDevice.close();
    const before = fs.readFileSync(image);
    const checksumBefore = sha256(before);

    // One mount: open, write, flush, close.
    const device = new RecordingDevice(await FileDevice.open(image));
    const mounted = await SingleFileFs.open(device);
    await scenario.run(mounted);
    await mounted.flush();
    await device.close();
    const after = fs.readFileSync(image);

    assert.deepEqual(changedBlocksBetween(before, after), scenario.changedBlocks);
    assert.equal(checksumBefore === sha256(after), scenario.changedBlocks.length === 0);
    assert.ok(device.writes.every((w) => w.offsetBytes >= 4096 && w.lengthBytes > 0
      && Math.floor(w.offsetBytes / 4096) === Math.floor((w.offsetBytes + w.lengthBytes - 1) / 4096)),
    'every write stays inside one block, never block 0');
    assert.equal(Number(after.readBigUInt64LE(4096 + 24)), scenario.sizeAfterBytes);

    const expected = await expectedContent(scenario);
    const reopenedDevice = await FileDevice.open(image, { readOnly: true });
    t.after(() => reopenedDevice.close());
    const reopened = await SingleFileFs.open(reopenedDevice);
    assert.equal(reopened.size, scenario.sizeAfterBytes);
    assert.deepEqual(await reopened.readAll(), expected.after);
    assert.deepEqual(before.subarray(8192, 8192 + expected.before.length), expected.before);
  });
}

test('the reference model agrees with the hand-written sizes', async () => {
  for (const scenario of GRADING_SCENARIOS) {
    const model = new SingleFileModel(scenario.imageBlocks);
    await scenario.prepare(model);
    await scenario.run(model);
    assert.equal(model.size, scenario.sizeAfterBytes, scenario.name);
  }
});
