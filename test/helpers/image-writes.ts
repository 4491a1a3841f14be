/**
 * Random writes to an image, as the model tests of the restore and backup promises make them:
 * through an NBD client (whole blocks) or by another process (`dd`, any bytes), and applied to
 * the test's model of the image.
 */

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';

/** `length` bytes of `byte` at `offset`. */
export interface Write { offset: number; length: number; byte: number }

export function applyWrite(image: Buffer, w: Write): void {
  image.fill(w.byte, w.offset, w.offset + w.length);
}

/** A write of up to 48 KiB at a random place of an image of `sizeBytes`, in whole `align`-byte blocks (NBD clients write the server's blocks; dd need not). */
export function randomWrite(random: () => number, sizeBytes: number, align = 1): Write {
  const blocks = sizeBytes / align;
  const offset = Math.floor(random() * (blocks - 1)) * align;
  const length = Math.min(1 + Math.floor(random() * ((3 * 16384) / align)), blocks - offset / align) * align;
  return { offset, length, byte: 1 + Math.floor(random() * 255) };
}

/** dd writing `w` into `file` in place, as another process. */
export function ddWrite(file: string, w: Write): void {
  const byte = `\\${w.byte.toString(8).padStart(3, '0')}`;
  const r = spawnSync('sh', ['-c', `head -c ${w.length} /dev/zero | tr '\\0' '${byte}' | dd of="$1" bs=4096 seek=${w.offset} oflag=seek_bytes conv=notrunc status=none`, 'sh', file],
    { encoding: 'utf8', timeout: 20_000 });
  assert.equal(r.status, 0, r.stderr);
}

/** nbdsh's python for `writes`, a flush, then a line on stdout (see heldNbdsh). */
export function nbdshWrites(writes: readonly Write[]): string {
  return [...writes.map((w) => `h.pwrite(bytes([${w.byte}]) * ${w.length}, ${w.offset})`), 'h.flush()', 'print("written", flush=True)'].join('\n');
}
