/**
 * The repository format: object names and the schemas of the objects that are JSON. Pure, no I/O.
 *
 * Version 2 (every new repository):
 * - `config`                   what the repository is (format, version, piece size, id scheme,
 *                              encryption, pack size); sealed (crypto.ts) unless unencrypted.
 * - `keys/<random hex>`        one per password: the master key wrapped by scrypt (crypto.ts);
 *                              absent in an unencrypted repository.
 * - `packs/<hh>/<random hex>`  pieces (codec.ts), each sealed on its own and bound to its id,
 *                              one after the other (see pack.ts); read by byte range.
 * - `index/<random hex>`       where each piece is: pack, offset, length (sealed JSON). Written
 *                              after its packs are durable and before any manifest names them.
 *                              Verify replaces one that places a bad piece by one that lists it
 *                              as dropped, with its pack and problem (pack.ts).
 * - `backups/<id>.json`        one manifest per backup (sealed), written last: it is the commit.
 * - `locks/<id>.<kind>`        see lock.ts (plain: other hosts judge them before any password).
 * A piece's id is the HMAC-SHA256 of its raw bytes under the id key (encrypted), or their
 * sha256 (`--no-encryption`).
 *
 * Version 1 (read, verified, restored, forgotten and pruned; never written to any more):
 * unencrypted, `config` and manifests plain JSON, and a piece per object at
 * `pieces/<hh>/<sha256 hex>`.
 *
 * A manifest describes every device of the backup in full: for each piece-sized slot of the
 * device (the last may be shorter), the id of its content, or a run of all-zero slots.
 */

import { randomBytes } from 'node:crypto';
import { z } from 'zod';
import { BdsnapError } from '../errors.js';
import { CODEC_CHOICES } from './codec.js';

export const REPO_FORMAT = 'bdsnap-backup-repository';
export const REPO_VERSION = 2;
/** The version of repositories that kept one piece per object, unencrypted. */
export const LEGACY_REPO_VERSION = 1;
export const MANIFEST_FORMAT = 'bdsnap-backup';
export const MANIFEST_VERSION = 1;

export const CONFIG_OBJECT = 'config';
export const PIECES_PREFIX = 'pieces/';
export const BACKUPS_PREFIX = 'backups/';
export const LOCKS_PREFIX = 'locks/';
export const PACKS_PREFIX = 'packs/';
export const INDEX_PREFIX = 'index/';
export const KEYS_PREFIX = 'keys/';

/**
 * Packs are closed at 16 MiB (restic's size): a few hundred puts per GiB instead of thousands
 * (object stores charge and throttle by request), while one lost upload or one repack moves
 * little. On a local disk a pack is one file, synced once.
 */
export const DEFAULT_PACK_BYTES = 16 * 1024 * 1024;
export const MIN_PACK_BYTES = 1024 * 1024;
export const MAX_PACK_BYTES = 128 * 1024 * 1024;

export const MIN_PIECE_BYTES = 64 * 1024;
export const MAX_PIECE_BYTES = 16 * 1024 * 1024;
/**
 * 256 KiB. A piece is the unit an incremental re-reads and re-compresses around a changed
 * extent: with 1% of a 1 GiB image changed in 64 KiB runs, 1 MiB pieces read 163 MiB and
 * 256 KiB pieces 49 MiB (BENCHMARKS.md). Smaller pieces cost more puts (each a temp file,
 * fdatasync, rename and directory fsync: measured ~390 MB/s at 256 KiB against ~700 MB/s at
 * 1 MiB with enough puts in flight), which a full backup of this machine's mixed image did not
 * show next to compression.
 */
export const DEFAULT_PIECE_BYTES = 256 * 1024;

const HASH_HEX = /^[0-9a-f]{64}$/;
const BACKUP_ID = /^\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{8}$/;
/** A host name as backups record it: letters, digits, '.', '_' and '-', at most 253. */
export const HOST_NAME = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,252}$/;

