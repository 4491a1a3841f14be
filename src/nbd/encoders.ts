/**
 * Encoders for every NBD message bdsnap sends, server side and client side. Reply headers can
 * also be written in place (write*Header) into a buffer that already holds the data after
 * the header room, so a READ reply goes out as one buffer with no copy.
 */

import { writeU64BE } from '../bytes.js';
import {
  IHAVEOPT_HI, IHAVEOPT_LO, NBDMAGIC_HI, NBDMAGIC_LO, NBD_INFO_BLOCK_SIZE, NBD_INFO_DESCRIPTION, NBD_INFO_EXPORT,
  NBD_INFO_NAME, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_ERROR_OFFSET,
  NBD_REPLY_TYPE_NONE, NBD_REPLY_TYPE_OFFSET_HOLE, NBD_REP_MAGIC_HI, NBD_REP_MAGIC_LO, NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC, NBD_STRUCTURED_REPLY_MAGIC, OPTION_HEADER_BYTES, OPTION_REPLY_HEADER_BYTES,
  REQUEST_HEADER_BYTES, SIMPLE_REPLY_HEADER_BYTES, STRUCTURED_REPLY_HEADER_BYTES, NBD_MAX_STRING_BYTES,
} from './constants.js';

/** Write an unsigned 64-bit value given as a safe integer, in network order. */
export function writeU64(buf: Buffer, offset: number, value: number): void {
  writeU64BE(buf, value, offset);
}

function truncateUtf8(text: string, maxBytes: number): Buffer {
  const b = Buffer.from(text, 'utf8');
  return b.length <= maxBytes ? b : b.subarray(0, maxBytes);
}

// ---- Server side: handshake ----

/** NBDMAGIC, IHAVEOPT, 16-bit handshake flags. */
export function encodeGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.allocUnsafe(18);
  b.writeUInt32BE(NBDMAGIC_HI, 0);
  b.writeUInt32BE(NBDMAGIC_LO, 4);
  b.writeUInt32BE(IHAVEOPT_HI, 8);
  b.writeUInt32BE(IHAVEOPT_LO, 12);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

export function encodeOptionReply(option: number, replyType: number, data?: Buffer): Buffer {
  const length = data?.length ?? 0;
  const b = Buffer.allocUnsafe(OPTION_REPLY_HEADER_BYTES + length);
  b.writeUInt32BE(NBD_REP_MAGIC_HI, 0);
  b.writeUInt32BE(NBD_REP_MAGIC_LO, 4);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(replyType >>> 0, 12);
  b.writeUInt32BE(length, 16);
  data?.copy(b, OPTION_REPLY_HEADER_BYTES);
  return b;
}

/** An error reply carrying a human-readable message. */
export function encodeOptionError(option: number, replyType: number, message: string): Buffer {
  return encodeOptionReply(option, replyType, truncateUtf8(message, NBD_MAX_STRING_BYTES));
}

/** Data of NBD_REP_SERVER. */
export function encodeRepServer(name: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.allocUnsafe(4 + n.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  return b;
}

/** Data of NBD_REP_META_CONTEXT. */
export function encodeRepMetaContext(contextId: number, name: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.allocUnsafe(4 + n.length);
  b.writeUInt32BE(contextId, 0);
  n.copy(b, 4);
  return b;
}

export function encodeInfoExport(sizeBytes: number, transmissionFlags: number): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeUInt16BE(NBD_INFO_EXPORT, 0);
  writeU64(b, 2, sizeBytes);
  b.writeUInt16BE(transmissionFlags, 10);
  return b;
}

function encodeInfoString(infoType: number, text: string): Buffer {
  const t = truncateUtf8(text, NBD_MAX_STRING_BYTES);
  const b = Buffer.allocUnsafe(2 + t.length);
  b.writeUInt16BE(infoType, 0);
  t.copy(b, 2);
  return b;
}

export function encodeInfoName(name: string): Buffer {
  return encodeInfoString(NBD_INFO_NAME, name);
}

export function encodeInfoDescription(description: string): Buffer {
  return encodeInfoString(NBD_INFO_DESCRIPTION, description);
}

