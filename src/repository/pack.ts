/**
 * Packs and their index (repository version 2; see format.ts).
 *
 * A pack is stored pieces one after the other, each sealed on its own (crypto.ts), with no
 * header: what is where is in index objects, so a restore reads one piece by byte range. A
 * pack is written whole by one stage (a put), and its index entries are written only after
 * every pack they name is durable (the writer's commit), and before any manifest names the
 * pieces: a crash leaves at most packs no index names, which prune deletes.
 */

import { z } from 'zod';
import type { ByteRange } from '../bytes.js';
import { BdsnapError } from '../errors.js';
import { parseJson } from '../stored-json.js';
import { packObject, randomObjectName } from './format.js';
import type { ObjectStore } from './object-store.js';

export interface PackedPiece {
  id: string;
  offsetBytes: number;
  lengthBytes: number;
}

export interface WrittenPack {
  /** The pack's object name. */
  object: string;
  pieces: PackedPiece[];
}

/** Where a piece is: a byte range of an object, or (lengthBytes null) a whole v1 piece object. */
export interface PieceLocation {
  object: string;
  offsetBytes: number;
  lengthBytes: number | null;
}

/**
 * What verify found wrong with a piece it removed from the index: 'damaged' (its bytes are there
 * and wrong: cut short, altered, not decoding to its id) or 'missing' (its pack is gone).
 */
export type PieceProblem = 'damaged' | 'missing';

/** A piece verify removed from the index, where it was and why (Repository.droppedPieces). */
export interface DroppedPiece {
  pack: string;
  problem: PieceProblem;
}

/** What an index object holds: the packs it places pieces in, and the pieces verify removed from it. */
export interface IndexContent {
  packs: WrittenPack[];
  dropped: Map<string, DroppedPiece>;
}

/** The byte range of its object a piece takes, or null for a whole object (a v1 piece). */
export function pieceRange(at: PieceLocation): ByteRange | null {
  return at.lengthBytes === null ? null : { offsetBytes: at.offsetBytes, lengthBytes: at.lengthBytes };
}

const ID_HEX = /^[0-9a-f]{64}$/;

export const INDEX_FORMAT = 'bdsnap-index';
export const indexSchema = z.object({
  format: z.literal(INDEX_FORMAT),
  version: z.literal(1),
  packs: z.array(z.object({
    object: z.string(),
    /** [id, offset, length] per piece. */
    pieces: z.array(z.tuple([z.string().regex(ID_HEX), z.number().int().nonnegative(), z.number().int().positive()])),
  })),
  /**
   * [id, pack, problem] per piece verify removed from this object's packs: it places nothing,
   * and lets a later verify or restore say what was wrong with a piece a backup still names.
   * Optional, so an index without it is read as before, and a bdsnap that predates it reads
   * the packs and ignores it.
   */
  dropped: z.array(z.tuple([z.string().regex(ID_HEX), z.string(), z.enum(['damaged', 'missing'])])).optional(),
});

/** Packs per index object at most: about 4 GiB of pieces, an index of a few hundred KiB. */
export const PACKS_PER_INDEX = 256;

export function encodeIndex(packs: readonly WrittenPack[], dropped: ReadonlyMap<string, DroppedPiece> = new Map()): Buffer {
  return Buffer.from(JSON.stringify({
    format: INDEX_FORMAT, version: 1,
    packs: packs.map((p) => ({ object: p.object, pieces: p.pieces.map((e) => [e.id, e.offsetBytes, e.lengthBytes]) })),
    ...(dropped.size > 0 ? { dropped: [...dropped].map(([id, d]) => [id, d.pack, d.problem]) } : {}),
  }));
}

/** What an index holds; ECORRUPT unless well formed, every range within `maxPieceBytes` and without overlap. */
export function decodeIndex(plain: Buffer, what: string, isPack: (name: string) => boolean, maxPieceBytes: number): IndexContent {
  const index = parseJson(plain, indexSchema, (problem) => `${what} is damaged (${problem})`);
  const dropped = new Map<string, DroppedPiece>();
  for (const [id, pack, problem] of index.dropped ?? []) {
    if (!isPack(pack)) throw new BdsnapError('ECORRUPT', `${what} names ${pack}, which is not a pack`);
    dropped.set(id, { pack, problem });
  }
  const packs = index.packs.map((p) => {
    if (!isPack(p.object)) throw new BdsnapError('ECORRUPT', `${what} names ${p.object}, which is not a pack`);
    let end = 0;
    const pieces = p.pieces.map(([id, offsetBytes, lengthBytes]) => {
      if (lengthBytes > maxPieceBytes || offsetBytes < end) throw new BdsnapError('ECORRUPT', `${what} gives piece ${id} a range no piece can have`);
      end = offsetBytes + lengthBytes;
      return { id, offsetBytes, lengthBytes };
    });
    return { object: p.object, pieces };
  });
  return { packs, dropped };
}

/**
 * Collects stored pieces into packs of about `targetBytes` and stages each pack as it fills
 * (ObjectStore.stage: visible and durable at the store's next commit). `add` may be called by
 * many tasks at once: a pack's state is taken over synchronously before its stage is awaited.
 * The caller commits the store, then writes the index of `packs`.
 */
export class PackWriter {
  readonly packs: WrittenPack[] = [];
  readonly #store: ObjectStore;
  readonly #targetBytes: number;
  #parts: Buffer[] = [];
  #pieces: PackedPiece[] = [];
  #bytes = 0;

  constructor(store: ObjectStore, targetBytes: number) {
    this.#store = store;
    this.#targetBytes = targetBytes;
  }

  /** Append one stored piece; waits while a full pack is being staged (backpressure). */
  async add(id: string, parts: readonly Buffer[]): Promise<void> {
    let length = 0;
    for (const p of parts) {
      this.#parts.push(p);
      length += p.length;
    }
    this.#pieces.push({ id, offsetBytes: this.#bytes, lengthBytes: length });
    this.#bytes += length;
    if (this.#bytes >= this.#targetBytes) await this.#flush();
  }

  async #flush(): Promise<void> {
    if (this.#pieces.length === 0) return;
    const object = packObject(randomObjectName());
    const parts = this.#parts;
    this.packs.push({ object, pieces: this.#pieces });
    this.#parts = [];
    this.#pieces = [];
    this.#bytes = 0;
    await this.#store.stage(object, parts);
  }

  /** Stage what is left; returns every pack written. */
  async finish(): Promise<WrittenPack[]> {
    await this.#flush();
    return this.packs;
  }
}