export const legacyConfigSchema = z.object({
  format: z.literal(REPO_FORMAT),
  version: z.literal(LEGACY_REPO_VERSION),
  id: z.string().min(1),
  createdAt: z.string(),
  pieceSizeBytes: z.number().int().min(MIN_PIECE_BYTES).max(MAX_PIECE_BYTES),
  hash: z.literal('sha256'),
  /** Codec of new pieces (each piece records its own): see codecFor in codec.ts. */
  codec: z.enum(CODEC_CHOICES),
});
export type LegacyRepoConfig = z.infer<typeof legacyConfigSchema>;

export const configSchema = z.object({
  format: z.literal(REPO_FORMAT),
  version: z.literal(REPO_VERSION),
  id: z.string().min(1),
  createdAt: z.string(),
  pieceSizeBytes: z.number().int().min(MIN_PIECE_BYTES).max(MAX_PIECE_BYTES),
  /** How piece ids are made: keyed (encrypted repositories) or plain sha256 (`--no-encryption`). */
  hash: z.enum(['hmac-sha256', 'sha256']),
  encryption: z.enum(['aes-256-gcm', 'none']),
  packSizeBytes: z.number().int().min(MIN_PACK_BYTES).max(MAX_PACK_BYTES),
  codec: z.enum(CODEC_CHOICES),
});
export type RepoConfig = z.infer<typeof configSchema> | LegacyRepoConfig;

/** A slot: a piece hash, or a number n >= 1 for n all-zero slots in a row. */
const slotSchema = z.union([z.string().regex(HASH_HEX), z.number().int().positive()]);

export const deviceEntrySchema = z.object({
  device: z.string().min(1),
  sizeBytes: z.number().int().nonnegative(),
  kind: z.enum(['full', 'incremental']),
  base: z.string().nullable(),
  why: z.string(),
  pieces: z.array(slotSchema),
  /** Bytes read from the source, pieces written and their stored bytes (for reports). */
  readBytes: z.number().int().nonnegative(),
  newPieces: z.number().int().nonnegative(),
  newStoredBytes: z.number().int().nonnegative(),
  meta: z.record(z.string(), z.unknown()),
});
export type DeviceEntry = z.infer<typeof deviceEntrySchema>;

export const manifestSchema = z.object({
  format: z.literal(MANIFEST_FORMAT),
  version: z.literal(MANIFEST_VERSION),
  id: z.string().regex(BACKUP_ID),
  startTime: z.string(),
  endTime: z.string(),
  pieceSizeBytes: z.number().int().min(MIN_PIECE_BYTES).max(MAX_PIECE_BYTES),
  tags: z.array(z.string()),
  /** The host that made the backup (many hosts share a repository); absent in backups made before hosts were recorded. */
  host: z.string().regex(HOST_NAME).optional(),
  devices: z.array(deviceEntrySchema).min(1),
});
export type Manifest = z.infer<typeof manifestSchema>;

export function isBackupId(id: string): boolean {
  return BACKUP_ID.test(id);
}

/** A new backup id: UTC time to the millisecond and 32 random bits, so ids sort by time. */
export function newBackupId(now = new Date()): string {
  const t = now.toISOString().replace(/[-:]/g, '');
  return `${t}-${randomBytes(4).toString('hex')}`;
}

export function pieceObject(hash: string): string {
  return `${PIECES_PREFIX}${hash.slice(0, 2)}/${hash}`;
}

/** The hash of a piece object's name, or undefined for anything else under pieces/. */
export function pieceHashOf(name: string): string | undefined {
  const hash = name.slice(name.lastIndexOf('/') + 1);
  return HASH_HEX.test(hash) && name === pieceObject(hash) ? hash : undefined;
}

const RANDOM_NAME = /^[0-9a-f]{64}$/;

export function randomObjectName(): string {
  return randomBytes(32).toString('hex');
}

export function packObject(name: string): string {
  return `${PACKS_PREFIX}${name.slice(0, 2)}/${name}`;
}

