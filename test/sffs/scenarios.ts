/**
 * The course's grading scenarios for singlefilefs, as data other suites can replay through
 * any path to the device (a FileDevice, the NBD server with a snapshot session open, the
 * daemon, the CLI).
 *
 * Each scenario has a `prepare` phase (the content written before the checksum is taken and
 * the device is activated) and a `run` phase (the writes done while mounted). Both go
 * through a `SingleFileWriter`, so the same scenario can drive SingleFileFs, the reference
 * model below, or a CLI process per write. Expected outcomes are written out by hand:
 * `changedBlocks` (device blocks whose bytes differ after `run`) and `sizeAfterBytes`.
 *
 * Prepared content is lowercase letters and written content is uppercase letters, so every
 * written byte differs from the byte it replaces and a touched block always changes.
 */

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import { FileDevice } from '../../src/device/file-device.js';
import { BdsnapError } from '../../src/errors.js';
import { SingleFileFs } from '../../src/fs/singlefilefs/file.js';
import { INITIAL_CONTENT, SFFS_BLOCK_SIZE, maxFileSizeFor } from '../../src/fs/singlefilefs/layout.js';
import { mkfsImage } from '../../src/fs/singlefilefs/mkfs.js';
import { BDSNAP_MAIN as MAIN } from '../../testkit/bdsnap-cli.js';

/** What a scenario needs from the filesystem: the user-space write loop. */
export interface SingleFileWriter {
  /** Returns the bytes written (0 at an offset past the end of the file). */
  write(offsetBytes: number, data: Buffer): Promise<number>;
}

export interface GradingScenario {
  name: string;
  /** Image size the scenario is written for. */
  imageBlocks: number;
  /** Content written before the checksum (offline, before activation). */
  prepare(fs: SingleFileWriter): Promise<void>;
  /** The writes of one mount. */
  run(fs: SingleFileWriter): Promise<void>;
  /** Device block numbers (4096 bytes each) whose content `run` changes, ascending. */
  changedBlocks: number[];
  /** File size after `run`. */
  sizeAfterBytes: number;
}

export const IMAGE_BLOCKS = 100;
const BLOCK = SFFS_BLOCK_SIZE;
const INITIAL_BYTES = INITIAL_CONTENT.length;

/** `lengthBytes` lowercase letters starting at letter `seed`. */
export function prepared(lengthBytes: number, seed = 0): Buffer {
  const out = Buffer.alloc(lengthBytes);
  for (let i = 0; i < lengthBytes; i++) out[i] = 0x61 + ((seed + i) % 26);
  return out;
}

/** `lengthBytes` uppercase letters starting at letter `seed`. */
export function written(lengthBytes: number, seed = 0): Buffer {
  const out = Buffer.alloc(lengthBytes);
  for (let i = 0; i < lengthBytes; i++) out[i] = 0x41 + ((seed + i) % 26);
  return out;
}

/** Grow the freshly formatted file to exactly `sizeBytes` with prepared content. */
async function growTo(fs: SingleFileWriter, sizeBytes: number, seed: number): Promise<void> {
  await writeAll(fs, INITIAL_BYTES, prepared(sizeBytes - INITIAL_BYTES, seed));
}

/** Write and insist that everything went, so a scenario cannot silently do less. */
export async function writeAll(fs: SingleFileWriter, offsetBytes: number, data: Buffer): Promise<void> {
  const n = await fs.write(offsetBytes, data);
  if (n !== data.length) {
    throw new BdsnapError('EIO', `scenario write at ${offsetBytes} wrote ${n} of ${data.length} bytes`);
  }
}

