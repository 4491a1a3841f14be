/**
 * How a piece is stored: a 12-byte header, then the piece's bytes raw, as a zstd frame (level
 * 3, the default), as brotli (quality 1, the default of earlier repositories and where zstd
 * is missing), as raw deflate (level 1) or as an LZ4 block. The codec is recorded in each
 * piece, so a repository stays readable wherever an optional native piece is missing: zstd
 * frames are then decoded by `fzstd` (see zstd.ts), LZ4 blocks by the small decoder below, and
 * new pieces are written with brotli (built into Node). Where the native LZ4 package
 * (`lz4-napi`) is installed, LZ4 also probes each piece's start to tell incompressible pieces
 * (stored raw) at a fraction of a full compression's cost.
 *
 * Header: magic 'BDPC' (u32 LE 0x43504442) @0, version u8 @4 (1), codec u8 @5, reserved u16 @6
 * (0), raw length u32 LE @8. The piece's id (the sha256 of the raw bytes, or in an encrypted
 * repository their keyed hash, see crypto.ts) is checked on read. In an encrypted repository
 * the header and payload are sealed together.
 *
 * LZ4 payload: the decompressed size (u32 LE) and one LZ4 block (the LZ4 block format:
 * sequences of a token, literals, a 2-byte offset and a match length).
 */

import { createHash } from 'node:crypto';
import { createRequire } from 'node:module';
import zlib from 'node:zlib';
import { BdsnapError } from '../errors.js';
import { ZSTD_LEVEL, nativeZstd, zstdDecompress } from './zstd.js';
import type { CodecChoice } from './codec-choices.js';

export const PIECE_MAGIC = 0x43504442;
export const PIECE_VERSION = 1;
export const PIECE_HEADER_BYTES = 12;

export const CODEC_RAW = 0;
export const CODEC_LZ4 = 1;
export const CODEC_DEFLATE = 2;
export const CODEC_BROTLI = 3;
export const CODEC_ZSTD = 4;
export type Codec = typeof CODEC_RAW | typeof CODEC_LZ4 | typeof CODEC_DEFLATE | typeof CODEC_BROTLI | typeof CODEC_ZSTD;
export const CODEC_NAMES: Record<Codec, string> = {
  [CODEC_RAW]: 'raw', [CODEC_LZ4]: 'lz4', [CODEC_DEFLATE]: 'deflate', [CODEC_BROTLI]: 'brotli', [CODEC_ZSTD]: 'zstd',
};
/** The codecs a repository may name for its new pieces (the first is the default). */
export { CODEC_CHOICES, type CodecChoice } from './codec-choices.js';

/**
 * A stored piece is its header, an LZ4 size prefix at most, and no more than its raw bytes
 * (a payload that does not shrink is stored raw).
 */
export const STORED_SLACK_BYTES = PIECE_HEADER_BYTES + 4;

/** Largest piece a header may claim; checked before allocating. */
export const MAX_PIECE_BYTES = 64 * 1024 * 1024;

interface Lz4Native {
  compressSync(data: Buffer): Buffer;
  uncompressSync(data: Uint8Array): Buffer;
}

let native: Lz4Native | null | undefined;

/** The native LZ4 package, or null where it is not installed (or BDSNAP_NO_NATIVE_LZ4=1). */
export function nativeLz4(): Lz4Native | null {
  if (native === undefined) {
    native = null;
    if (process.env.BDSNAP_NO_NATIVE_LZ4 !== '1') {
      try {
        native = createRequire(import.meta.url)('lz4-napi') as Lz4Native;
      } catch {
        native = null;
      }
    }
  }
  return native;
}

/**
 * The codec new pieces are written with, given the repository's choice. Measured here on
 * 256 KiB pieces of text (CPU time per piece, share of the raw size): zstd level 3 0.6 to
 * 0.8 ms to compress and 0.16 ms to decode, 0.20; brotli quality 1 0.9 to 1.2 ms and 0.6 to
 * 0.7 ms, 0.22; deflate level 1 1.5 to 2.2 ms and 0.4 to 0.5 ms, 0.23; LZ4 0.6 ms, 0.39.
 * `zstd` and `lz4` fall back to brotli where their native piece is missing.
 */
