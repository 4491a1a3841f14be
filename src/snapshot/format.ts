/**
 * The on-disk format of a session directory, version 2. Everything here is pure (no I/O)
 * except the small atomic-write helpers at the end.
 *
 * A session directory holds:
 * - `manifest.json`  versioned metadata; rewritten atomically (temp, fsync, rename, fsync dir).
 * - `data.bin`       append-only records, each a 64-byte header and the original bytes of one or
 *                    more adjacent chunks. The header carries a magic, the first chunk index, the
 *                    payload length, a checksum of the payload and a check of the header itself,
 *                    so a torn tail is recognised and a flipped byte anywhere is detected.
 * - `index.bin`      chunk index -> byte position of its original in data.bin; rebuildable from
 *                    data.bin alone, written at session end and by recovery.
 * - `digests.bin`    written at session end: a 32-byte digest of the final content of every
 *                    touched chunk (`crc32x8`, or `sha256` in sessions written before
 *                    `digestAlgorithm` was recorded; see chunkDigest).
 * - `restore-journal.json`  present while (and after) a restore from this session runs.
 *
 * Version 2 (the manifest's `version`) adds two kinds of record to data.bin, for originals
 * kept by reflink instead of by copy (see encodeClonedRecordHeader and encodeSealRecord):
 * - a cloned record: its payload starts at a filesystem-block-aligned offset after the header
 *   (zero padding between), as FICLONERANGE needs, and its CRC-32 is not in the header, because
 *   cloning never reads the bytes. The same layout with the payload right after the header
 *   (offset RECORD_HEADER_BYTES) holds a large copied run whose checksum was left for later
 *   ('process' durability): its bytes are written before its header, like a clone;
 * - a seal record, written later (at session end, or by recovery): the CRC-32 of the payload of
 *   earlier cloned records, computed from the store's copy. A restore checks a cloned record
 *   against its seal like any other record against its header.
 * Version 1 stores (no such records) are read as before. The manifest's version is what keeps
 * a reader that only knows version 1 away from a version 2 store: it refuses the manifest,
 * where it would otherwise take a cloned record for a torn tail and cut every record after it.
 * Record headers, index and digest tables keep their own version 1.
 *
 * All integers are little-endian. 64-bit fields are written as two 32-bit halves so that plain
 * numbers (safe to 2^53) are used everywhere.
 */

import { createHash } from 'node:crypto';
import { crc32 } from 'node:zlib';
import fs from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import { BdsnapError } from '../errors.js';
import { writeFileAtomic } from '../host/atomic-file.js';
import { parseJson } from '../stored-json.js';
import { readU64LE as readU64, writeU64LE as writeU64 } from '../bytes.js';
import type { ChunkTable } from './chunk-table.js';
import { DIGEST_BYTES } from './chunk-digest.js';
import { DigestTable } from './digest-table.js';
import { deviceStampSchema } from '../host/device-stamp.js';
import { DURABILITIES, MIN_CHUNK_SIZE } from './session-settings.js';

export {
  checkChunkSize, isPowerOfTwo, DEFAULT_CHUNK_SIZE, DURABILITIES, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, type Durability,
} from './session-settings.js';

export const FORMAT_NAME = 'bdsnap-session';
/** What new sessions write in their manifest; versions 1 and 2 are read. */
export const FORMAT_VERSION = 2;
/** Version of record headers and of the index and digest tables (unchanged by format version 2). */
const RECORD_VERSION = 1;

export const MANIFEST_FILE = 'manifest.json';
export const DATA_FILE = 'data.bin';
export const INDEX_FILE = 'index.bin';
export const DIGESTS_FILE = 'digests.bin';
export const JOURNAL_FILE = 'restore-journal.json';

/** 'BDSR' */
export const RECORD_MAGIC = 0x52534442;
/** 'BDSI' */
export const INDEX_MAGIC = 0x49534442;
/** 'BDSG' */
export const DIGESTS_MAGIC = 0x47534442;
export const RECORD_HEADER_BYTES = 64;
/** Largest payload of one record; a header claiming more is corrupt, checked before allocating. */
export const MAX_RECORD_PAYLOAD_BYTES = 64 * 1024 * 1024;
export const DEFAULT_SNAPSHOT_ROOT = '/snapshot';

export type SessionState = 'active' | 'complete' | 'interrupted' | 'failed';


