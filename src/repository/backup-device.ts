/**
 * One device of a backup as a read-only BlockDevice: each read is answered from the pieces of
 * the slots it covers, each piece read, decrypted or decoded and checked by the loader before a
 * byte of it is used (a damaged piece fails the read with its error, never returns other bytes).
 * All-zero slots are holes, reported by `extents` as such. Decoded pieces are kept in a small
 * cache, and a reader that goes on where its last read ended gets the next pieces loaded ahead.
 */

import { BdsnapError } from '../errors.js';
import { EXTENT_HOLE, EXTENT_ZERO, checkRange, type BlockDevice, type BlockSizes, type Extent } from '../device/block-device.js';
import { expandSlots, type Manifest } from './format.js';
import { pieceRange, type PieceLocation } from './pack.js';
import { readPieces, type ReadPiecesOptions, type WantedPiece } from './pack-reader.js';
import { PiecePool } from './piece-pool.js';
import type { PlaceFailure } from './piece-worker.js';
import type { Repository } from './repository.js';

/** The raw content of a piece (`lengthBytes` of it: the last slot may be shorter), checked. */
export type PieceLoader = (hash: string, lengthBytes: number) => Promise<Buffer>;

export interface BackupDeviceOptions {
  /** Decoded pieces kept (default 64). */
  cachePieces?: number;
  /** Pieces loaded ahead of a sequential reader (default 8). */
  readAheadPieces?: number;
}

export class BackupDevice implements BlockDevice {
  readonly readOnly = true;
  readonly canTrim = false;
  readonly canFastZero = false;
  readonly canMultiConn = true;
  readonly blockSizes: BlockSizes = { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 };
  readonly size: number;
  readonly #pieceBytes: number;
  readonly #slots: ReadonlyArray<string | null>;
  readonly #load: PieceLoader;
  readonly #cacheLimit: number;
  readonly #readAhead: number;
  /** By slot index, in use order (a Map keeps insertion order: the first key is the oldest). */
  readonly #cache = new Map<number, Promise<Buffer>>();
  /** Where the last read ended: a read starting there is sequential. */
  #lastEnd = -1;
  #closed = false;

  constructor(sizeBytes: number, pieceBytes: number, slots: ReadonlyArray<string | null>, load: PieceLoader, options: BackupDeviceOptions = {}) {
    if (slots.length !== Math.ceil(sizeBytes / pieceBytes)) {
      throw new BdsnapError('ECORRUPT', `a device of ${sizeBytes} bytes needs ${Math.ceil(sizeBytes / pieceBytes)} pieces of ${pieceBytes} bytes, not ${slots.length}`);
    }
    this.size = sizeBytes;
    this.#pieceBytes = pieceBytes;
    this.#slots = slots;
    this.#load = load;
    this.#readAhead = options.readAheadPieces ?? 8;
    this.#cacheLimit = Math.max(options.cachePieces ?? 64, this.#readAhead * 2);
  }

  #slotLength(i: number): number {
    return Math.min(this.#pieceBytes, this.size - i * this.#pieceBytes);
  }

