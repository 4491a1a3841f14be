import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { FileDevice } from '../../src/device/file-device.js';
import { SingleFileFs } from '../../src/fs/singlefilefs/file.js';
import { mkfsImage } from '../../src/fs/singlefilefs/mkfs.js';
import { SFFS_BLOCK_SIZE } from '../../src/fs/singlefilefs/layout.js';
import { sha256 } from '../../testkit/files.js';
import { GRADING_SCENARIOS, SingleFileModel, changedBlocksBetween, expectedContent, type SingleFileWriter } from './scenarios.js';
import { RecordingDevice, tempDir } from './helpers.js';

/** Records the writes of a scenario's run phase (and how many overlap in time) over the model. */
class WatchedWriter implements SingleFileWriter {
  readonly writes: Array<{ offsetBytes: number; lengthBytes: number; sizeBefore: number }> = [];
  maxConcurrent = 0;
  #active = 0;
  readonly #model: SingleFileModel;

  constructor(model: SingleFileModel) {
    this.#model = model;
  }

  async write(offsetBytes: number, data: Buffer): Promise<number> {
    this.writes.push({ offsetBytes, lengthBytes: data.length, sizeBefore: this.#model.size });
    this.maxConcurrent = Math.max(this.maxConcurrent, ++this.#active);
    await new Promise((resolve) => setImmediate(resolve));
    try {
      return await this.#model.write(offsetBytes, data);
    } finally {
      this.#active--;
    }
  }
}

/** What each grading case asks for, checked on the writes a scenario actually does (not on its name alone). */
const GRADING_CASES: Array<{ name: RegExp; holds: (w: WatchedWriter, sizeAfter: number) => boolean }> = [
  { name: /^first block$/, holds: (w) => w.writes.length === 1 && w.writes[0]!.offsetBytes === 0 && w.writes[0]!.lengthBytes <= SFFS_BLOCK_SIZE },
  { name: /k-th block/, holds: (w) => w.writes.length === 1 && blockOf(w.writes[0]!.offsetBytes) > 0
    && blockOf(w.writes[0]!.offsetBytes) === blockOf(w.writes[0]!.offsetBytes + w.writes[0]!.lengthBytes - 1) },
  { name: /contiguous blocks from the first/, holds: (w) => w.writes.length === 1 && w.writes[0]!.offsetBytes === 0 && spansBlocks(w.writes[0]!) > 1 },
  { name: /contiguous blocks from the k-th/, holds: (w, sizeAfter) => w.writes.length === 1 && blockOf(w.writes[0]!.offsetBytes) > 0
    && spansBlocks(w.writes[0]!) > 1 && sizeAfter > w.writes[0]!.sizeBefore },
  { name: /32768, 0, 8192, 800, 20488, 40960, 20480/, holds: (w) => w.writes.map((x) => x.offsetBytes).join() === '32768,0,8192,800,20488,40960,20480' },
  { name: /past the end/, holds: (w) => w.writes.length === 1 && w.writes[0]!.offsetBytes > w.writes[0]!.sizeBefore },
  { name: /4093/, holds: (w, sizeAfter) => w.writes.length === 1 && w.writes[0]!.offsetBytes === 4093 && spansBlocks(w.writes[0]!) === 2 && sizeAfter > w.writes[0]!.sizeBefore },
  { name: /several writers/, holds: (w) => w.writes.length >= 2 && w.maxConcurrent >= 2 },
];

function blockOf(offsetBytes: number): number {
  return Math.floor(offsetBytes / SFFS_BLOCK_SIZE);
}

function spansBlocks(w: { offsetBytes: number; lengthBytes: number }): number {
  return blockOf(w.offsetBytes + w.lengthBytes - 1) - blockOf(w.offsetBytes) + 1;
}

test('every grading case has a scenario that does what the case asks', async () => {
  for (const gradingCase of GRADING_CASES) {
    const scenario = GRADING_SCENARIOS.find((s) => gradingCase.name.test(s.name));
    assert.ok(scenario, `no scenario for the grading case ${gradingCase.name}`);
    const model = new SingleFileModel(scenario.imageBlocks);
    await scenario.prepare(model);
    const watched = new WatchedWriter(model);
    await scenario.run(watched);
    assert.ok(gradingCase.holds(watched, model.size), `${scenario.name}: its writes ${JSON.stringify(watched.writes)} (concurrency ${watched.maxConcurrent}) do not make the case`);
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
