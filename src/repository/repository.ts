/**
 * A backup repository over an ObjectStore: init and open (the versioned `config` object),
 * manifests (list, load, forget), the set of stored pieces, and prune.
 *
 * Crash safety comes from the order of writes, not from any rename or lock of the store:
 * pieces first, the manifest last. A backup that died before its manifest left only pieces no
 * manifest names, which readers ignore and prune deletes. Prune runs under the exclusive lock
 * (lock.ts), so it never deletes a piece a running create is about to name.
 */

import { randomBytes } from 'node:crypto';
import { BdsnapError, toBdsnapError } from '../errors.js';
import { STORED_SLACK_BYTES, type CodecChoice } from './codec.js';
import {
  BACKUPS_PREFIX, CONFIG_OBJECT, DEFAULT_PIECE_BYTES, MAX_PIECE_BYTES, MAX_SLOTS, MIN_PIECE_BYTES, PIECES_PREFIX, REPO_FORMAT, REPO_VERSION,
  backupIdOf, configSchema, expandSlots, manifestObject, manifestSchema, pieceHashOf, pieceObject,
  type Manifest, type RepoConfig,
} from './format.js';
import { RepoLock, listLocks } from './lock.js';
import { LocalDirStore, type ObjectStore } from './object-store.js';
import { runLimited } from '../run-limited.js';

export interface InitOptions {
  /** Power of two from 64 KiB to 16 MiB; default 256 KiB. */
  pieceSizeBytes?: number;
  /** Codec of new pieces: 'zstd' (default), 'brotli', 'deflate' or 'lz4' (fastest, larger); see codecFor. */
  codec?: CodecChoice;
}

export interface PruneSummary {
  backups: number;
  referencedPieces: number;
  deletedPieces: number;
  deletedBytes: number;
  deletedLocks: number;
  deletedIncomplete: number;
}

/** A config is a few hundred bytes. */
const MAX_CONFIG_BYTES = 64 * 1024;

/**
 * Commas a manifest may hold, counted before it is parsed: V8 dies (it does not throw) building
 * an array of some 130 million elements, which 280 MB of "1," make. A real manifest fits in one
 * string, so it has far fewer (a hash and a run of zero pieces take 68 bytes).
 */
const MAX_MANIFEST_COMMAS = MAX_SLOTS;
const COMMA = 0x2c;

function countByte(buf: Buffer, byte: number): number {
  let n = 0;
  for (let at = buf.indexOf(byte); at >= 0; at = buf.indexOf(byte, at + 1)) n++;
  return n;
}

/** A manifest, or why it cannot be read. */
export type BackupRecord = { id: string; manifest: Manifest; error?: undefined } | { id: string; manifest?: undefined; error: BdsnapError };

export class Repository {
  readonly store: ObjectStore;
  readonly config: RepoConfig;

  private constructor(store: ObjectStore, config: RepoConfig) {
    this.store = store;
    this.config = config;
  }

  get pieceSizeBytes(): number {
    return this.config.pieceSizeBytes;
  }

  /** Make a new repository in an empty store. EINVAL if the store already holds anything. */
  static async init(store: ObjectStore, options: InitOptions = {}): Promise<Repository> {
    const pieceSizeBytes = options.pieceSizeBytes ?? DEFAULT_PIECE_BYTES;
    if ((pieceSizeBytes & (pieceSizeBytes - 1)) !== 0 || pieceSizeBytes < MIN_PIECE_BYTES || pieceSizeBytes > MAX_PIECE_BYTES) {
      throw new BdsnapError('EINVAL', `piece size must be a power of two from ${MIN_PIECE_BYTES} to ${MAX_PIECE_BYTES} bytes, got ${pieceSizeBytes}`);
    }
    if (await store.stat(CONFIG_OBJECT)) throw new BdsnapError('EINVAL', `${store.location} is already a backup repository`);
    if ((await store.list('')).length > 0) throw new BdsnapError('EINVAL', `${store.location} is not empty; a repository needs an empty place`);
    const config: RepoConfig = {
      format: REPO_FORMAT, version: REPO_VERSION, id: randomBytes(8).toString('hex'), createdAt: new Date().toISOString(), pieceSizeBytes, hash: 'sha256',
      codec: options.codec ?? 'zstd',
    };
    await store.put(CONFIG_OBJECT, Buffer.from(`${JSON.stringify(config, null, 2)}\n`));
    return new Repository(store, config);
  }

