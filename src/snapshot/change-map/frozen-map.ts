/**
 * A snapshot's view of the change map, frozen when the snapshot was taken (file format in
 * file-format.ts). After save() or load() the view stays attached to its file: mark() writes
 * the changed entries there at once (page cache), like the live map in 'process' durability.
 * Entries are checked on load (none may exceed the view's number).
 */

import fs from 'node:fs';
import path from 'node:path';
import { BdsnapError, toBdsnapError } from '../../errors.js';
import { checkRange } from '../../device/block-device.js';
import { makeDirectoryDurable, writeFileAtomicSync } from '../../host/atomic-file.js';
import { openFdSync, preadFullySync, pwriteFullySync } from '../../host/fd-io.js';
import { encodeFrozenHeader, entryBytes, FROZEN_HEADER_BYTES, parseFrozenHeader, readEntries } from './file-format.js';
import { changedExtents, changedRanges, changedSpan, dirtyBitmapContextName, setEntries, visitChanged, type ByteRange } from './ranges.js';

/** Writes to the snapshot's image mark the view too (with its own number), so a backup of the image reads them. */
export class FrozenChangeMap {
  readonly generation: string;
  readonly number: number;
  readonly blockSize: number;
  readonly blocks: number;
  readonly deviceSizeBytes: number;
  readonly #entries: Uint32Array;
  #fd: number | undefined;

  /** Normally made by ChangeMap.advance() or FrozenChangeMap.load(). */
  constructor(init: { generation: string; number: number; blockSize: number; deviceSizeBytes: number; entries: Uint32Array }) {
    this.generation = init.generation;
    this.number = init.number;
    this.blockSize = init.blockSize;
    this.deviceSizeBytes = init.deviceSizeBytes;
    this.blocks = Math.ceil(init.deviceSizeBytes / init.blockSize);
    if (init.entries.length !== this.blocks) throw new BdsnapError('EINVAL', `${init.entries.length} entries for ${this.blocks} blocks`);
    this.#entries = init.entries;
  }

  /** Merged byte ranges changed since snapshot `sinceNumber`, as of this view. */
  changedSince(sinceNumber: number, offsetBytes?: number, lengthBytes?: number): ByteRange[] {
    return changedRanges(this.#entries, this.blockSize, this.deviceSizeBytes, sinceNumber, offsetBytes, lengthBytes);
  }

  /** changedSince without the array (see ChangeMap.forEachChanged). */
  forEachChanged(sinceNumber: number, visit: (offsetBytes: number, lengthBytes: number) => void, offsetBytes?: number, lengthBytes?: number): void {
    visitChanged(this.#entries, this.blockSize, this.deviceSizeBytes, sinceNumber, visit, offsetBytes, lengthBytes);
  }

  /**
   * Extents for the qemu:dirty-bitmap context "changed since `sinceNumber`": contiguous from
   * `offsetBytes`, flag DIRTY_BITMAP_CHANGED (bit 0) on changed ones, clipped to the device.
   */
  extents(sinceNumber: number, offsetBytes: number, lengthBytes: number): Array<{ length: number; flags: number }> {
    return changedExtents(this.#entries, this.blockSize, this.deviceSizeBytes, sinceNumber, offsetBytes, lengthBytes);
  }

  /** The names of the contexts an image of this snapshot offers: since 1..number-1. */
  contextNames(): string[] {
    const names: string[] = [];
    for (let since = 1; since < this.number; since++) names.push(dirtyBitmapContextName(this.generation, since));
    return names;
  }

  /**
   * One NBD metadata context source per earlier number (an NBD ExportHandle's `metaContexts`),
   * named by dirtyBitmapContextName.
   */
  contextSources(): Array<{ readonly name: string; extents(offsetBytes: number, lengthBytes: number): Promise<Array<{ length: number; flags: number }>> }> {
    const sources = [];
    for (let since = 1; since < this.number; since++) {
      const name = dirtyBitmapContextName(this.generation, since);
      sources.push({ name, extents: async (offsetBytes: number, lengthBytes: number) => this.extents(since, offsetBytes, lengthBytes) });
    }
    return sources;
  }

  /** A write to the snapshot's image: those blocks count as changed in this view. */
  mark(offsetBytes: number, lengthBytes: number): void {
    if (lengthBytes <= 0) return;
    checkRange({ size: this.deviceSizeBytes }, offsetBytes, lengthBytes, true);
    const lo = setEntries(this.#entries, Math.floor(offsetBytes / this.blockSize), Math.floor((offsetBytes + lengthBytes - 1) / this.blockSize), this.number);
    if (lo >= 0 && this.#fd !== undefined) pwriteFullySync(this.#fd, entryBytes(this.#entries, lo, changedSpan[1]!), FROZEN_HEADER_BYTES + lo * 4);
  }

  /** Persist atomically to `file` (beside the snapshot) and stay attached to it. */
  async save(file: string): Promise<void> {
    const h = encodeFrozenHeader({ generation: this.generation, number: this.number, blockSize: this.blockSize, blocks: this.blocks, deviceSizeBytes: this.deviceSizeBytes });
    try {
      await makeDirectoryDurable(path.dirname(file), { recursive: true, mode: 0o700 });
      writeFileAtomicSync(file, [h, entryBytes(this.#entries, 0, this.#entries.length - 1)]);
      const fd = openFdSync(file, 'r+');
      if (this.#fd !== undefined) fs.closeSync(this.#fd);
      this.#fd = fd;
    } catch (err) {
      throw toBdsnapError(err);
    }
  }

  /** Load a view saved by save(). Errors: ENOENT, ECORRUPT (with what is wrong). */
  static async load(file: string): Promise<FrozenChangeMap> {
    let fd: number;
    try {
      fd = openFdSync(file, 'r+');
    } catch (err) {
      throw toBdsnapError(err);
    }
    let keep = false;
    try {
      const corrupt = (why: string): BdsnapError => new BdsnapError('ECORRUPT', `${file}: ${why}`);
      const fileBytes = fs.fstatSync(fd).size;
      const h = Buffer.alloc(FROZEN_HEADER_BYTES);
      const header = parseFrozenHeader(h.subarray(0, preadFullySync(fd, h, 0)), fileBytes);
      if (typeof header === 'string') throw corrupt(header);
      const { number, blocks } = header;
      const entries = new Uint32Array(blocks);
      if (!readEntries(fd, entries, FROZEN_HEADER_BYTES)) throw corrupt('the entries are cut short');
      for (let i = 0; i < blocks; i++) if (entries[i]! > number) throw corrupt(`block ${i} holds number ${entries[i]}, beyond the view's number ${number}`);
      const view = new FrozenChangeMap({ generation: header.generation, number, blockSize: header.blockSize, deviceSizeBytes: header.deviceSizeBytes, entries });
      view.#fd = fd;
      keep = true;
      return view;
    } finally {
      if (!keep) fs.closeSync(fd);
    }
  }

  /** Detach from the file (the view stays usable in memory). */
  async close(): Promise<void> {
    if (this.#fd === undefined) return;
    const fd = this.#fd;
    this.#fd = undefined;
    fs.closeSync(fd);
  }
}
