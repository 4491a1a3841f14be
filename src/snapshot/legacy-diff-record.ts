/**
 * The first record format of a snapshot's difference storage (`<id>.<n>.diff` files), read
 * only: new files (`<id>.<n>.rec`) hold the records of format.ts, the session store's, written
 * and read by the same code. Storages written before stay readable through this. Pure: no I/O.
 *
 * A file is a sequence of records, each a 64-byte header and a payload of one or more adjacent
 * chunks of one device (the device's last chunk may be short). Header, little-endian:
 *
 *   magic u32 @0 ('BDSD'), version u16 @4, kind u8 @6 (1 original, 2 image), reserved u8 @7,
 *   device key u32 @8, chunk count u32 @12, first chunk u64 @16, sequence u64 @24,
 *   payload length u32 @32, reserved (zero) @36..60, CRC-32 @60 of bytes 0..60 and the payload.
 *
 * The header is checked on its own first (magic, lengths against the maxima) so that nothing
 * is allocated from a garbage length, then the CRC over header and payload.
 */

import { crc32 } from 'node:zlib';
import { RECORD_HEADER_BYTES, MAX_RECORD_PAYLOAD_BYTES, readU64 } from './format.js';

/** 'BDSD' */
export const DIFF_RECORD_MAGIC = 0x44534442;
const DIFF_FORMAT_VERSION = 1;
export const DIFF_RECORD_HEADER_BYTES = RECORD_HEADER_BYTES;
export const DIFF_MAX_PAYLOAD_BYTES = MAX_RECORD_PAYLOAD_BYTES;

export type DiffRecordKind = 'original' | 'image';
const KIND_CODE: Record<DiffRecordKind, number> = { original: 1, image: 2 };

export interface DiffRecordHeader {
  kind: DiffRecordKind;
  deviceKey: number;
  firstChunk: number;
  chunkCount: number;
  sequence: number;
  payloadBytes: number;
}

/**
 * Parse and check a header on its own (everything but the CRC, which needs the payload).
 * Returns a reason string instead of throwing so that the scanner can treat it as a torn tail.
 */
export function decodeDiffRecordHeader(h: Buffer, chunkSize: number): DiffRecordHeader | string {
  if (h.length < DIFF_RECORD_HEADER_BYTES) return 'short header';
  if (h.readUInt32LE(0) !== DIFF_RECORD_MAGIC) return 'bad record magic';
  if (h.readUInt16LE(4) !== DIFF_FORMAT_VERSION) return `unknown record version ${h.readUInt16LE(4)}`;
  const code = h.readUInt8(6);
  const kind = code === KIND_CODE.original ? 'original' : code === KIND_CODE.image ? 'image' : undefined;
  if (kind === undefined) return `unknown record kind ${code}`;
  const chunkCount = h.readUInt32LE(12);
  const payloadBytes = h.readUInt32LE(32);
  if (payloadBytes === 0 || payloadBytes > DIFF_MAX_PAYLOAD_BYTES) return `bad record length ${payloadBytes}`;
  // Whole chunks, but for a short last chunk of the device.
  if (chunkCount === 0 || payloadBytes > chunkCount * chunkSize || payloadBytes <= (chunkCount - 1) * chunkSize) {
    return `record of ${chunkCount} chunks has ${payloadBytes} payload bytes`;
  }
  return { kind, deviceKey: h.readUInt32LE(8), chunkCount, firstChunk: readU64(h, 16), sequence: readU64(h, 24), payloadBytes };
}

/** Whether header + payload match the record's CRC. */
export function diffRecordMatches(header: Buffer, payload: Buffer): boolean {
  return crc32(payload, crc32(header.subarray(0, 60))) === header.readUInt32LE(60);
}