export const GRADING_SCENARIOS: GradingScenario[] = [
  {
    name: 'first block',
    imageBlocks: IMAGE_BLOCKS,
    prepare: (fs) => growTo(fs, 200, 1),
    run: (fs) => writeAll(fs, 0, written(20, 1)),
    changedBlocks: [2],
    sizeAfterBytes: 200,
  },
  {
    name: 'k-th block (k = 5)',
    imageBlocks: IMAGE_BLOCKS,
    prepare: (fs) => growTo(fs, 10 * BLOCK, 2),
    run: (fs) => writeAll(fs, 5 * BLOCK + 100, written(100, 2)),
    changedBlocks: [7],
    sizeAfterBytes: 10 * BLOCK,
  },
  {
    name: 'contiguous blocks from the first',
    imageBlocks: IMAGE_BLOCKS,
    prepare: (fs) => growTo(fs, 5 * BLOCK, 3),
    run: (fs) => writeAll(fs, 0, written(3 * BLOCK + 10, 3)),
    changedBlocks: [2, 3, 4, 5],
    sizeAfterBytes: 5 * BLOCK,
  },
  {
    name: 'contiguous blocks from the k-th, growing the file',
    imageBlocks: IMAGE_BLOCKS,
    prepare: (fs) => growTo(fs, 6 * BLOCK, 4),
    run: (fs) => writeAll(fs, 4 * BLOCK, written(4 * BLOCK, 4)),
    changedBlocks: [1, 6, 7, 8, 9],
    sizeAfterBytes: 8 * BLOCK,
  },
  {
    name: 'non-adjacent offsets 32768, 0, 8192, 800, 20488, 40960, 20480',
    imageBlocks: IMAGE_BLOCKS,
    // The file reaches 40960 first, so no write lands past its end; the one at 40960 appends.
    prepare: (fs) => growTo(fs, 10 * BLOCK, 5),
    run: async (fs) => {
      for (const offsetBytes of [32768, 0, 8192, 800, 20488, 40960, 20480]) {
        await writeAll(fs, offsetBytes, written(16, offsetBytes));
      }
    },
    changedBlocks: [1, 2, 4, 7, 10, 12],
    sizeAfterBytes: 40960 + 16,
  },
  {
    name: 'write past the end of the file writes nothing',
    imageBlocks: IMAGE_BLOCKS,
    prepare: (fs) => growTo(fs, 2 * BLOCK, 6),
    run: async (fs) => {
      const n = await fs.write(32768, written(16, 6));
      if (n !== 0) throw new BdsnapError('EIO', `a write past the end of the file wrote ${n} bytes`);
    },
    changedBlocks: [],
    sizeAfterBytes: 2 * BLOCK,
  },
  {
    name: 'write at 4093 crossing into the next block and growing the file',
    imageBlocks: IMAGE_BLOCKS,
    prepare: (fs) => growTo(fs, BLOCK, 7),
    run: (fs) => writeAll(fs, 4093, written(10, 7)),
    changedBlocks: [1, 2, 3],
    sizeAfterBytes: 4093 + 10,
  },
  {
    name: 'several writers at once',
    imageBlocks: IMAGE_BLOCKS,
    prepare: (fs) => growTo(fs, 8 * BLOCK, 8),
    // Disjoint ranges, and only one writer grows the file, so the outcome is the same in
    // any interleaving.
    run: async (fs) => {
      await Promise.all([
        writeAll(fs, 1000, written(5000, 10)),
        writeAll(fs, 12000, written(3000, 11)),
        writeAll(fs, 28000, written(100, 12)),
        writeAll(fs, 8 * BLOCK, written(6000, 13)),
      ]);
    },
    changedBlocks: [1, 2, 3, 4, 5, 8, 10, 11],
    sizeAfterBytes: 8 * BLOCK + 6000,
  },
];

/**
 * Reference model of the file with the driver's write semantics, independent of
 * SingleFileFs: a plain buffer and a size.
 */
export class SingleFileModel implements SingleFileWriter {
  readonly maxFileSize: number;
  #content: Buffer;
  #sizeBytes: number;

  constructor(imageBlocks: number = IMAGE_BLOCKS) {
    this.maxFileSize = maxFileSizeFor(imageBlocks * BLOCK);
    this.#content = Buffer.alloc(this.maxFileSize);
    this.#sizeBytes = this.#content.write(INITIAL_CONTENT, 'latin1');
  }

