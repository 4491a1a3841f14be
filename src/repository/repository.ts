/**
 * A backup repository over an ObjectStore: init and open (the versioned `config` object, the
 * password and keys), manifests (list, load, forget), where each piece is (the index), prune
 * and repack, and the keys.
 *
 * Crash safety comes from the order of writes, not from any rename or lock of the store:
 * packs first, then their index, the manifest last. A backup that died before its manifest
 * left only pieces no manifest names, which readers ignore and prune deletes. Prune runs under
 * the exclusive lock (lock.ts), so it never deletes a piece a running create is about to name.
 *
 * Every object read is checked before use: sealed ones are authenticated (crypto.ts), bound
 * to their names; pieces are checked against their ids as they are decoded. Version-1
 * repositories (format.ts) are read as they are and never written in that format.
 */

import os from 'node:os';
import { randomBytes } from 'node:crypto';
import { BdsnapError, toBdsnapError } from '../errors.js';
import { STORED_SLACK_BYTES, type CodecChoice } from './codec.js';
import {
  SEAL_OVERHEAD_BYTES, keyObjectSchema, newMasterKey, objectAad, open, pieceCryptoOf, seal, unwrapMasterKey, wrapMasterKey,
  type KeyObject, type MasterKey, type PieceCrypto, type ScryptParams,
} from './crypto.js';
import {
  BACKUPS_PREFIX, CONFIG_OBJECT, DEFAULT_PACK_BYTES, DEFAULT_PIECE_BYTES, INDEX_PREFIX, KEYS_PREFIX, LEGACY_REPO_VERSION, MAX_PACK_BYTES,
  MAX_PIECE_BYTES, MAX_SLOTS, MIN_PACK_BYTES, MIN_PIECE_BYTES, PACKS_PREFIX, PIECES_PREFIX, REPO_FORMAT, REPO_VERSION,
  backupIdOf, configSchema, expandSlots, indexObject, isIndexObject, isPackObject, keyIdOf, keyObject, legacyConfigSchema, manifestObject,
  manifestSchema, pieceHashOf, pieceObject, randomObjectName,
  type Manifest, type RepoConfig,
} from './format.js';
import { PACKS_PER_INDEX, PackWriter, decodeIndex, encodeIndex, type DroppedPiece, type PieceLocation, type PieceProblem, type WrittenPack } from './pack.js';
import { decodeStored } from './piece-worker.js';
import { RepoLock, listLocks } from './lock.js';
import { LocalDirStore, type ObjectStore } from './object-store.js';
import { runLimited } from '../run-limited.js';
import { formatBytes } from '../units.js';
import { firstIssue, parseJson } from '../stored-json.js';

export interface InitOptions {
  /** Power of two from 64 KiB to 16 MiB; default 256 KiB. */
  pieceSizeBytes?: number;
  /** Codec of new pieces: 'zstd' (default), 'brotli', 'deflate' or 'lz4' (fastest, larger); see codecFor. */
  codec?: CodecChoice;
  /** Packs are closed at about this size (default DEFAULT_PACK_BYTES). */
  packSizeBytes?: number;
  /** Default true. False: pieces, index and manifests are stored in the clear, and unauthenticated. */
  encryption?: boolean;
  /** The first password; required when encrypted. */
  password?: string;
  /** scrypt parameters of the first key (default SCRYPT_DEFAULTS). */
  scrypt?: ScryptParams;
}

export interface OpenOptions {
  /** Asked for only when the repository is encrypted. */
  password?: () => Promise<string> | string;
}

export interface PruneSummary {
  backups: number;
  referencedPieces: number;
  /** Pieces no backup uses that are gone (from the index, or as objects in a v1 repository). */
  deletedPieces: number;
  /** Bytes of the store freed. */
  deletedBytes: number;
  deletedPacks: number;
  /** Of deletedPacks, those no index named: written by a backup (or a prune) that ended before its index did. */
  unindexedPacks: number;
  repackedPacks: number;
  repackedPieces: number;
  deletedLocks: number;
  deletedIncomplete: number;
}

/** What a prune's deleting part reports (the rest of PruneSummary is counted around it). */
type PrunedObjects = Pick<PruneSummary, 'deletedPieces' | 'deletedBytes' | 'deletedPacks' | 'unindexedPacks' | 'repackedPacks' | 'repackedPieces'>;

export interface KeyInfo {
  id: string;
  createdAt: string;
  host: string;
  /** The key this repository was opened with. */
  current: boolean;
}