export const manifestSchema = z.object({
  format: z.literal(FORMAT_NAME),
  version: z.union([z.literal(1), z.literal(FORMAT_VERSION)]),
  devicePath: z.string().min(1),
  deviceSize: z.number().int().nonnegative(),
  deviceIdentity: z.record(z.string(), z.unknown()),
  chunkSize: z.number().int().min(MIN_CHUNK_SIZE),
  durability: z.enum(DURABILITIES),
  mountTime: z.string(),
  endTime: z.string().nullable(),
  state: z.enum(['active', 'complete', 'interrupted', 'failed']),
  preservedChunks: z.number().int().nonnegative(),
  preservedBytes: z.number().int().nonnegative(),
  storeBytes: z.number().int().nonnegative(),
  digestedChunks: z.number().int().nonnegative().nullable(),
  failedReason: z.string().nullable(),
  /** Absent in sessions written before it was recorded: those used sha256. */
  digestAlgorithm: z.enum(['sha256', 'crc32x8']).optional(),
  /**
   * The device's stamp (`host/device-stamp.ts`) before the session's first write and after its
   * last one (at a clean close, or when recovered after a crash). Absent in sessions written
   * before stamps were recorded.
   */
  startStamp: deviceStampSchema.optional(),
  endStamp: deviceStampSchema.optional(),
});

export type Manifest = z.infer<typeof manifestSchema>;

export function sha256(data: Buffer): Buffer {
  return createHash('sha256').update(data).digest();
}

export { DIGEST_ALGORITHM, DIGEST_BYTES, chunkDigest, type DigestAlgorithm } from './chunk-digest.js';

/** The session formats' u64 fields are little-endian. */
export { readU64, writeU64 };

/**
 * Record header layout: magic u32 @0, version u16 @4, flags u16 @6, first chunk u64 @8,
 * payload length u32 @16, payload offset u32 @20, payload checksum @24..56, header check @56..64.
 *
 * Flags 0 (the first records written): the payload checksum is its sha256 and the header check
 * the first 8 bytes of the sha256 of bytes 0..56. RECORD_FLAG_CRC32: the payload checksum is a
 * CRC-32 (u32 @24, zeroes up to 56) and the header check the CRC-32 of bytes 0..56 (u32 @56,
 * zero u32 @60). A record checksum only has to catch a torn write or flipped bits, which a
 * CRC-32 does (every burst up to 32 bits, anything else but for 2^-32), at 3x the speed of
 * sha256 on the request path.
 *
 * The same records make up a snapshot's difference storage (diff-storage.ts), whose records
 * also say which device of the snapshot a run belongs to and in what order it was written:
 * device key u32 @28 and sequence u64 @32 (zeroes in a session store); bytes 40..56 are zero.
 * RECORD_FLAG_IMAGE (with CRC32) marks a write to a snapshot's image, which supersedes earlier
 * records of its chunks; a record without it holds originals.
 *
 * The payload follows the header (payload offset 0, read as RECORD_HEADER_BYTES), except:
 * - RECORD_FLAG_CLONED (with CRC32): the payload starts `payload offset` bytes after the
 *   header's position (a filesystem-block boundary; zeroes in between) and bytes 24..56 are
 *   zero: the payload's CRC-32 is in a later seal record. The writer clones (or copies) the
 *   payload into place before it writes the header, so a header in the file means its payload
 *   was complete when the header was written.
 * - RECORD_FLAG_SEAL (with CRC32): chunk 0; the payload (checked by the header's CRC-32 as
 *   usual) is SEAL_ENTRY_BYTES entries: position u64 of a cloned record's header, CRC-32 u32
 *   of that record's payload, zero u32.
 */
export const RECORD_FLAG_CRC32 = 1;
export const RECORD_FLAG_CLONED = 2;
export const RECORD_FLAG_SEAL = 4;
export const RECORD_FLAG_IMAGE = 8;
const KNOWN_RECORD_FLAGS = RECORD_FLAG_CRC32 | RECORD_FLAG_CLONED | RECORD_FLAG_SEAL | RECORD_FLAG_IMAGE;
export const SEAL_ENTRY_BYTES = 16;
/** Largest padding in front of a cloned payload: filesystem blocks are at most 64 KiB. */
export const MAX_RECORD_ALIGN_BYTES = 64 * 1024;

