/**
 * zstd for pieces: the system's libzstd (`libzstd.so.1`, which every Debian and most other
 * Linux systems carry) called through the optional `koffi` FFI package, with one compression
 * and one decompression context per thread, reused for every piece. Where koffi or the library
 * is missing (or BDSNAP_NO_NATIVE_ZSTD=1), `nativeZstd()` is null: stored zstd pieces are then
 * decoded by `fzstd` (pure JavaScript, about ten times slower) and new pieces are written with
 * brotli (see codecFor in codec.ts).
 *
 * Measured here on 256 KiB pieces of text, CPU time per piece: level 3 compresses in 0.6 to
 * 0.8 ms to 0.20 of the raw size and decompresses in 0.16 ms, where brotli quality 1 took
 * 0.9 to 1.2 ms, 0.22 and 0.7 ms. (The npm bindings of zstd decoded the same frames in 1.2 to
 * 2.3 ms.)
 */

import { decompress as pureDecompress } from 'fzstd';
import { loadKoffi } from '../host/libc.js';

/** zstd's own default level, and restic's. */
export const ZSTD_LEVEL = 3;

export interface ZstdNative {
  /** The frame of `src` compressed at `level`, in a buffer of its own. Throws on a zstd error. */
  compress(src: Buffer, level: number): Buffer;
  /**
   * The frame `src` decoded into a fresh buffer of at most `capacityBytes`. Throws when the
   * frame is damaged or decodes to more than that.
   */
  decompress(src: Buffer, capacityBytes: number): Buffer;
}

let native: ZstdNative | null | undefined;

/** libzstd through koffi, or null where it cannot be had. Bound once per thread. */
export function nativeZstd(): ZstdNative | null {
  if (native === undefined) native = process.env.BDSNAP_NO_NATIVE_ZSTD === '1' ? null : bind();
  return native;
}

function bind(): ZstdNative | null {
  const ffi = loadKoffi();
  if (process.platform !== 'linux' || !('koffi' in ffi)) return null;
  try {
    const lib = ffi.koffi.load('libzstd.so.1');
    const createCCtx = lib.func('void *ZSTD_createCCtx()');
    const createDCtx = lib.func('void *ZSTD_createDCtx()');
    const compressCCtx = lib.func('size_t ZSTD_compressCCtx(void *cctx, _Out_ uint8_t *dst, size_t dstCapacity, const uint8_t *src, size_t srcSize, int level)');
    const decompressDCtx = lib.func('size_t ZSTD_decompressDCtx(void *dctx, _Out_ uint8_t *dst, size_t dstCapacity, const uint8_t *src, size_t srcSize)');
    const compressBound = lib.func('size_t ZSTD_compressBound(size_t srcSize)');
    const isError = lib.func('unsigned int ZSTD_isError(size_t code)');
    const errorName = lib.func('const char *ZSTD_getErrorName(size_t code)');
    // Contexts live as long as the thread: a fresh one per call costs its tables each time.
    const cctx: unknown = createCCtx();
    const dctx: unknown = createDCtx();
    if (!cctx || !dctx) return null;
    const check = (rc: number | bigint, what: string): number => {
      if (isError(rc) as number) throw new Error(`zstd ${what}: ${errorName(rc) as string}`);
      return Number(rc);
    };
    let scratch = Buffer.alloc(0);
    return {
      compress(src: Buffer, level: number): Buffer {
        const bound = Number(compressBound(src.length));
        if (scratch.length < bound) scratch = Buffer.allocUnsafeSlow(bound);
        const n = check(compressCCtx(cctx, scratch, scratch.length, src, src.length, level) as number, 'compress');
        // A buffer that owns its memory, so that a worker can transfer it.
        const out = Buffer.allocUnsafeSlow(n);
        scratch.copy(out, 0, 0, n);
        return out;
      },
      decompress(src: Buffer, capacityBytes: number): Buffer {
        const out = Buffer.allocUnsafeSlow(capacityBytes);
        const n = check(decompressDCtx(dctx, out, capacityBytes, src, src.length) as number, 'decompress');
        return out.subarray(0, n);
      },
    };
  } catch {
    return null;
  }
}