export function encodeInfoBlockSize(minimumBytes: number, preferredBytes: number, maximumBytes: number): Buffer {
  const b = Buffer.allocUnsafe(14);
  b.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 0);
  b.writeUInt32BE(minimumBytes, 2);
  b.writeUInt32BE(preferredBytes, 6);
  b.writeUInt32BE(maximumBytes, 10);
  return b;
}

/** The reply to NBD_OPT_EXPORT_NAME: size, transmission flags, and 124 zeroes unless NO_ZEROES. */
export function encodeExportNameReply(sizeBytes: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(noZeroes ? 10 : 134);
  writeU64(b, 0, sizeBytes);
  b.writeUInt16BE(transmissionFlags, 8);
  return b;
}

// ---- Server side: transmission ----

export function writeSimpleReplyHeader(buf: Buffer, offset: number, errno: number, cookieHi: number, cookieLo: number): void {
  buf.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, offset);
  buf.writeUInt32BE(errno, offset + 4);
  buf.writeUInt32BE(cookieHi, offset + 8);
  buf.writeUInt32BE(cookieLo, offset + 12);
}

export function encodeSimpleReply(errno: number, cookieHi: number, cookieLo: number): Buffer {
  const b = Buffer.allocUnsafe(SIMPLE_REPLY_HEADER_BYTES);
  writeSimpleReplyHeader(b, 0, errno, cookieHi, cookieLo);
  return b;
}

export function writeStructuredHeader(
  buf: Buffer, offset: number, flags: number, replyType: number, cookieHi: number, cookieLo: number, lengthBytes: number,
): void {
  buf.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, offset);
  buf.writeUInt16BE(flags, offset + 4);
  buf.writeUInt16BE(replyType, offset + 6);
  buf.writeUInt32BE(cookieHi, offset + 8);
  buf.writeUInt32BE(cookieLo, offset + 12);
  buf.writeUInt32BE(lengthBytes, offset + 16);
}

/** Header room before READ data in a structured OFFSET_DATA chunk: header plus the offset field. */
export const OFFSET_DATA_PREFIX_BYTES = STRUCTURED_REPLY_HEADER_BYTES + 8;

export function encodeStructuredNone(cookieHi: number, cookieLo: number): Buffer {
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_BYTES);
  writeStructuredHeader(b, 0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookieHi, cookieLo, 0);
  return b;
}

export function encodeOffsetHole(cookieHi: number, cookieLo: number, offsetBytes: number, lengthBytes: number, flags = NBD_REPLY_FLAG_DONE): Buffer {
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_BYTES + 12);
  writeStructuredHeader(b, 0, flags, NBD_REPLY_TYPE_OFFSET_HOLE, cookieHi, cookieLo, 12);
  writeU64(b, STRUCTURED_REPLY_HEADER_BYTES, offsetBytes);
  b.writeUInt32BE(lengthBytes, STRUCTURED_REPLY_HEADER_BYTES + 8);
  return b;
}

/** An error chunk: errno, message, and for ERROR_OFFSET the offset after the message. */
function encodeErrorChunk(
  replyType: number, cookieHi: number, cookieLo: number, errno: number, message: string, flags: number, offsetBytes?: number,
): Buffer {
  const m = truncateUtf8(message, NBD_MAX_STRING_BYTES);
  const length = 6 + m.length + (offsetBytes === undefined ? 0 : 8);
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_BYTES + length);
  writeStructuredHeader(b, 0, flags, replyType, cookieHi, cookieLo, length);
  b.writeUInt32BE(errno, STRUCTURED_REPLY_HEADER_BYTES);
  b.writeUInt16BE(m.length, STRUCTURED_REPLY_HEADER_BYTES + 4);
  m.copy(b, STRUCTURED_REPLY_HEADER_BYTES + 6);
  if (offsetBytes !== undefined) writeU64(b, STRUCTURED_REPLY_HEADER_BYTES + 6 + m.length, offsetBytes);
  return b;
}

export function encodeStructuredError(cookieHi: number, cookieLo: number, errno: number, message: string, flags = NBD_REPLY_FLAG_DONE): Buffer {
  return encodeErrorChunk(NBD_REPLY_TYPE_ERROR, cookieHi, cookieLo, errno, message, flags);
}