function headerBase(flags: number, firstChunk: number, payloadBytes: number, payloadOffset: number): Buffer {
  // From Node's shared slab, not an ArrayBuffer of its own: one per record, on the path of every first write.
  const h = Buffer.allocUnsafe(RECORD_HEADER_BYTES).fill(0);
  h.writeUInt32LE(RECORD_MAGIC, 0);
  h.writeUInt16LE(RECORD_VERSION, 4);
  h.writeUInt16LE(flags, 6);
  writeU64(h, firstChunk, 8);
  h.writeUInt32LE(payloadBytes, 16);
  h.writeUInt32LE(payloadOffset, 20);
  return h;
}

function finishHeader(h: Buffer): Buffer {
  h.writeUInt32LE(crc32(h.subarray(0, 56)), 56);
  return h;
}

/** Which device of a snapshot a record belongs to, and where it comes in the storage's order. */
export interface RecordPoint {
  /** Largest: MAX_DEVICE_KEY. */
  deviceKey: number;
  sequence: number;
  /** A write to the image (supersedes earlier records of its chunks), not originals. */
  image: boolean;
}

/** Largest device key (u32 on disk). */
export const MAX_DEVICE_KEY = 0xffff_ffff;

/** A header whose payload follows it and whose CRC-32 it carries. */
function checkedHeader(flags: number, firstChunk: number, payload: Buffer, point?: RecordPoint): Buffer {
  const h = headerBase(flags | (point?.image === true ? RECORD_FLAG_IMAGE : 0), firstChunk, payload.length, 0);
  h.writeUInt32LE(crc32(payload), 24);
  if (point !== undefined) {
    h.writeUInt32LE(point.deviceKey, 28);
    writeU64(h, point.sequence, 32);
  }
  return finishHeader(h);
}

/** The header of a record of chunks firstChunk..; `point` in a snapshot's difference storage. */
export function encodeRecordHeader(firstChunk: number, payload: Buffer, point?: RecordPoint): Buffer {
  return checkedHeader(RECORD_FLAG_CRC32, firstChunk, payload, point);
}

/**
 * The header of a cloned record at `position` whose payload of `payloadBytes` starts at
 * `payloadPosition` (aligned; at least RECORD_HEADER_BYTES further on).
 */
export function encodeClonedRecordHeader(firstChunk: number, payloadBytes: number, position: number, payloadPosition: number): Buffer {
  const offset = payloadPosition - position;
  if (offset < RECORD_HEADER_BYTES || offset > RECORD_HEADER_BYTES + MAX_RECORD_ALIGN_BYTES) {
    throw new BdsnapError('EINVAL', `a cloned payload at byte ${payloadPosition} cannot follow a header at byte ${position}`);
  }
  return finishHeader(headerBase(RECORD_FLAG_CRC32 | RECORD_FLAG_CLONED, firstChunk, payloadBytes, offset));
}

export interface SealEntry {
  /** Position of the cloned record's header. */
  position: number;
  /** CRC-32 of its payload. */
  crc: number;
}

/** Entries of one seal record at most (1 MiB of payload). */
const MAX_SEAL_ENTRIES = 65_536;

/** The seal records (header and payload each) for `entries`: none for none. */
export function encodeSealRecords(entries: readonly SealEntry[]): Array<{ header: Buffer; payload: Buffer }> {
  const out: Array<{ header: Buffer; payload: Buffer }> = [];
  for (let i = 0; i < entries.length; i += MAX_SEAL_ENTRIES) out.push(encodeSealRecord(entries.slice(i, i + MAX_SEAL_ENTRIES)));
  return out;
}

function encodeSealRecord(entries: readonly SealEntry[]): { header: Buffer; payload: Buffer } {
  const payload = Buffer.alloc(entries.length * SEAL_ENTRY_BYTES);
  entries.forEach((e, i) => {
    writeU64(payload, e.position, i * SEAL_ENTRY_BYTES);
    payload.writeUInt32LE(e.crc, i * SEAL_ENTRY_BYTES + 8);
  });
  return { header: checkedHeader(RECORD_FLAG_CRC32 | RECORD_FLAG_SEAL, 0, payload), payload };
}