export function isPackObject(name: string): boolean {
  const base = name.slice(name.lastIndexOf('/') + 1);
  return RANDOM_NAME.test(base) && name === packObject(base);
}

export function indexObject(name: string): string {
  return `${INDEX_PREFIX}${name}`;
}

export function isIndexObject(name: string): boolean {
  return name.startsWith(INDEX_PREFIX) && RANDOM_NAME.test(name.slice(INDEX_PREFIX.length));
}

export function keyObject(name: string): string {
  return `${KEYS_PREFIX}${name}`;
}

/** The key object's id (its name under keys/), or undefined. */
export function keyIdOf(name: string): string | undefined {
  const id = name.slice(KEYS_PREFIX.length);
  return name.startsWith(KEYS_PREFIX) && RANDOM_NAME.test(id) ? id : undefined;
}

export function manifestObject(id: string): string {
  if (!isBackupId(id)) throw new BdsnapError('EINVAL', `"${id}" is not a backup id (like 20260102T030405.678Z-0a1b2c3d)`);
  return `${BACKUPS_PREFIX}${id}.json`;
}

export function backupIdOf(name: string): string | undefined {
  const m = /^backups\/(.+)\.json$/.exec(name);
  return m && isBackupId(m[1]!) ? m[1] : undefined;
}

/**
 * Pieces a device may have at most: 16 TiB at the default piece size, 1 PiB at the largest.
 * Every reader and writer holds one entry per piece in memory (an array of 2^26 takes 512 MiB),
 * so a manifest that claims more is refused before anything is allocated for it.
 */
export const MAX_SLOTS = 2 ** 26;

/** How many pieces a device of `sizeBytes` has; EINVAL (or `code`) beyond MAX_SLOTS. */
export function slotCountOf(device: string, sizeBytes: number, pieceSizeBytes: number, code: 'EINVAL' | 'ECORRUPT' = 'EINVAL'): number {
  const count = Math.ceil(sizeBytes / pieceSizeBytes);
  if (!(count <= MAX_SLOTS)) {
    throw new BdsnapError(code, `${device} is ${sizeBytes} bytes: more than ${MAX_SLOTS} pieces of ${pieceSizeBytes} bytes, the most a backup holds${code === 'EINVAL' ? '; use a repository with larger pieces' : ''}`);
  }
  return count;
}

/**
 * Expand a device's slots to one entry per piece: a hash, or null for a zero piece. The slots
 * are counted first, and must match the size (itself within MAX_SLOTS pieces), so a crafted
 * run of zero pieces allocates nothing. Errors: ECORRUPT.
 */
export function expandSlots(entry: Pick<DeviceEntry, 'pieces' | 'sizeBytes' | 'device'>, pieceSizeBytes: number): Array<string | null> {
  const want = slotCountOf(`the manifest of ${entry.device}: the device`, entry.sizeBytes, pieceSizeBytes, 'ECORRUPT');
  let listed = 0;
  for (const s of entry.pieces) {
    listed += typeof s === 'string' ? 1 : s;
    if (listed > want) break;
  }
  if (listed !== want) {
    throw new BdsnapError('ECORRUPT', `the manifest of ${entry.device} lists ${listed > want ? 'more than ' : ''}${listed} pieces; its size needs ${want}`);
  }
  const out = new Array<string | null>(want);
  let at = 0;
  for (const s of entry.pieces) {
    if (typeof s === 'string') out[at++] = s;
    else out.fill(null, at, (at += s));
  }
  return out;
}

/** The inverse of expandSlots: runs of zero pieces become numbers. */
export function compactSlots(pieces: Array<string | null>): Array<string | number> {
  const out: Array<string | number> = [];
  for (const p of pieces) {
    const last = out[out.length - 1];
    if (p !== null) out.push(p);
    else if (typeof last === 'number') out[out.length - 1] = last + 1;
    else out.push(1);
  }
  return out;
}