export function encodeStructuredErrorOffset(
  cookieHi: number, cookieLo: number, errno: number, message: string, offsetBytes: number, flags = NBD_REPLY_FLAG_DONE,
): Buffer {
  return encodeErrorChunk(NBD_REPLY_TYPE_ERROR_OFFSET, cookieHi, cookieLo, errno, message, flags, offsetBytes);
}

/** One BLOCK_STATUS chunk: context id, then (length, flags) descriptors. */
export function encodeBlockStatus(
  cookieHi: number, cookieLo: number, contextId: number, extents: ReadonlyArray<{ length: number; flags: number }>, flags = NBD_REPLY_FLAG_DONE,
): Buffer {
  const length = 4 + 8 * extents.length;
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_BYTES + length);
  writeStructuredHeader(b, 0, flags, NBD_REPLY_TYPE_BLOCK_STATUS, cookieHi, cookieLo, length);
  b.writeUInt32BE(contextId, STRUCTURED_REPLY_HEADER_BYTES);
  let at = STRUCTURED_REPLY_HEADER_BYTES + 4;
  for (const e of extents) {
    b.writeUInt32BE(e.length, at);
    b.writeUInt32BE(e.flags >>> 0, at + 4);
    at += 8;
  }
  return b;
}

// ---- Client side ----

export function encodeClientFlags(flags: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(flags >>> 0, 0);
  return b;
}

export function encodeOption(option: number, data?: Buffer): Buffer {
  const length = data?.length ?? 0;
  const b = Buffer.allocUnsafe(OPTION_HEADER_BYTES + length);
  b.writeUInt32BE(IHAVEOPT_HI, 0);
  b.writeUInt32BE(IHAVEOPT_LO, 4);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(length, 12);
  data?.copy(b, OPTION_HEADER_BYTES);
  return b;
}

/** Data of NBD_OPT_INFO / NBD_OPT_GO. */
export function encodeInfoRequestData(exportName: string, infoTypes: readonly number[]): Buffer {
  const n = Buffer.from(exportName, 'utf8');
  const b = Buffer.allocUnsafe(4 + n.length + 2 + 2 * infoTypes.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  b.writeUInt16BE(infoTypes.length, 4 + n.length);
  infoTypes.forEach((t, i) => b.writeUInt16BE(t, 6 + n.length + 2 * i));
  return b;
}

/** Data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT. */
export function encodeMetaContextData(exportName: string, queries: readonly string[]): Buffer {
  const parts: Buffer[] = [];
  const n = Buffer.from(exportName, 'utf8');
  const head = Buffer.allocUnsafe(4);
  head.writeUInt32BE(n.length, 0);
  parts.push(head, n);
  const count = Buffer.allocUnsafe(4);
  count.writeUInt32BE(queries.length, 0);
  parts.push(count);
  for (const q of queries) {
    const qb = Buffer.from(q, 'utf8');
    const ql = Buffer.allocUnsafe(4);
    ql.writeUInt32BE(qb.length, 0);
    parts.push(ql, qb);
  }
  return Buffer.concat(parts);
}

export function writeRequestHeader(
  buf: Buffer, offset: number, flags: number, type: number, cookieHi: number, cookieLo: number, offsetBytes: number, lengthBytes: number,
): void {
  buf.writeUInt32BE(NBD_REQUEST_MAGIC, offset);
  buf.writeUInt16BE(flags, offset + 4);
  buf.writeUInt16BE(type, offset + 6);
  buf.writeUInt32BE(cookieHi, offset + 8);
  buf.writeUInt32BE(cookieLo, offset + 12);
  writeU64(buf, offset + 16, offsetBytes);
  buf.writeUInt32BE(lengthBytes, offset + 24);
}

export function encodeRequest(flags: number, type: number, cookieHi: number, cookieLo: number, offsetBytes: number, lengthBytes: number): Buffer {
  const b = Buffer.allocUnsafe(REQUEST_HEADER_BYTES);
  writeRequestHeader(b, 0, flags, type, cookieHi, cookieLo, offsetBytes, lengthBytes);
  return b;
}