/** The entries of a seal record's payload (already checked against its header). */
export function decodeSealPayload(payload: Buffer): SealEntry[] | string {
  if (payload.length % SEAL_ENTRY_BYTES !== 0) return `seal record of ${payload.length} bytes`;
  const entries: SealEntry[] = [];
  for (let at = 0; at < payload.length; at += SEAL_ENTRY_BYTES) {
    if (payload.readUInt32LE(at + 12) !== 0) return 'seal entry with a non-zero reserved field';
    entries.push({ position: readU64(payload, at), crc: payload.readUInt32LE(at + 8) });
  }
  return entries;
}

/** 'copied' and 'cloned' hold originals; 'image' a snapshot image's write; 'seal' checksums. */
export type RecordKind = 'copied' | 'cloned' | 'seal' | 'image';

export interface RecordHeader {
  kind: RecordKind;
  firstChunk: number;
  payloadBytes: number;
  /** Bytes from the header's position to the payload's. */
  payloadOffset: number;
  /** True when the payload is checked by its sha256 (flags 0), false for a CRC-32. */
  payloadSha256: boolean;
  /** sha256 (32 bytes) or CRC-32 (u32 LE in the first 4 bytes) of the payload; zeroes for a cloned record. */
  payloadChecksum: Buffer;
  /** RecordPoint's fields (zeroes in a session store). */
  deviceKey: number;
  sequence: number;
}

const ZERO_RESERVED = Buffer.alloc(16);

/** Parse a header; returns a reason string instead of throwing so scanners can decide. */
export function decodeRecordHeader(h: Buffer): RecordHeader | string {
  if (h.length < RECORD_HEADER_BYTES) return 'short header';
  if (h.readUInt32LE(0) !== RECORD_MAGIC) return 'bad record magic';
  const flags = h.readUInt16LE(6);
  const crc = (flags & RECORD_FLAG_CRC32) !== 0;
  const headerOk = crc
    ? h.readUInt32LE(56) === crc32(h.subarray(0, 56)) && h.readUInt32LE(60) === 0
    : sha256(h.subarray(0, 56)).subarray(0, 8).equals(h.subarray(56, 64));
  if (!headerOk) return 'record header checksum mismatch';
  if (h.readUInt16LE(4) !== RECORD_VERSION) return `unknown record version ${h.readUInt16LE(4)}`;
  const cloned = (flags & RECORD_FLAG_CLONED) !== 0;
  const seal = (flags & RECORD_FLAG_SEAL) !== 0;
  const image = (flags & RECORD_FLAG_IMAGE) !== 0;
  if ((flags & ~KNOWN_RECORD_FLAGS) !== 0 || ((cloned || seal || image) && !crc) || Number(cloned) + Number(seal) + Number(image) > 1) return `unknown record flags ${flags}`;
  if (crc && !h.subarray(40, 56).equals(ZERO_RESERVED)) return 'record header with non-zero reserved bytes';
  const payloadBytes = h.readUInt32LE(16);
  if (payloadBytes === 0 || payloadBytes > MAX_RECORD_PAYLOAD_BYTES) return `bad record length ${payloadBytes}`;
  const offset = h.readUInt32LE(20);
  if (cloned ? offset < RECORD_HEADER_BYTES || offset > RECORD_HEADER_BYTES + MAX_RECORD_ALIGN_BYTES : offset !== 0) return `bad payload offset ${offset}`;
  return {
    kind: cloned ? 'cloned' : seal ? 'seal' : image ? 'image' : 'copied',
    firstChunk: readU64(h, 8),
    payloadBytes,
    payloadOffset: cloned ? offset : RECORD_HEADER_BYTES,
    payloadSha256: !crc,
    payloadChecksum: Buffer.from(h.subarray(24, crc ? 28 : 56)),
    deviceKey: crc ? h.readUInt32LE(28) : 0,
    sequence: crc ? readU64(h, 32) : 0,
  };
}

/** Whether `payload` matches the checksum of its decoded header (one hashing pass); never for a cloned record (see its seal). */
export function payloadMatches(header: RecordHeader, payload: Buffer): boolean {
  if (header.kind === 'cloned') return false;
  if (header.payloadSha256) return sha256(payload).equals(header.payloadChecksum);
  return crc32(payload) === header.payloadChecksum.readUInt32LE(0);
}

/** An index or digest table: fixed-size entries after a 16-byte header, sha256 of all at the end. */
function encodeTable(magic: number, entryBytes: number, count: number, fill: (buf: Buffer, at: number, i: number) => void): Buffer {
  const buf = Buffer.alloc(16 + count * entryBytes + 32);
  buf.writeUInt32LE(magic, 0);
  buf.writeUInt32LE(RECORD_VERSION, 4);
  writeU64(buf, count, 8);
  for (let i = 0; i < count; i++) fill(buf, 16 + i * entryBytes, i);
  sha256(buf.subarray(0, buf.length - 32)).copy(buf, buf.length - 32);
  return buf;
}