  /** Open an existing repository: ENOENT if there is none, ECORRUPT if its config does not parse. */
  static async open(store: ObjectStore): Promise<Repository> {
    let raw: Buffer;
    try {
      raw = await store.get(CONFIG_OBJECT, { maxBytes: MAX_CONFIG_BYTES });
    } catch (err) {
      if (toBdsnapError(err).code === 'ENOENT') {
        throw new BdsnapError('ENOENT', `${store.location} is not a backup repository (no config); create one with 'bdsnap backup init'`, { cause: err });
      }
      throw err;
    }
    let json: unknown;
    try {
      json = JSON.parse(raw.toString('utf8'));
    } catch (err) {
      throw new BdsnapError('ECORRUPT', `the config of ${store.location} is not JSON`, { cause: err });
    }
    const probe = json as { format?: unknown; version?: unknown };
    if (probe.format === REPO_FORMAT && typeof probe.version === 'number' && probe.version > REPO_VERSION) {
      throw new BdsnapError('ENOTSUP', `${store.location} is a version ${probe.version} repository; this bdsnap reads version ${REPO_VERSION}`);
    }
    const parsed = configSchema.safeParse(json);
    if (!parsed.success) throw new BdsnapError('ECORRUPT', `the config of ${store.location} is not a bdsnap repository config: ${parsed.error.issues[0]?.message ?? ''}`);
    return new Repository(store, parsed.data);
  }

  /** Ids of every backup, oldest first (ids sort by time). */
  async backupIds(): Promise<string[]> {
    const ids = (await this.store.list(BACKUPS_PREFIX)).map((o) => backupIdOf(o.name)).filter((id): id is string => id !== undefined);
    return ids.sort();
  }

  /** The manifest of `id`: ENOENT if there is no such backup, ECORRUPT if it does not parse. */
  async manifest(id: string): Promise<Manifest> {
    const name = manifestObject(id);
    let raw: Buffer;
    try {
      raw = await this.store.get(name);
    } catch (err) {
      if (toBdsnapError(err).code === 'ENOENT') throw new BdsnapError('ENOENT', `there is no backup ${id} in ${this.store.location}`, { cause: err });
      throw err;
    }
    if (countByte(raw, COMMA) > MAX_MANIFEST_COMMAS) {
      throw new BdsnapError('ECORRUPT', `the manifest of backup ${id} is damaged (more than ${MAX_MANIFEST_COMMAS} values)`);
    }
    let parsed;
    try {
      parsed = manifestSchema.safeParse(JSON.parse(raw.toString('utf8')));
    } catch (err) {
      throw new BdsnapError('ECORRUPT', `the manifest of backup ${id} is damaged (not JSON)`, { cause: err });
    }
    if (!parsed.success || parsed.data.id !== id) throw new BdsnapError('ECORRUPT', `the manifest of backup ${id} is damaged (does not match the format)`);
    if (parsed.data.pieceSizeBytes !== this.pieceSizeBytes) throw new BdsnapError('ECORRUPT', `the manifest of backup ${id} has another piece size than the repository`);
    for (const d of parsed.data.devices) expandSlots(d, parsed.data.pieceSizeBytes);
    return parsed.data;
  }

  /** Every backup, oldest first, each with its manifest or the reason it cannot be read. */
  async backups(): Promise<BackupRecord[]> {
    const out: BackupRecord[] = [];
    for (const id of await this.backupIds()) {
      try {
        out.push({ id, manifest: await this.manifest(id) });
      } catch (err) {
        out.push({ id, error: toBdsnapError(err) });
      }
    }
    return out;
  }