export function codecFor(choice: CodecChoice): Codec {
  return usableCodec(CODEC_BY_CHOICE[choice]);
}

const CODEC_BY_CHOICE: Record<CodecChoice, Codec> = { zstd: CODEC_ZSTD, brotli: CODEC_BROTLI, deflate: CODEC_DEFLATE, lz4: CODEC_LZ4 };

/** `codec`, or brotli where `codec` needs a native piece this thread does not have. */
function usableCodec(codec: Codec): Codec {
  if (codec === CODEC_ZSTD && !nativeZstd()) return CODEC_BROTLI;
  if (codec === CODEC_LZ4 && !nativeLz4()) return CODEC_BROTLI;
  return codec;
}

export function sha256Hex(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

/**
 * Bytes of a compressibility probe, and how much it must shrink for the whole piece to be tried.
 * 16 KiB: LZ4 of 16 KiB of random bytes took 8 us here, of 64 KiB 207 us.
 */
const PROBE_BYTES = 16 * 1024;
const PROBE_KEEP_RATIO = 0.95;
/** A compressed piece is kept only if it saves at least this share. */
const MIN_SAVING_RATIO = 1 / 32;

function compress(codec: Codec, data: Buffer): Buffer {
  if (codec === CODEC_ZSTD) return nativeZstd()!.compress(data, ZSTD_LEVEL);
  if (codec === CODEC_LZ4) return nativeLz4()!.compressSync(data);
  if (codec === CODEC_BROTLI) {
    return zlib.brotliCompressSync(data, { params: { [zlib.constants.BROTLI_PARAM_QUALITY]: 1, [zlib.constants.BROTLI_PARAM_SIZE_HINT]: data.length } });
  }
  return zlib.deflateRawSync(data, { level: 1 });
}

/** The probe uses LZ4 where it can: 50x faster than deflate on incompressible bytes. */
function probeCodec(codec: Codec): Codec {
  return nativeLz4() ? CODEC_LZ4 : codec;
}

/**
 * Encode a piece: compressed with `codec` unless a probe of its start (or the whole result)
 * shows it does not pay, in which case it is stored raw. The stored object is the header
 * followed by the payload; a raw payload is `raw` itself, not a copy (fresh memory costs
 * page faults, measured at several ms per MiB on a busy machine).
 */
export function encodePieceParts(raw: Buffer, wanted: Codec): { header: Buffer; payload: Buffer } {
  const codec = usableCodec(wanted);
  let used: Codec = CODEC_RAW;
  let payload: Buffer = raw;
  if (codec !== CODEC_RAW && raw.length >= 64) {
    const probe = raw.length > PROBE_BYTES * 2 ? raw.subarray(0, PROBE_BYTES) : undefined;
    if (!probe || compress(probeCodec(codec), probe).length < probe.length * PROBE_KEEP_RATIO) {
      const packed = compress(codec, raw);
      if (packed.length <= raw.length * (1 - MIN_SAVING_RATIO)) {
        used = codec;
        payload = packed;
      }
    }
  }
  const header = Buffer.alloc(PIECE_HEADER_BYTES);
  header.writeUInt32LE(PIECE_MAGIC, 0);
  header.writeUInt8(PIECE_VERSION, 4);
  header.writeUInt8(used, 5);
  header.writeUInt32LE(raw.length, 8);
  return { header, payload };
}

/** encodePieceParts as one buffer. */
export function encodePiece(raw: Buffer, codec: Codec): Buffer {
  const { header, payload } = encodePieceParts(raw, codec);
  return Buffer.concat([header, payload]);
}

/** The codec recorded in a stored piece (for statistics), without decoding it. */
export function pieceCodec(stored: Buffer): Codec | undefined {
  return stored.length >= PIECE_HEADER_BYTES && stored.readUInt32LE(0) === PIECE_MAGIC ? (stored.readUInt8(5) as Codec) : undefined;
}

/**
 * Decode a stored piece and check it against its name (sha256 hex). Errors: ECORRUPT with
 * what is wrong (bad header, a length over `maxRawBytes`, undecodable payload, wrong length,
 * wrong hash). The length the header claims is checked before anything is allocated for it.
 */
export function decodePiece(stored: Buffer, expectedHash: string, maxRawBytes = MAX_PIECE_BYTES, idOf: (raw: Buffer) => string = sha256Hex): Buffer {
  const bad = (why: string): BdsnapError => new BdsnapError('ECORRUPT', `piece ${expectedHash} is damaged: ${why}`);
  if (stored.length < PIECE_HEADER_BYTES || stored.readUInt32LE(0) !== PIECE_MAGIC) throw bad('bad header');
  if (stored.readUInt8(4) !== PIECE_VERSION) throw bad(`unknown version ${stored.readUInt8(4)}`);
  const codec = stored.readUInt8(5);
  const rawLength = stored.readUInt32LE(8);
  if (rawLength > Math.min(maxRawBytes, MAX_PIECE_BYTES)) throw bad(`claims ${rawLength} bytes, more than ${Math.min(maxRawBytes, MAX_PIECE_BYTES)}`);
  const payload = stored.subarray(PIECE_HEADER_BYTES);
  let raw: Buffer;
  try {
    if (codec === CODEC_RAW) raw = payload;
    else if (codec === CODEC_LZ4) raw = decodeLz4(payload, rawLength);
    else if (codec === CODEC_DEFLATE) raw = zlib.inflateRawSync(payload, { maxOutputLength: rawLength + 1 });
    else if (codec === CODEC_BROTLI) raw = zlib.brotliDecompressSync(payload, { maxOutputLength: rawLength + 1 });
    else if (codec === CODEC_ZSTD) raw = zstdDecompress(payload, rawLength);
    else throw bad(`unknown codec ${codec}`);
  } catch (err) {
    if (err instanceof BdsnapError) throw err;
    throw bad(`cannot decode (${(err as Error).message})`);
  }
  if (raw.length !== rawLength) throw bad(`${raw.length} bytes instead of ${rawLength}`);
  if (idOf(raw) !== expectedHash) throw bad('content does not match its hash');
  return raw;
}

function decodeLz4(payload: Buffer, rawLength: number): Buffer {
  if (payload.length < 4 || payload.readUInt32LE(0) !== rawLength) throw new Error('LZ4 size prefix does not match');
  const lz4 = nativeLz4();
  return lz4 ? lz4.uncompressSync(payload) : lz4BlockDecode(payload.subarray(4), rawLength);
}

/**
 * Decode one LZ4 block into exactly `rawLength` bytes (the pure fallback of the native
 * package). Every length and offset is checked against the input and the output before use.
 */
export function lz4BlockDecode(src: Buffer, rawLength: number): Buffer {
  const out = Buffer.allocUnsafe(rawLength);
  let i = 0;
  let o = 0;
  const extra = (n: number): number => {
    if (n !== 15) return n;
    for (;;) {
      if (i >= src.length) throw new Error('LZ4 length runs past the input');
      const b = src[i++]!;
      n += b;
      if (b !== 255) return n;
    }
  };
  while (i < src.length) {
    const token = src[i++]!;
    const literals = extra(token >>> 4);
    if (i + literals > src.length || o + literals > rawLength) throw new Error('LZ4 literals run past the block');
    src.copy(out, o, i, i + literals);
    i += literals;
    o += literals;
    if (i === src.length) break; // the last sequence has literals only
    if (i + 2 > src.length) throw new Error('LZ4 offset runs past the input');
    const offset = src[i]! | (src[i + 1]! << 8);
    i += 2;
    const length = extra(token & 15) + 4;
    if (offset === 0 || offset > o) throw new Error(`LZ4 match offset ${offset} at output ${o} is out of range`);
    if (o + length > rawLength) throw new Error('LZ4 match runs past the block');
    if (offset >= length) {
      out.copy(out, o, o - offset, o - offset + length);
      o += length;
    } else {
      // Overlapping match: bytes repeat with period `offset`.
      for (let k = 0; k < length; k++, o++) out[o] = out[o - offset]!;
    }
  }
  if (o !== rawLength) throw new Error(`LZ4 block gives ${o} bytes, not ${rawLength}`);
  return out;
}