function decodeTable(name: string, magic: number, entryBytes: number, buf: Buffer): { count: number; body: Buffer } {
  if (buf.length < 48) throw new BdsnapError('ECORRUPT', `${name} is truncated (${buf.length} bytes)`);
  if (buf.readUInt32LE(0) !== magic) throw new BdsnapError('ECORRUPT', `${name} has a bad magic number`);
  if (buf.readUInt32LE(4) !== RECORD_VERSION) throw new BdsnapError('ECORRUPT', `${name} has unknown version ${buf.readUInt32LE(4)}`);
  const count = readU64(buf, 8);
  if (buf.length !== 16 + count * entryBytes + 32) {
    throw new BdsnapError('ECORRUPT', `${name} is ${buf.length} bytes but declares ${count} entries`);
  }
  if (!sha256(buf.subarray(0, buf.length - 32)).equals(buf.subarray(buf.length - 32))) {
    throw new BdsnapError('ECORRUPT', `${name} fails its checksum`);
  }
  return { count, body: buf.subarray(16, buf.length - 32) };
}

/** chunk index -> byte position in data.bin of that chunk's original. */
export function encodeIndex(index: Map<number, number> | ChunkTable): Buffer {
  let chunks: ArrayLike<number>;
  let positions: ArrayLike<number>;
  if (index instanceof Map) {
    const entries = [...index.entries()].sort((a, b) => a[0] - b[0]);
    chunks = entries.map((e) => e[0]);
    positions = entries.map((e) => e[1]);
  } else {
    ({ chunks, values: positions } = index.sorted());
  }
  return encodeTable(INDEX_MAGIC, 16, chunks.length, (buf, at, i) => {
    writeU64(buf, chunks[i]!, at);
    writeU64(buf, positions[i]!, at + 8);
  });
}

/**
 * Whether the index file `buf` lists exactly the entries of `index`, in increasing chunk order
 * as encodeIndex writes them, without building a map of its own (a restore checks hundreds of
 * thousands). Errors: ECORRUPT for a damaged file, as decodeIndex.
 */
export function indexMatches(buf: Buffer, index: ReadonlyMap<number, number>): boolean {
  const { count, body } = decodeTable(INDEX_FILE, INDEX_MAGIC, 16, buf);
  if (count !== index.size) return false;
  let previous = -1;
  for (let i = 0; i < count; i++) {
    const chunk = readU64(body, i * 16);
    if (chunk <= previous || index.get(chunk) !== readU64(body, i * 16 + 8)) return false;
    previous = chunk;
  }
  return true;
}

export function decodeIndex(buf: Buffer): Map<number, number> {
  const { count, body } = decodeTable(INDEX_FILE, INDEX_MAGIC, 16, buf);
  const index = new Map<number, number>();
  for (let i = 0; i < count; i++) index.set(readU64(body, i * 16), readU64(body, i * 16 + 8));
  return index;
}

/** The digests table (chunk index -> digest of its final content) from sorted chunk indexes and their digests packed 32 bytes each. */
export function encodeDigestArrays(chunks: ArrayLike<number>, digests: Buffer): Buffer {
  if (digests.length !== chunks.length * 32) throw new BdsnapError('EINVAL', `${chunks.length} chunks but ${digests.length} digest bytes`);
  return encodeTable(DIGESTS_MAGIC, 40, chunks.length, (buf, at, i) => {
    writeU64(buf, chunks[i]!, at);
    digests.copy(buf, at + 8, i * 32, i * 32 + 32);
  });
}

/**
 * The digests file as a table read in place. Files are written in chunk order (see
 * encodeDigestArrays' callers); one that is not is put in order here. Errors: ECORRUPT (damaged,
 * or a chunk listed twice).
 */