/** A config is a few hundred bytes, a key object about 500. */
const MAX_CONFIG_BYTES = 64 * 1024;
const MAX_KEY_BYTES = 16 * 1024;
/** Key objects tried with one password at most (each costs a scrypt). */
const MAX_KEYS_TRIED = 64;
/** An index object lists PACKS_PER_INDEX packs: a few MiB at most. */
const MAX_INDEX_BYTES = 256 * 1024 * 1024;
/**
 * Prune repacks a pack when less than half its bytes are used by some backup: rewriting it
 * then costs at most as much as the space it frees. Packs with nothing used are deleted.
 */
export const REPACK_BELOW_USED = 0.5;

/**
 * A prune that stalled past the stale time may have had its lock ignored by a create that now
 * counts on what it would delete: it stops instead (lock.ts).
 */
const PRUNE_STALLED = 'a backup may have started counting on pieces it would delete; stopped; run prune again';

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

/** The config as JSON, or undefined when it is not (an encrypted config is sealed bytes). */
function plainJson(raw: Buffer): unknown {
  try {
    return JSON.parse(raw.toString('utf8')) as unknown;
  } catch {
    return undefined;
  }
}

/** Backups a message names at most; the rest are counted. */
const MAX_NAMED_BACKUPS = 5;

/** Prune's refusal while the backups of `records` name pieces (`unplaced`) no index places. */
function unplacedPieces(records: readonly BackupRecord[], unplaced: ReadonlySet<string>, location: string): BdsnapError {
  const ids = records.filter((r) => r.manifest?.devices.some((d) => d.pieces.some((s) => typeof s === 'string' && unplaced.has(s)))).map((r) => r.id);
  const one = ids.length === 1;
  const named = ids.length > MAX_NAMED_BACKUPS ? `${ids.slice(0, MAX_NAMED_BACKUPS).join(', ')} and ${ids.length - MAX_NAMED_BACKUPS} more` : ids.join(', ');
  const pieces = `${unplaced.size} piece${unplaced.size === 1 ? '' : 's'}`;
  return new BdsnapError('ECORRUPT', `cannot prune: backup${one ? '' : 's'} ${named} name${one ? 's' : ''} ${pieces} no index places (an index object is missing, or verify dropped damaged pieces), so prune cannot tell which packs hold them; run 'bdsnap backup verify --repo ${location}' to see them, then 'bdsnap backup create' of the same devices (it stores again the pieces they still hold) or forget the damaged backup${one ? '' : 's'}`);
}

/** A manifest, or why it cannot be read. */
export type BackupRecord = { id: string; manifest: Manifest; error?: undefined } | { id: string; manifest?: undefined; error: BdsnapError };

/** An index object, the packs it lists and the pieces verify removed from them. */
interface IndexFile {
  name: string;
  packs: WrittenPack[];
  dropped: Map<string, DroppedPiece>;
}

/** What the index objects say together: where each stored piece is, and what verify removed. */
interface IndexState {
  placed: Map<string, PieceLocation>;
  dropped: Map<string, DroppedPiece>;
}

export class Repository {
  readonly store: ObjectStore;
  readonly config: RepoConfig;
  /** The key object this repository was opened with (encrypted repositories). */
  readonly keyId: string | undefined;
  readonly #key: MasterKey | undefined;
  #index: Promise<IndexState> | undefined;

  private constructor(store: ObjectStore, config: RepoConfig, key?: MasterKey, keyId?: string) {
    this.store = store;
    this.config = config;
    this.#key = key;
    this.keyId = keyId;
  }

  get pieceSizeBytes(): number {
    return this.config.pieceSizeBytes;
  }

  /** A version-1 repository: one plain object per piece, read only. */
  get legacy(): boolean {
    return this.config.version === LEGACY_REPO_VERSION;
  }

  get encrypted(): boolean {
    return this.#key !== undefined;
  }