  /**
   * The newest readable backup that holds `device`, if any; with `host`, only that host's: one
   * path on two hosts is two devices (a backup without a host matches no host).
   */
  async lastBackupOf(device: string, host?: string): Promise<Manifest | undefined> {
    const ids = await this.backupIds();
    for (let i = ids.length - 1; i >= 0; i--) {
      const m = await this.manifest(ids[i]!).catch(() => undefined);
      if (m?.devices.some((d) => d.device === device) && (host === undefined || m.host === host)) return m;
    }
    return undefined;
  }

  /** The stored bytes of a piece: ECORRUPT, before reading, if larger than a piece can be. */
  readStoredPiece(hash: string): Promise<Buffer> {
    return this.store.get(pieceObject(hash), { maxBytes: this.pieceSizeBytes + STORED_SLACK_BYTES });
  }

  /** Hashes of the pieces in the store, with their stored sizes. */
  async storedPieces(): Promise<Map<string, number>> {
    const out = new Map<string, number>();
    for (const o of await this.store.list(PIECES_PREFIX)) {
      const hash = pieceHashOf(o.name);
      if (hash !== undefined) out.set(hash, o.sizeBytes);
    }
    return out;
  }

  /** Hashes of the pieces in the store, without their sizes (cheaper than storedPieces). */
  async storedPieceNames(): Promise<Set<string>> {
    const out = new Set<string>();
    for (const name of await this.store.names(PIECES_PREFIX)) {
      const hash = pieceHashOf(name);
      if (hash !== undefined) out.add(hash);
    }
    return out;
  }

  /** Remove the manifests of `ids` (all must exist; checked first). Their pieces stay until prune. */
  async forget(ids: string[]): Promise<void> {
    for (const id of ids) {
      if (!(await this.store.stat(manifestObject(id)))) throw new BdsnapError('ENOENT', `there is no backup ${id} in ${this.store.location}`);
    }
    for (const id of ids) await this.store.delete(manifestObject(id));
  }

  /**
   * Delete every piece no manifest names, dead and stale locks, and what interrupted puts left.
   * Refuses (EBUSY) while a create runs, and (ECORRUPT) while a manifest cannot be read:
   * its pieces cannot be told apart from garbage.
   */
  async prune(): Promise<PruneSummary> {
    const lock = await RepoLock.acquire(this.store, 'prune');
    try {
      const startedMs = Date.now();
      // Stale locks go first: a create that stalled and comes back finds its lock gone before
      // any piece it counts on is (RepoLock.assertHeld).
      let deletedLocks = 0;
      for (const l of await listLocks(this.store)) {
        if (l.name !== lock.name && l.state !== 'live') {
          await this.store.delete(l.name);
          deletedLocks++;
        }
      }
      const records = await this.backups();
      const broken = records.filter((r) => r.error);
      if (broken.length > 0) {
        throw new BdsnapError('ECORRUPT', `cannot prune: the manifest of ${broken.map((r) => r.id).join(', ')} cannot be read (${broken[0]!.error!.message}); forget it or repair it first`);
      }
      const referenced = new Set<string>();
      for (const r of records) for (const d of r.manifest!.devices) for (const s of d.pieces) if (typeof s === 'string') referenced.add(s);
      let deletedPieces = 0;
      let deletedBytes = 0;
      const unused = [...(await this.storedPieces())].filter(([hash]) => !referenced.has(hash));
      // A prune that stalled past STALE_MS may have had its lock ignored by a create that now
      // counts on these pieces: it stops rather than delete them (lock.ts).
      const consequence = 'a backup may have started counting on pieces it would delete; stopped; run prune again';
      await lock.assertHeld('this prune', consequence);
      await runLimited(unused, 16, async ([hash, size]) => {
        lock.assertFresh('this prune', consequence);
        await this.store.delete(pieceObject(hash));
        deletedPieces++;
        deletedBytes += size;
      });
      const deletedIncomplete = await this.store.removeIncomplete(startedMs);
      return { backups: records.length, referencedPieces: referenced.size, deletedPieces, deletedBytes, deletedLocks, deletedIncomplete };
    } finally {
      await lock.release();
    }
  }
}

/** Open the repository in a local directory. */
export function openLocalRepository(dir: string): Promise<Repository> {
  return Repository.open(new LocalDirStore(dir));
}