  get size(): number {
    return this.#sizeBytes;
  }

  content(): Buffer {
    return Buffer.from(this.#content.subarray(0, this.#sizeBytes));
  }

  async write(offsetBytes: number, data: Buffer): Promise<number> {
    if (offsetBytes > this.maxFileSize) throw new BdsnapError('EINVAL', 'past the max file size');
    if (offsetBytes > this.#sizeBytes) return 0;
    const n = Math.min(data.length, this.maxFileSize - offsetBytes);
    data.copy(this.#content, offsetBytes, 0, n);
    this.#sizeBytes = Math.max(this.#sizeBytes, offsetBytes + n);
    return n;
  }
}

/** File content before and after `run`, from the model. */
export async function expectedContent(scenario: GradingScenario): Promise<{ before: Buffer; after: Buffer }> {
  const model = new SingleFileModel(scenario.imageBlocks);
  await scenario.prepare(model);
  const before = model.content();
  await scenario.run(model);
  return { before, after: model.content() };
}

/** Device blocks whose content differs between two images of the same size. */
export function changedBlocksBetween(before: Buffer, after: Buffer): number[] {
  if (before.length !== after.length) throw new BdsnapError('EINVAL', 'images differ in size');
  const changed: number[] = [];
  for (let offsetBytes = 0; offsetBytes < before.length; offsetBytes += BLOCK) {
    if (!before.subarray(offsetBytes, offsetBytes + BLOCK).equals(after.subarray(offsetBytes, offsetBytes + BLOCK))) {
      changed.push(offsetBytes / BLOCK);
    }
  }
  return changed;
}

/**
 * Format `image` and run the scenario's prepare phase on it offline. Returns the image's
 * bytes afterwards: the state a restore must give back.
 */
export async function prepareScenarioImage(image: string, scenario: GradingScenario): Promise<Buffer> {
  await mkfsImage(image, scenario.imageBlocks);
  const device = await FileDevice.open(image);
  try {
    const prepFs = await SingleFileFs.open(device);
    await scenario.prepare(prepFs);
    await prepFs.flush();
  } finally {
    await device.close();
  }
  return fs.readFileSync(image);
}

/** After `run` reached the image (and the server let go of it): blocks, content and size are as expected. */
export async function assertScenarioOutcome(scenario: GradingScenario, image: string, before: Buffer): Promise<void> {
  const after = fs.readFileSync(image);
  assert.deepEqual(changedBlocksBetween(before, after), scenario.changedBlocks, `${scenario.name}: changed blocks`);
  const expected = await expectedContent(scenario);
  assert.deepEqual(after.subarray(8192, 8192 + expected.after.length), expected.after, `${scenario.name}: content`);
  assert.equal(Number(after.readBigUInt64LE(4096 + 24)), scenario.sizeAfterBytes, `${scenario.name}: size`);
}


/**
 * A writer that runs one `bdsnap sffs write` process per write, e.g. with
 * `['--socket', path]`, `['--run-dir', dir]` or `['--image']` as `targetArgs`.
 */
export function sffsCliWriter(targetArgs: string[], devName: string, env: NodeJS.ProcessEnv = {}): SingleFileWriter {
  return {
    write(offsetBytes: number, data: Buffer): Promise<number> {
      const args = [MAIN, 'sffs', 'write', '--json', ...targetArgs, devName, String(offsetBytes), data.toString('latin1')];
      return new Promise((resolve, reject) => {
        execFile(process.execPath, args, { encoding: 'utf8', timeout: 30_000, env: { ...process.env, ...env } }, (err, stdout, stderr) => {
          // The CLI refuses a write that would leave a hole; the filesystem call wrote nothing.
          if (err && /past the end of the file/.test(stderr)) resolve(0);
          else if (err) reject(new BdsnapError('EIO', `bdsnap sffs write failed: ${stderr.trim() || err.message}`, { cause: err }));
          else resolve((JSON.parse(stdout) as { writtenBytes: number }).writtenBytes);
        });
      });
    },
  };
}