export function decodeDigests(buf: Buffer): DigestTable {
  const { count, body } = decodeTable(DIGESTS_FILE, DIGESTS_MAGIC, 40, buf);
  const chunks = new Float64Array(count);
  let sorted = true;
  for (let i = 0; i < count; i++) {
    chunks[i] = readU64(body, i * 40);
    if (i > 0 && chunks[i]! <= chunks[i - 1]!) sorted = false;
  }
  if (sorted) return new DigestTable(chunks, body, 8, 40);
  const order = Array.from({ length: count }, (_, i) => i).sort((a, b) => chunks[a]! - chunks[b]!);
  const inOrder = new Float64Array(count);
  const digests = Buffer.allocUnsafe(count * DIGEST_BYTES);
  order.forEach((from, i) => {
    inOrder[i] = chunks[from]!;
    if (i > 0 && inOrder[i] === inOrder[i - 1]) throw new BdsnapError('ECORRUPT', `${DIGESTS_FILE} lists chunk ${inOrder[i]} twice`);
    body.copy(digests, i * DIGEST_BYTES, from * 40 + 8, from * 40 + 40);
  });
  return new DigestTable(inOrder, digests);
}

export function parseManifest(text: string, where: string): Manifest {
  return parseJson(text, manifestSchema, (problem) => `${where}: manifest is ${problem.startsWith('not valid JSON') ? problem : `invalid: ${problem}`}`);
}

/** Escape a device path into a directory-name part: readable, portable, at most ~200 bytes. */
export function escapeDevicePath(devicePath: string): string {
  const trimmed = devicePath.replace(/^\/+/, '');
  let out = '';
  for (const ch of trimmed) {
    if (ch === '/') out += '-';
    else if (/^[A-Za-z0-9._]$/.test(ch)) out += ch;
    else out += [...Buffer.from(ch, 'utf8')].map((b) => `%${b.toString(16).toUpperCase().padStart(2, '0')}`).join('');
  }
  if (out === '' || out === '.' || out === '..') out = `%2F${out}`;
  if (out.length > 200) {
    // Keep the readable tail (the file name) and make the cut unique with a hash of the whole path.
    const hash = sha256(Buffer.from(devicePath)).toString('hex').slice(0, 12);
    out = `${out.slice(-180)}~${hash}`;
  }
  return out;
}

/** `20261123T101949.123Z`: UTC, millisecond precision, no characters unsafe in file names. */
export function formatMountTime(time: Date): string {
  return time.toISOString().replace(/[-:]/g, '');
}

/** Suffix of a session directory being removed by `forget.ts` (never listed as a session). */
export const FORGOTTEN_SUFFIX = '.forgotten';

/**
 * Whether `name` is a session directory name of `devicePath`: its escaped path, then exactly
 * a mount time and an optional collision suffix. A prefix test is not enough: `_` is kept in
 * escaped paths, so `/x/a_b`'s sessions start with `/x/a`'s prefix `x-a_`.
 */
export function isSessionDirNameOf(name: string, devicePath: string): boolean {
  const prefix = `${escapeDevicePath(devicePath)}_`;
  return name.startsWith(prefix) && /^\d{8}T\d{6}\.\d{3}Z(-\d+)?$/.test(name.slice(prefix.length));
}

/**
 * The directory name of a session: `<escaped device path>_<UTC mount time>`. Two mounts in the
 * same millisecond get a `-2`, `-3`... suffix when the directory is created (mkdir fails if it
 * exists).
 */
export function sessionDirName(devicePath: string, mountTime: Date): string {
  return `${escapeDevicePath(devicePath)}_${formatMountTime(mountTime)}`;
}

// ---- metadata files ----------------------------------------------------------------------

/** Mode of the metadata files of a session (the snapshot root itself is private). */
export const SESSION_FILE_MODE = 0o644;

export async function writeManifest(dir: string, manifest: Manifest): Promise<void> {
  await writeFileAtomic(path.join(dir, MANIFEST_FILE), `${JSON.stringify(manifest, null, 2)}\n`, SESSION_FILE_MODE);
}

export async function readManifest(dir: string): Promise<Manifest> {
  let text: string;
  try {
    text = await fs.promises.readFile(path.join(dir, MANIFEST_FILE), 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') {
      const dirExists = await fs.promises.stat(dir).then((s) => s.isDirectory(), () => false);
      throw new BdsnapError('ENOENT', dirExists ? `${dir}: the manifest ${MANIFEST_FILE} is missing` : `${dir}: no such session directory`, { cause: err });
    }
    throw new BdsnapError('EIO', `${dir}: cannot read the manifest: ${(err as Error).message}`, { cause: err });
  }
  return parseManifest(text, dir);
}