  /** The content of slot `i` (a piece slot), from the cache or loaded. */
  #piece(i: number): Promise<Buffer> {
    const cached = this.#cache.get(i);
    if (cached) {
      this.#cache.delete(i);
      this.#cache.set(i, cached);
      return cached;
    }
    const hash = this.#slots[i]!;
    const length = this.#slotLength(i);
    const loading = this.#load(hash, length).then((raw) => {
      if (raw.length !== length) throw new BdsnapError('ECORRUPT', `piece ${hash} holds ${raw.length} bytes where ${length} are needed`);
      return raw;
    });
    // A failed load is not kept: the next read tries again (the store may be back).
    loading.catch(() => this.#cache.get(i) === loading && this.#cache.delete(i));
    this.#cache.set(i, loading);
    while (this.#cache.size > this.#cacheLimit) this.#cache.delete(this.#cache.keys().next().value!);
    return loading;
  }

  async read(target: Buffer, offsetBytes: number): Promise<void> {
    if (this.#closed) throw new BdsnapError('EIO', 'the backup device is closed');
    checkRange(this, offsetBytes, target.length, false);
    if (target.length === 0) return;
    const P = this.#pieceBytes;
    const end = offsetBytes + target.length;
    const first = Math.floor(offsetBytes / P);
    const last = Math.floor((end - 1) / P);
    const sequential = offsetBytes === this.#lastEnd;
    this.#lastEnd = end;
    const parts: Array<Promise<void>> = [];
    for (let i = first; i <= last; i++) {
      const from = Math.max(offsetBytes, i * P);
      const to = Math.min(end, (i + 1) * P);
      const into = target.subarray(from - offsetBytes, to - offsetBytes);
      if (this.#slots[i] === null) {
        into.fill(0);
        continue;
      }
      parts.push(this.#piece(i).then((raw) => {
        raw.copy(into, 0, from - i * P, to - i * P);
      }));
    }
    if (sequential) {
      for (let i = last + 1; i <= Math.min(this.#slots.length - 1, last + this.#readAhead); i++) {
        if (this.#slots[i] !== null && !this.#cache.has(i)) this.#piece(i).catch(() => undefined);
      }
    }
    await Promise.all(parts);
  }

  #readOnlyError(): Promise<never> {
    return Promise.reject(new BdsnapError('EPERM', 'a backup is served read-only'));
  }

  write(): Promise<void> { return this.#readOnlyError(); }
  trim(): Promise<void> { return this.#readOnlyError(); }
  zero(): Promise<void> { return this.#readOnlyError(); }
  flush(): Promise<void> { return Promise.resolve(); }

  cache(offsetBytes: number, lengthBytes: number): Promise<void> {
    checkRange(this, offsetBytes, lengthBytes, false);
    const P = this.#pieceBytes;
    const loads: Array<Promise<unknown>> = [];
    for (let i = Math.floor(offsetBytes / P); i * P < offsetBytes + lengthBytes; i++) {
      if (this.#slots[i] !== null) loads.push(this.#piece(i));
    }
    return Promise.all(loads).then(() => undefined);
  }

  /** Zero slots are holes; runs of slots of one kind are one extent. */
  extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    checkRange(this, offsetBytes, lengthBytes, false);
    const P = this.#pieceBytes;
    const end = offsetBytes + lengthBytes;
    const out: Extent[] = [];
    for (let pos = offsetBytes; pos < end;) {
      const i = Math.floor(pos / P);
      const to = Math.min(end, (i + 1) * P);
      const flags = this.#slots[i] === null ? EXTENT_HOLE | EXTENT_ZERO : 0;
      const prev = out[out.length - 1];
      if (prev && prev.flags === flags) prev.length += to - pos;
      else out.push({ length: to - pos, flags });
      pos = to;
    }
    return Promise.resolve(out);
  }

  close(): Promise<void> {
    this.#closed = true;
    this.#cache.clear();
    return Promise.resolve();
  }
}

export interface OpenedBackupDevice {
  name: string;
  device: BackupDevice;
  /** The piece of each slot, or null for an all-zero slot. */
  slots: ReadonlyArray<string | null>;
  pieceBytes: number;
}

/**
 * Many pieces of a backup at once, fetched by runs of their packs and each decoded and checked
 * once (pack-reader.ts): what a copy of whole ranges uses, where reading slot by slot would
 * cost a request per piece. A piece the index lacks goes to `onError` like one that fails.
 */
export type PieceFetcher = (ids: Iterable<string>, options: Pick<ReadPiecesOptions, 'onPiece' | 'onError' | 'signal'>) => Promise<void>;

/**
 * A piece read, checked and written straight into `fd` at `offsetBytes` by a piece worker
 * (PiecePool.place, no main-thread copy), for a repository kept as local files. Throws what
 * the piece's read or check gives (ENOENT for a piece the index lacks); a failed write of
 * `fd` comes back as `failure`. `keep`: more slots use the piece soon.
 */
export type PiecePlacer = (piece: { hash: string; fd: number; offsetBytes: number; lengthBytes: number; keep: boolean }) => Promise<{ failure?: PlaceFailure }>;

/**
 * Every device of backup `id` as a BackupDevice, by device path; `placePiece` where the
 * repository is local files; `refresh` reads the index again (see below); `close` ends the
 * piece workers.
 */
export async function openBackupDevices(repo: Repository, id: string, options: { manifest?: Promise<Manifest> } = {}): Promise<{
  devices: OpenedBackupDevice[]; fetchPieces: PieceFetcher; placePiece?: PiecePlacer; refresh(): Promise<void>; close(): Promise<void>;
  /** Resolves once the piece workers take tasks (until then pieces are placed on the calling thread). */
  workersReady: Promise<void>;
}> {
  // The manifest and the index are read together, while the piece workers start.
  const pool = new PiecePool(repo.pieceCrypto);
  let manifest: Manifest;
  // Replaced by refresh: every reader below looks it up at each piece.
  let index: Map<string, PieceLocation>;
  try {
    [manifest, index] = await Promise.all([options.manifest ?? repo.manifest(id), repo.pieceIndex()]);
  } catch (err) {
    await pool.close();
    throw err;
  }
  // A device's reads are a client's: their pieces go before those a background copy fetched.
  const load: PieceLoader = async (hash, lengthBytes) => pool.decode(await repo.readStoredPiece(hash, index.get(hash)), hash, lengthBytes, { urgent: true });
  const missing = (hash: string): BdsnapError => new BdsnapError('ENOENT', `piece ${hash} is missing from ${repo.store.location}`);
  const fetchPieces: PieceFetcher = async (ids, options) => {
    const wanted: WantedPiece[] = [];
    for (const hash of ids) {
      const at = index.get(hash);
      if (at) wanted.push({ id: hash, at });
      else {
        if (!options.onError) throw missing(hash);
        options.onError(hash, missing(hash));
      }
    }
    await readPieces(repo, pool, wanted, options);
  };
  const localPath = repo.store.localPath?.bind(repo.store);
  const placePiece: PiecePlacer | undefined = localPath && (async ({ hash, ...into }) => {
    const at = index.get(hash);
    if (!at) throw missing(hash);
    return pool.place({ file: localPath(at.object), range: pieceRange(at), hash, ...into });
  });
  try {
    const devices = manifest.devices.map((entry) => {
      const slots = expandSlots(entry, manifest.pieceSizeBytes);
      return { name: entry.device, slots, pieceBytes: manifest.pieceSizeBytes, device: new BackupDevice(entry.sizeBytes, manifest.pieceSizeBytes, slots, load) };
    });
    /**
     * A reader that outlives a repair finds it: verify drops a damaged piece from the index and
     * the next backup stores it again elsewhere (verify.ts), which the index read at open does
     * not know. Only while backup `id` still names, device by device, the very pieces it was
     * opened with (a piece is checked against its id, so the same ids give the same bytes):
     * otherwise ENOENT (it was forgotten) or EMISMATCH, and the index in use is kept.
     */
    const refresh = async (): Promise<void> => {
      const now = await repo.manifest(id);
      for (const d of devices) {
        const entry = now.devices.find((e) => e.device === d.name);
        const slots = entry && entry.sizeBytes === d.device.size ? expandSlots(entry, now.pieceSizeBytes) : undefined;
        if (!slots || slots.length !== d.slots.length || slots.some((h, i) => h !== d.slots[i])) {
          throw new BdsnapError('EMISMATCH', `backup ${id} in ${repo.store.location} no longer names the pieces of ${d.name} that it named when it was opened`);
        }
      }
      index = await repo.reloadPieceIndex();
    };
    return {
      devices,
      fetchPieces,
      placePiece,
      refresh,
      workersReady: pool.ready,
      close: async () => {
        await Promise.allSettled(devices.map((d) => d.device.close()));
        await pool.close();
      },
    };
  } catch (err) {
    await pool.close();
    throw err;
  }
}