  /** What piece workers need to name, seal and open this repository's pieces. */
  get pieceCrypto(): PieceCrypto {
    return pieceCryptoOf(this.#key);
  }

  get packSizeBytes(): number {
    return this.config.version === REPO_VERSION ? this.config.packSizeBytes : DEFAULT_PACK_BYTES;
  }

  /** The most bytes a stored piece can take; a larger one is refused before it is read. */
  get maxStoredPieceBytes(): number {
    return this.pieceSizeBytes + STORED_SLACK_BYTES + (this.encrypted ? SEAL_OVERHEAD_BYTES : 0);
  }

  /**
   * Make a new repository in an empty store: encrypted unless `encryption` is false. EINVAL if
   * the store already holds anything, or no password is given for an encrypted one.
   */
  static async init(store: ObjectStore, options: InitOptions = {}): Promise<Repository> {
    const pieceSizeBytes = options.pieceSizeBytes ?? DEFAULT_PIECE_BYTES;
    if ((pieceSizeBytes & (pieceSizeBytes - 1)) !== 0 || pieceSizeBytes < MIN_PIECE_BYTES || pieceSizeBytes > MAX_PIECE_BYTES) {
      throw new BdsnapError('EINVAL', `piece size must be a power of two from ${MIN_PIECE_BYTES} to ${MAX_PIECE_BYTES} bytes, got ${pieceSizeBytes}`);
    }
    const packSizeBytes = options.packSizeBytes ?? DEFAULT_PACK_BYTES;
    if (!(packSizeBytes >= MIN_PACK_BYTES && packSizeBytes <= MAX_PACK_BYTES)) {
      throw new BdsnapError('EINVAL', `pack size must be from ${MIN_PACK_BYTES} to ${MAX_PACK_BYTES} bytes, got ${packSizeBytes}`);
    }
    const encryption = options.encryption ?? true;
    if (encryption && !options.password) throw new BdsnapError('EINVAL', 'an encrypted repository needs a password');
    if (await store.stat(CONFIG_OBJECT)) throw new BdsnapError('EINVAL', `${store.location} is already a backup repository`);
    if ((await store.list('')).length > 0) throw new BdsnapError('EINVAL', `${store.location} is not empty; a repository needs an empty place`);
    const config: RepoConfig = {
      format: REPO_FORMAT, version: REPO_VERSION, id: randomBytes(8).toString('hex'), createdAt: new Date().toISOString(), pieceSizeBytes,
      hash: encryption ? 'hmac-sha256' : 'sha256', encryption: encryption ? 'aes-256-gcm' : 'none', packSizeBytes, codec: options.codec ?? 'zstd',
    };
    let key: MasterKey | undefined;
    let keyId: string | undefined;
    if (encryption) {
      key = newMasterKey();
      keyId = randomObjectName();
      // The key first: a config is what makes the place a repository.
      await store.put(keyObject(keyId), Buffer.from(`${JSON.stringify(await wrapMasterKey(key, options.password!, os.hostname(), options.scrypt), null, 2)}\n`));
    }
    const repo = new Repository(store, config, key, keyId);
    await store.put(CONFIG_OBJECT, repo.#seal(CONFIG_OBJECT, Buffer.from(`${JSON.stringify(config, null, 2)}\n`)));
    return repo;
  }

  /**
   * Open an existing repository: ENOENT if there is none, ECORRUPT if its config does not
   * parse or authenticate, EAUTH if it is encrypted and no key accepts the password (nothing
   * is written either way).
   */
  static async open(store: ObjectStore, options: OpenOptions = {}): Promise<Repository> {
    // Asked for together: on S3 each is a round trip before the key derivation can start. A
    // missing or unreadable config is what is said first.
    const listing = store.names(KEYS_PREFIX);
    listing.catch(() => undefined);
    const raw = await Repository.#readConfig(store);
    const keyNames = (await listing).filter((n) => keyIdOf(n) !== undefined);
    const json = plainJson(raw);
    if (json !== undefined) {
      const probe = json as { format?: unknown; version?: unknown; encryption?: unknown };
      if (probe.format === REPO_FORMAT && typeof probe.version === 'number' && probe.version > REPO_VERSION) {
        throw new BdsnapError('ENOTSUP', `${store.location} is a version ${probe.version} repository; this bdsnap reads versions ${LEGACY_REPO_VERSION} and ${REPO_VERSION}`);
      }
      const parsed = probe.version === LEGACY_REPO_VERSION ? legacyConfigSchema.safeParse(json) : configSchema.safeParse(json);
      if (!parsed.success) throw new BdsnapError('ECORRUPT', `the config of ${store.location} is not a bdsnap repository config: ${firstIssue(parsed.error)}`);
      // A plain config beside keys is an encrypted repository whose config was replaced.
      if (keyNames.length > 0 || (parsed.data.version === REPO_VERSION && parsed.data.encryption !== 'none')) {
        throw new BdsnapError('ECORRUPT', `the config of ${store.location} is plain but the repository has keys: it was altered; refusing to use it`);
      }
      return new Repository(store, parsed.data);
    }
    if (keyNames.length === 0) throw new BdsnapError('ECORRUPT', `${store.location} has an encrypted config but no key objects (keys/): it is damaged`);
    const password = options.password ? await options.password() : undefined;
    if (password === undefined || password === '') {
      throw new BdsnapError('EAUTH', `${store.location} is encrypted: give its password in BDSNAP_REPO_PASSWORD, with --password-file FILE, or at the prompt`);
    }
    const unreadable: string[] = [];
    for (const name of keyNames.slice(0, MAX_KEYS_TRIED)) {
      const key = await Repository.#readKey(store, name).catch((err: unknown) => {
        unreadable.push((err as Error).message);
        return undefined;
      });
      const master = key && await unwrapMasterKey(key, password);
      if (!master) continue;
      const plain = open(master.encryptionKey, objectAad(CONFIG_OBJECT), raw, `the config of ${store.location}`);
      const notConfig = (problem: string): string => `the config of ${store.location} is not a bdsnap repository config: ${problem}`;
      const config = parseJson(plain, configSchema, notConfig);
      if (config.encryption !== 'aes-256-gcm') throw new BdsnapError('ECORRUPT', notConfig(`it says encryption ${config.encryption}`));
      return new Repository(store, config, master, keyIdOf(name));
    }
    if (unreadable.length > 0) {
      // A damaged key object is not a wrong password: say which cannot be read.
      throw new BdsnapError('EAUTH', `no key of ${store.location} accepts the password, and ${unreadable.length} of its ${keyNames.length} key object(s) cannot be read (${unreadable.join('; ')}): the password may be right and its key damaged; another key's password opens it`);
    }
    throw new BdsnapError('EAUTH', `wrong password: no key of ${store.location} accepts it`);
  }