/**
 * Decode a zstd frame of at most `capacityBytes`: natively where possible, else in pure
 * JavaScript. Throws when the frame is damaged or would decode to more.
 */
export function zstdDecompress(src: Buffer, capacityBytes: number): Buffer {
  const z = nativeZstd();
  if (z) return z.decompress(src, capacityBytes);
  // fzstd sizes its output by what the frame declares, and decodes every frame it is given:
  // a few bytes can claim gigabytes. So the input must be one frame that declares a size
  // within the capacity (ours always do); fzstd then decodes into a buffer of that size.
  const declared = zstdContentSize(src);
  if (declared === undefined) throw new Error('zstd frame does not declare its size');
  if (declared > capacityBytes) throw new Error(`zstd frame declares ${declared} bytes, more than ${capacityBytes}`);
  const out = pureDecompress(src);
  if (out.length > capacityBytes) throw new Error(`zstd frame decodes to ${out.length} bytes, more than ${capacityBytes}`);
  return Buffer.from(out.buffer, out.byteOffset, out.byteLength);
}

const ZSTD_MAGIC = 0xfd2fb528;
const BLOCK_RAW = 0;
const BLOCK_RLE = 1;
const BLOCK_COMPRESSED = 2;

/**
 * The Frame_Content_Size of `src`, which must be exactly one zstd frame without a dictionary
 * (RFC 8878, 3.1.1): the header is read, then the block headers are walked to the frame's end,
 * which must be the end of `src`. Undefined when the frame does not declare its size (or
 * declares 0). Throws when `src` is not such a frame.
 */
export function zstdContentSize(src: Buffer): number | undefined {
  if (src.length < 6 || src.readUInt32LE(0) !== ZSTD_MAGIC) throw new Error('not a zstd frame');
  const descriptor = src[4]!;
  const fcsFlag = descriptor >> 6;
  const singleSegment = (descriptor >> 5) & 1;
  const hasChecksum = (descriptor >> 2) & 1;
  if ((descriptor & 0x08) !== 0) throw new Error('zstd frame header has a reserved bit set');
  if ((descriptor & 0x03) !== 0) throw new Error('zstd frame needs a dictionary');
  let at = 5 + (singleSegment ? 0 : 1);
  const fcsBytes = [singleSegment, 2, 4, 8][fcsFlag]!;
  if (at + fcsBytes > src.length) throw new Error('zstd frame header is cut short');
  let size: number | undefined;
  if (fcsBytes === 1) size = src[at]!;
  else if (fcsBytes === 2) size = src.readUInt16LE(at) + 256;
  else if (fcsBytes === 4) size = src.readUInt32LE(at);
  else if (fcsBytes === 8) size = Number(src.readBigUInt64LE(at));
  at += fcsBytes;
  for (let last = 0; !last;) {
    if (at + 3 > src.length) throw new Error(`zstd block header at ${at} is cut short`);
    const header = src.readUIntLE(at, 3);
    at += 3;
    last = header & 1;
    const type = (header >> 1) & 3;
    const blockBytes = header >>> 3;
    if (type === BLOCK_RAW || type === BLOCK_COMPRESSED) at += blockBytes;
    else if (type === BLOCK_RLE) at += 1;
    else throw new Error(`zstd block at ${at - 3} has the reserved type`);
    if (at > src.length) throw new Error(`zstd block ending at ${at} runs past the input`);
  }
  if (hasChecksum) at += 4;
  if (at !== src.length) throw new Error(`zstd frame ends at ${at} of ${src.length} bytes: more than one frame`);
  return size === 0 ? undefined : size;
}
