/**
 * Sorted lists of chunks walked in runs of adjacent ones: how the session end, restore and the
 * digest workers read or write many chunks with few large I/Os.
 */

import type { BlockDevice } from '../device/block-device.js';

/** [from, to) index ranges of `chunks` (sorted, distinct), each of adjacent chunks, at most `maxRun` long. */
export function* chunkRuns(chunks: ArrayLike<number>, maxRun: number): Generator<[number, number]> {
  let i = 0;
  while (i < chunks.length) {
    let j = i + 1;
    while (j < chunks.length && chunks[j] === chunks[j - 1]! + 1 && j - i < maxRun) j++;
    yield [i, j];
    i = j;
  }
}

/**
 * Read `chunks` (sorted, distinct) from `device` in runs of up to `runBytes`, calling
 * `each(chunk, bytes, index in chunks)` for every one (the device's last chunk may be short).
 * `yieldBetweenRuns` lets other work on the event loop run between runs of a long pass.
 */
export async function forEachChunk(
  device: BlockDevice,
  chunks: ArrayLike<number>,
  chunkSize: number,
  runBytes: number,
  each: (chunk: number, data: Buffer, index: number) => void,
  options: { yieldBetweenRuns?: boolean } = {},
): Promise<void> {
  const maxRun = Math.max(1, Math.floor(runBytes / chunkSize));
  // One buffer for all runs: fresh large buffers cost a page fault per page on first touch.
  const scratch = Buffer.allocUnsafe(Math.min(maxRun, chunks.length) * chunkSize);
  for (const [from, to] of chunkRuns(chunks, maxRun)) {
    const first = chunks[from]!;
    const start = first * chunkSize;
    const buf = scratch.subarray(0, Math.min((first + to - from) * chunkSize, device.size) - start);
    await device.read(buf, start);
    for (let k = 0; k < to - from; k++) each(first + k, buf.subarray(k * chunkSize, Math.min((k + 1) * chunkSize, buf.length)), from + k);
    if (options.yieldBetweenRuns) await new Promise<void>((resolve) => setImmediate(resolve));
  }
}