  /**
   * Whether opening the repository will ask for a password (its config is sealed), without
   * deriving any key: for a command that leaves the password's check to another process.
   */
  static async needsPassword(store: ObjectStore): Promise<boolean> {
    return plainJson(await Repository.#readConfig(store)) === undefined;
  }

  static async #readConfig(store: ObjectStore): Promise<Buffer> {
    try {
      return await store.get(CONFIG_OBJECT, { maxBytes: MAX_CONFIG_BYTES });
    } catch (err) {
      if (toBdsnapError(err).code === 'ENOENT') {
        throw new BdsnapError('ENOENT', `${store.location} is not a backup repository (no config); create one with 'bdsnap backup init'`, { cause: err });
      }
      throw err;
    }
  }

  static async #readKey(store: ObjectStore, name: string): Promise<KeyObject> {
    return parseJson(await store.get(name, { maxBytes: MAX_KEY_BYTES }), keyObjectSchema, (problem) => `key object ${name} is damaged (${problem})`);
  }

  /** The object as stored: sealed and bound to its name in an encrypted repository. */
  #seal(name: string, plain: Buffer): Buffer {
    return this.#key ? Buffer.concat(seal(this.#key.encryptionKey, objectAad(name), [plain])) : plain;
  }

  /** An object's contents, authenticated (ECORRUPT if it fails) in an encrypted repository. */
  #open(name: string, stored: Buffer, what: string): Buffer {
    return this.#key ? open(this.#key.encryptionKey, objectAad(name), stored, what) : stored;
  }

  /** Ids of every backup, oldest first (ids sort by time). */
  async backupIds(): Promise<string[]> {
    const ids = (await this.store.list(BACKUPS_PREFIX)).map((o) => backupIdOf(o.name)).filter((id): id is string => id !== undefined);
    return ids.sort();
  }

  /** The manifest of `id`: ENOENT if there is no such backup, ECORRUPT if it does not parse or authenticate. */
  async manifest(id: string): Promise<Manifest> {
    const name = manifestObject(id);
    let raw: Buffer;
    try {
      raw = this.#open(name, await this.store.get(name), `the manifest of backup ${id}`);
    } catch (err) {
      if (toBdsnapError(err).code === 'ENOENT') throw new BdsnapError('ENOENT', `there is no backup ${id} in ${this.store.location}`, { cause: err });
      throw err;
    }
    if (countByte(raw, COMMA) > MAX_MANIFEST_COMMAS) {
      throw new BdsnapError('ECORRUPT', `the manifest of backup ${id} is damaged (more than ${MAX_MANIFEST_COMMAS} values)`);
    }
    const manifest = parseJson(raw, manifestSchema, (problem) => `the manifest of backup ${id} is damaged (${problem})`);
    if (manifest.id !== id) throw new BdsnapError('ECORRUPT', `the manifest of backup ${id} is damaged (it is the manifest of ${manifest.id})`);
    if (manifest.pieceSizeBytes !== this.pieceSizeBytes) throw new BdsnapError('ECORRUPT', `the manifest of backup ${id} has another piece size than the repository`);
    for (const d of manifest.devices) expandSlots(d, manifest.pieceSizeBytes);
    return manifest;
  }

  /** Write a manifest: the commit of its backup. Every piece it names must be indexed already. */
  async putManifest(manifest: Manifest): Promise<void> {
    this.#writable();
    const name = manifestObject(manifest.id);
    await this.store.put(name, this.#seal(name, Buffer.from(`${JSON.stringify(manifest)}\n`)));
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

  /** ENOTSUP for a version-1 repository, which is never written in its own format again. */
  #writable(): void {
    if (this.legacy) {
      throw new BdsnapError('ENOTSUP', `${this.store.location} is a version-1 repository (unencrypted, a piece per object): bdsnap reads it but adds nothing to it; make a new repository and 'bdsnap backup copy --from ${this.store.location} --repo NEW'`);
    }
  }

  /** A writer of new packs for this repository (see pack.ts). */
  packWriter(): PackWriter {
    this.#writable();
    return new PackWriter(this.store, this.packSizeBytes);
  }

  /** Every index object with its packs, each authenticated and checked. */
  async #indexFiles(): Promise<IndexFile[]> {
    const names = (await this.store.names(INDEX_PREFIX)).filter(isIndexObject);
    const out: IndexFile[] = [];
    await runLimited(names, 8, async (name) => {
      const plain = this.#open(name, await this.store.get(name, { maxBytes: MAX_INDEX_BYTES }), `index ${name}`);
      out.push({ name, ...decodeIndex(plain, `index ${name}`, isPackObject, this.maxStoredPieceBytes) });
    });
    return out.sort((a, b) => a.name.localeCompare(b.name));
  }

  /** Where every stored piece is. Cached until this object writes or drops index entries. */
  async pieceIndex(): Promise<Map<string, PieceLocation>> {
    return (await this.#indexState()).placed;
  }

  /**
   * The pieces verify removed from the index (dropPieces) and no index places since, with the
   * pack each was in and what was wrong with it: a backup that names one is told about in the
   * words verify used. Empty for a version-1 repository, whose pieces leave no trace.
   */
  async droppedPieces(): Promise<Map<string, DroppedPiece>> {
    return (await this.#indexState()).dropped;
  }

  #indexState(): Promise<IndexState> {
    this.#index ??= this.#loadIndex();
    this.#index.catch(() => {
      this.#index = undefined;
    });
    return this.#index;
  }

  /**
   * Where every stored piece is now, read again from the store: for a long-lived reader (an
   * instant restore) to find pieces stored, or dropped, by other processes since it last read.
   */
  reloadPieceIndex(): Promise<Map<string, PieceLocation>> {
    this.#index = undefined;
    return this.pieceIndex();
  }

  async #loadIndex(): Promise<IndexState> {
    const placed = new Map<string, PieceLocation>();
    const dropped = new Map<string, DroppedPiece>();
    if (this.legacy) {
      for (const name of await this.store.names(PIECES_PREFIX)) {
        const hash = pieceHashOf(name);
        if (hash !== undefined) placed.set(hash, { object: name, offsetBytes: 0, lengthBytes: null });
      }
      return { placed, dropped };
    }
    for (const f of await this.#indexFiles()) {
      for (const p of f.packs) for (const e of p.pieces) if (!placed.has(e.id)) placed.set(e.id, { object: p.object, offsetBytes: e.offsetBytes, lengthBytes: e.lengthBytes });
      for (const [id, d] of f.dropped) if (!dropped.has(id)) dropped.set(id, d);
    }
    // A piece stored again since verify removed it is whole: only its new place counts.
    for (const id of placed.keys()) dropped.delete(id);
    return { placed, dropped };
  }

  /**
   * Record where the pieces of `packs` are; only once the packs are durable (the store's
   * commit). `dropped` (dropPieces) goes into the first object written, or one of its own.
   */
  async writeIndex(packs: readonly WrittenPack[], dropped: ReadonlyMap<string, DroppedPiece> = new Map()): Promise<void> {
    this.#writable();
    for (let at = 0; at < packs.length || (at === 0 && dropped.size > 0); at += PACKS_PER_INDEX) {
      const name = indexObject(randomObjectName());
      await this.store.put(name, this.#seal(name, encodeIndex(packs.slice(at, at + PACKS_PER_INDEX), at === 0 ? dropped : undefined)));
    }
    this.#index = undefined;
  }

  /** Make the staged packs durable (the store's commit), then index them. */
  async commitPacks(packs: readonly WrittenPack[]): Promise<void> {
    await this.store.commit();
    if (packs.length > 0) await this.writeIndex(packs);
  }

  /**
   * The stored bytes of a piece: ENOENT if it is not stored or its object is gone; ECORRUPT,
   * before reading, if larger than a piece can be, and if its pack ends before it does.
   */
  async readStoredPiece(id: string, location?: PieceLocation): Promise<Buffer> {
    const at = location ?? (await this.pieceIndex()).get(id);
    if (!at) throw new BdsnapError('ENOENT', `piece ${id} is missing from ${this.store.location}`);
    if (at.lengthBytes === null) return this.store.get(at.object, { maxBytes: this.maxStoredPieceBytes });
    if (at.lengthBytes > this.maxStoredPieceBytes) throw new BdsnapError('ECORRUPT', `the index gives piece ${id} more bytes than a piece can take`);
    try {
      return await this.store.get(at.object, { offsetBytes: at.offsetBytes, lengthBytes: at.lengthBytes });
    } catch (err) {
      // A range past the end (EINVAL) is a pack cut short: the piece is damaged, as a restore's worker says.
      if (toBdsnapError(err).code === 'EINVAL') throw new BdsnapError('ECORRUPT', `piece ${id} is damaged: its pack ends before the piece does`, { cause: err });
      throw err;
    }
  }

  /** A piece's raw bytes, read, opened and checked on this thread (for small jobs: copy, repack). */
  async readPiece(id: string, location?: PieceLocation): Promise<Buffer> {
    return decodeStored(this.pieceCrypto, await this.readStoredPiece(id, location), id, this.pieceSizeBytes);
  }

  /** Ids of the stored pieces, with their stored sizes. */
  async storedPieces(): Promise<Map<string, number>> {
    const out = new Map<string, number>();
    if (this.legacy) {
      for (const o of await this.store.list(PIECES_PREFIX)) {
        const hash = pieceHashOf(o.name);
        if (hash !== undefined) out.set(hash, o.sizeBytes);
      }
      return out;
    }
    for (const [id, at] of await this.pieceIndex()) out.set(id, at.lengthBytes ?? 0);
    return out;
  }

  /** Ids of the stored pieces. */
  async storedPieceNames(): Promise<Set<string>> {
    return new Set((await this.pieceIndex()).keys());
  }

  /**
   * Make pieces unknown (damaged ones, or ones whose pack is gone, found by verify), so that
   * the next backup that meets their content stores it again: a v1 piece object is deleted; in
   * packs, each index object that lists one is replaced by one without it (the new one written
   * before the old is deleted), which records the piece as dropped, with its pack and problem
   * (droppedPieces). Runs under a `create` lock, so prune does not rewrite the index meanwhile.
   */
  async dropPieces(pieces: ReadonlyMap<string, PieceProblem>): Promise<void> {
    if (pieces.size === 0) return;
    if (this.legacy) {
      for (const id of pieces.keys()) await this.store.delete(pieceObject(id));
      this.#index = undefined;
      return;
    }
    const lock = await RepoLock.acquire(this.store, 'create');
    try {
      for (const f of await this.#indexFiles()) {
        if (!f.packs.some((p) => p.pieces.some((e) => pieces.has(e.id)))) continue;
        const kept = f.packs.map((p) => ({ object: p.object, pieces: p.pieces.filter((e) => !pieces.has(e.id)) })).filter((p) => p.pieces.length > 0);
        const dropped = new Map(f.dropped);
        for (const p of f.packs) {
          for (const e of p.pieces) {
            const problem = pieces.get(e.id);
            if (problem) dropped.set(e.id, { pack: p.object, problem });
          }
        }
        await this.writeIndex(kept, dropped);
        await this.store.delete(f.name);
      }
    } finally {
      this.#index = undefined;
      await lock.release();
    }
  }

  /** Remove the manifests of `ids` (all must exist; checked first). Their pieces stay until prune. */
  async forget(ids: string[]): Promise<void> {
    for (const id of ids) {
      if (!(await this.store.stat(manifestObject(id)))) throw new BdsnapError('ENOENT', `there is no backup ${id} in ${this.store.location}`);
    }
    // An instant restore still copying from a backup needs its manifest (and, through it, its
    // pieces) until it is complete: forgotten, the restore could never finish.
    for (const l of await listLocks(this.store, { kind: 'create' })) {
      if (l.state === 'live' && l.purpose === 'instant-restore' && l.backup !== undefined && ids.includes(l.backup)) {
        throw new BdsnapError('EBUSY', `backup ${l.backup} is being restored by an instant restore (${l.name}, pid ${l.pid} on ${l.host}) that has not copied all of it yet; forget it once that restore is complete ('bdsnap status' on ${l.host} shows its progress)`);
      }
    }
    for (const id of ids) await this.store.delete(manifestObject(id));
  }

  /**
   * Delete what no manifest names: packs no backup uses, and (see REPACK_BELOW_USED) packs
   * mostly unused, whose used pieces are first copied, checked, into new packs; dead and stale
   * locks; what interrupted puts left. Refuses (EBUSY) while a create runs, and (ECORRUPT)
   * while a manifest cannot be read, or a backup names a piece no index places in a pack that
   * is there: its pieces cannot be told apart from garbage.
   *
   * Order: new packs, durable; a new index of everything kept; then the old index objects go,
   * and only then the old packs. A crash anywhere leaves every backup whole (at worst with
   * two index entries for a piece, both valid, or packs no index names, deleted next time).
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
      const summary = this.legacy ? await this.#pruneLegacy(referenced, lock) : await this.#prunePacks(records, referenced, lock);
      const deletedIncomplete = await this.store.removeIncomplete(startedMs);
      return { backups: records.length, referencedPieces: referenced.size, ...summary, deletedLocks, deletedIncomplete };
    } finally {
      this.#index = undefined;
      await lock.release();
    }
  }

  async #pruneLegacy(referenced: ReadonlySet<string>, lock: RepoLock): Promise<PrunedObjects> {
    let deletedPieces = 0;
    let deletedBytes = 0;
    const unused = [...(await this.storedPieces())].filter(([hash]) => !referenced.has(hash));
    await lock.assertHeld('this prune', PRUNE_STALLED);
    await runLimited(unused, 16, async ([hash, size]) => {
      lock.assertFresh('this prune', PRUNE_STALLED);
      await this.store.delete(pieceObject(hash));
      deletedPieces++;
      deletedBytes += size;
    });
    return { deletedPieces, deletedBytes, deletedPacks: 0, unindexedPacks: 0, repackedPacks: 0, repackedPieces: 0 };
  }

  async #prunePacks(records: readonly BackupRecord[], referenced: ReadonlySet<string>, lock: RepoLock): Promise<PrunedObjects> {
    const files = await this.#indexFiles();
    const packSizes = new Map<string, number>();
    for (const o of await this.store.list(PACKS_PREFIX)) if (isPackObject(o.name)) packSizes.set(o.name, o.sizeBytes);
    // The entry each used piece keeps (the first, as readers take it), grouped by pack.
    const live = new Map<string, PieceLocation & { id: string }>();
    const named = new Set<string>();
    let indexed = 0;
    for (const f of files) {
      for (const p of f.packs) {
        named.add(p.object);
        for (const e of p.pieces) {
          indexed++;
          if (referenced.has(e.id) && !live.has(e.id) && packSizes.has(p.object)) live.set(e.id, { id: e.id, object: p.object, offsetBytes: e.offsetBytes, lengthBytes: e.lengthBytes });
        }
      }
    }
    // A pack is judged unused by the index alone (packs have no header). A piece a backup names
    // that no index places in a listed pack (an index object lost, a listing cut short) may be
    // in any pack judged so: nothing is written or deleted until every such piece has a place.
    const unplaced = new Set([...referenced].filter((id) => !live.has(id)));
    if (unplaced.size > 0) throw unplacedPieces(records, unplaced, this.store.location);
    const usedBytes = new Map<string, number>();
    const byPack = new Map<string, Array<PieceLocation & { id: string }>>();
    for (const e of live.values()) {
      usedBytes.set(e.object, (usedBytes.get(e.object) ?? 0) + e.lengthBytes!);
      const list = byPack.get(e.object) ?? [];
      list.push(e);
      byPack.set(e.object, list);
    }
    const kept: WrittenPack[] = [];
    const gone: string[] = [];
    const repack: WrittenPack[] = [];
    for (const [object, sizeBytes] of packSizes) {
      const used = usedBytes.get(object) ?? 0;
      const pieces = (byPack.get(object) ?? []).map((e) => ({ id: e.id, offsetBytes: e.offsetBytes, lengthBytes: e.lengthBytes! }));
      if (used > 0 && used >= sizeBytes * REPACK_BELOW_USED) {
        kept.push({ object, pieces });
        continue;
      }
      gone.push(object);
      if (used > 0) repack.push({ object, pieces });
    }
    const writer = this.packWriter();
    let written: WrittenPack[];
    try {
      written = await this.#repack(writer, repack);
    } catch (err) {
      // The new packs no index names go (some may be published already): a full store gets its room back.
      await this.store.discard();
      await runLimited(writer.packs, 16, (p) => this.store.delete(p.object)).catch(() => undefined);
      if (toBdsnapError(err).code !== 'ENOSPC') throw err;
      // Nothing is deleted before the repacked pieces are durable and indexed (see prune).
      const needBytes = repack.reduce((n, p) => n + (usedBytes.get(p.object) ?? 0), 0);
      const freedBytes = gone.reduce((n, o) => n + (packSizes.get(o) ?? 0), 0) - needBytes;
      throw new BdsnapError('ENOSPC', `cannot prune: the repository at ${this.store.location} is full: prune first writes the ${formatBytes(needBytes)} still used of ${repack.length} mostly unused packs into new ones, and only then deletes ${gone.length} packs (${formatBytes(freedBytes)} freed); nothing was deleted; make room for ${formatBytes(needBytes)} there and run prune again`, { cause: err });
    }
    const repackedPacks = repack.length;
    const repackedPieces = written.reduce((n, p) => n + p.pieces.length, 0);
    // What verify dropped is not carried over: a kept backup that named such a piece would have
    // stopped the prune above (unplaced), so no one will ask about it.
    await this.writeIndex([...kept, ...written]);
    await lock.assertHeld('this prune', PRUNE_STALLED);
    for (const f of files) await this.store.delete(f.name);
    let deletedBytes = 0;
    await runLimited(gone, 16, async (object) => {
      lock.assertFresh('this prune', PRUNE_STALLED);
      await this.store.delete(object);
      deletedBytes += packSizes.get(object) ?? 0;
    });
    for (const p of written) for (const e of p.pieces) deletedBytes -= e.lengthBytes;
    return {
      deletedPieces: indexed - live.size, deletedBytes: Math.max(0, deletedBytes), deletedPacks: gone.length,
      unindexedPacks: gone.filter((o) => !named.has(o)).length, repackedPacks, repackedPieces,
    };
  }

  /** Copy the pieces of `packs`, each checked, into new packs of `writer`, made durable; returns the new packs. */
  async #repack(writer: PackWriter, packs: readonly WrittenPack[]): Promise<WrittenPack[]> {
    for (const { object, pieces } of packs) {
      for (const e of [...pieces].sort((a, b) => a.offsetBytes - b.offsetBytes)) {
        const stored = await this.readStoredPiece(e.id, { object, offsetBytes: e.offsetBytes, lengthBytes: e.lengthBytes });
        try {
          decodeStored(this.pieceCrypto, stored, e.id, this.pieceSizeBytes);
        } catch (err) {
          throw new BdsnapError('ECORRUPT', `cannot prune: ${(err as Error).message}; run 'bdsnap backup verify --repo ${this.store.location}' first`, { cause: err });
        }
        // A sealed piece is bound to its id, not to its place: its bytes move as they are.
        await writer.add(e.id, [stored]);
      }
    }
    const written = await writer.finish();
    await this.store.commit();
    return written;
  }

  /** The key objects of an encrypted repository. */
  async keys(): Promise<KeyInfo[]> {
    const out: KeyInfo[] = [];
    for (const name of (await this.store.names(KEYS_PREFIX)).sort()) {
      const id = keyIdOf(name);
      if (id === undefined) continue;
      const key = await Repository.#readKey(this.store, name).catch(() => undefined);
      out.push({ id, createdAt: key?.createdAt ?? '(damaged)', host: key?.host ?? '', current: id === this.keyId });
    }
    return out;
  }

  /** Add a key object for `password`; returns its id. */
  async addKey(password: string, scrypt?: ScryptParams): Promise<string> {
    if (!this.#key) throw new BdsnapError('EINVAL', `${this.store.location} is not encrypted: it has no keys`);
    if (password === '') throw new BdsnapError('EINVAL', 'the new password is empty');
    const id = randomObjectName();
    await this.store.put(keyObject(id), Buffer.from(`${JSON.stringify(await wrapMasterKey(this.#key, password, os.hostname(), scrypt), null, 2)}\n`));
    return id;
  }

  /**
   * Remove a key object (a unique prefix of its id will do). Refused for the key this
   * repository was opened with (open it with another password to remove that one), and so
   * for the last key, which would lock everyone out for good.
   */
  async removeKey(idOrPrefix: string): Promise<string> {
    const keys = await this.keys();
    const matches = keys.filter((k) => k.id.startsWith(idOrPrefix));
    if (idOrPrefix.length < 4 || matches.length !== 1) {
      throw new BdsnapError('ENOENT', `${matches.length > 1 ? 'more than one key' : 'no key'} of ${this.store.location} matches "${idOrPrefix}" (give at least 4 characters of an id from 'bdsnap backup key list')`);
    }
    const key = matches[0]!;
    if (key.current) throw new BdsnapError('EBUSY', `key ${key.id.slice(0, 8)} is the one this password opens; to remove it, open the repository with another key's password`);
    await this.store.delete(keyObject(key.id));
    return key.id;
  }
}

/** Open the repository in a local directory. */
export function openLocalRepository(dir: string, options: OpenOptions = {}): Promise<Repository> {
  return Repository.open(new LocalDirStore(dir), options);
}
