/**
 * Worker thread of the piece pool: the CPU-heavy part of a piece (zero check, id, compression
 * and sealing; or opening, decompression and the id check on the way back), so that both
 * cores work while the main thread moves bytes between the source, the store and the target.
 * The repository's piece keys (crypto.ts) come with the worker's start (workerData).
 *
 * 'check' is a restore's first pass over a piece kept in a plain file (a whole v1 piece object,
 * or a byte range of a pack): read, decode and check it, and keep nothing.
 *
 * 'place' does a restore's whole step for a piece kept as a plain file (a local store): read
 * it, decode and check it, and write it into the target at its offset, all on this thread,
 * with blocking calls; the main thread only hands out the slots. Into an existing target it
 * first reads the range: one that already holds the piece is left alone, any other has its
 * original kept (see PlaceUndo). A piece that more slots use (`keep`) stays decoded here for
 * them, within a bound.
 *
 * A task sent with `trace` (the main thread records file-system calls: fs-trace.ts, which
 * cannot see this thread's) comes back with the calls it made, for the pool to report there.
 */

import fs from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import { isAllZero, type ByteRange } from '../bytes.js';
import { BdsnapError, toBdsnapError } from '../errors.js';
import { preadFullySync, pwriteFullySync } from '../host/fd-io.js';
import { setFsTrace, type FsTraceOp } from '../host/fs-trace.js';
import { STORED_SLACK_BYTES, decodePiece, encodePieceParts, sha256Hex, type Codec } from './codec.js';
import { SEAL_OVERHEAD_BYTES, keyedId, open, pieceAad, seal, type PieceCrypto } from './crypto.js';

/** Where a piece lies in a file: a byte range (in a pack), or null for the whole file (a v1 piece). */
export type PieceRange = ByteRange | null;

/**
 * Where a 'place' into an existing target keeps what it overwrites: the original of the range
 * goes to `fd` at the same offset (its first `keepBytes`: what lies below the target's
 * original end), before the range is written.
 */
export interface PlaceUndo {
  fd: number;
  keepBytes: number;
}

/** A 'place' that failed once it had started to change something: keeping the original (`undo`) or writing the range. */
export interface PlaceFailure {
  stage: 'undo' | 'write';
  code: string;
  message: string;
}

export type PieceTask =
  | { id: number; op: 'encode'; raw: Uint8Array; codec: Codec }
  | { id: number; op: 'decode'; stored: Uint8Array; hash: string; maxRawBytes?: number }
  | { id: number; op: 'place'; file: string; range: PieceRange; hash: string; fd: number; offsetBytes: number; lengthBytes: number; keep: boolean; undo?: PlaceUndo }
  | { id: number; op: 'check'; file: string; range: PieceRange; hash: string; lengthBytes: number };

export type PieceResult =
  | { id: number; op: 'encode'; zero: true; raw: Uint8Array }
  | { id: number; op: 'encode'; zero: false; hash: string; parts: Uint8Array[]; storedBytes: number; raw: Uint8Array; codec: number }
  | { id: number; op: 'decode'; raw: Uint8Array }
  | { id: number; op: 'place'; savedBytes: number; failure?: PlaceFailure }
  | { id: number; op: 'check' }
  | { id: number; error: { code: string; message: string } };

function asBuffer(u: Uint8Array): Buffer {
  return Buffer.from(u.buffer, u.byteOffset, u.byteLength);
}

/** The id of a piece: keyed in an encrypted repository, else its sha256. */
function idOf(crypto: PieceCrypto): (raw: Buffer) => string {
  return crypto.kind === 'aes' ? (raw) => keyedId(crypto.idKey, raw) : sha256Hex;
}

/** Open (if sealed), decode and check a stored piece against its id. */
export function decodeStored(crypto: PieceCrypto, stored: Buffer, id: string, maxRawBytes?: number): Buffer {
  const plain = crypto.kind === 'aes' ? open(crypto.encryptionKey, pieceAad(id), stored, `piece ${id}`) : stored;
  return decodePiece(plain, id, maxRawBytes, idOf(crypto));
}

export function runTask(task: PieceTask, crypto: PieceCrypto): PieceResult {
  try {
    if (task.op === 'encode') {
      const raw = asBuffer(task.raw);
      if (isAllZero(raw)) return { id: task.id, op: 'encode', zero: true, raw };
      const { header, payload } = encodePieceParts(raw, task.codec);
      const hash = idOf(crypto)(raw);
      const parts = crypto.kind === 'aes' ? seal(crypto.encryptionKey, pieceAad(hash), [header, payload]) : [header, payload];
      const storedBytes = parts.reduce((n, p) => n + p.length, 0);
      return { id: task.id, op: 'encode', zero: false, hash, parts, storedBytes, raw, codec: header.readUInt8(5) };
    }
    if (task.op === 'place') return { id: task.id, op: 'place', ...place(task, crypto) };
    if (task.op === 'check') {
      checkLength(decodeStored(crypto, readPieceFile(task.file, task.range, task.hash, task.lengthBytes), task.hash, task.lengthBytes), task.hash, task.lengthBytes);
      return { id: task.id, op: 'check' };
    }
    return { id: task.id, op: 'decode', raw: decodeStored(crypto, asBuffer(task.stored), task.hash, task.maxRawBytes) };
  } catch (err) {
    const code = toBdsnapError(err).code;
    return { id: task.id, error: { code, message: (err as Error).message } };
  }
}

/** Decoded pieces kept for later slots, at most. */
const MAX_KEPT = 32;
const kept = new Map<string, Buffer>();

/** One read buffer per worker, grown as needed: a fresh buffer per piece costs more than the read. */
let readBuffer = Buffer.alloc(0);
/** O_NONBLOCK: a FIFO in place of a piece must not hang the worker (fstat refuses it next). */
const READ_FLAGS = fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK;

/** The stored bytes of a piece, in `readBuffer` (valid until the next call). */
function readPieceFile(file: string, range: PieceRange, hash: string, rawBytes: number): Buffer {
  let fd: number;
  try {
    // `file` names the piece through its directory's descriptor (LocalDirStore.localPath): not
    // following a link at the piece itself keeps the whole path free of links.
    fd = fs.openSync(file, READ_FLAGS);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    // ENOENT, as the store's get says it: a caller tells a missing piece from a damaged one by it.
    if (code === 'ENOENT') throw new BdsnapError('ENOENT', `piece ${hash} is missing`);
    if (code === 'ELOOP') throw new BdsnapError('ECORRUPT', `piece ${hash} is a symbolic link; bdsnap does not follow one in a repository: remove it`);
    throw new BdsnapError('EIO', `cannot read piece ${hash}: ${(err as Error).message}`);
  }
  try {
    const st = fs.fstatSync(fd);
    if (!st.isFile()) throw new BdsnapError('ECORRUPT', `piece ${hash} is not a regular file`);
    if (range) {
      // The index bounds a range by the largest sealed piece (checked when it was read).
      if (range.lengthBytes > rawBytes + STORED_SLACK_BYTES + SEAL_OVERHEAD_BYTES) throw new BdsnapError('ECORRUPT', `piece ${hash} is damaged: the index gives it more bytes than a piece of ${rawBytes} bytes can take`);
      if (readBuffer.length < range.lengthBytes) readBuffer = Buffer.allocUnsafe(range.lengthBytes);
      const got = preadFullySync(fd, readBuffer, range.offsetBytes, range.lengthBytes);
      if (got < range.lengthBytes) throw new BdsnapError('ECORRUPT', `piece ${hash} is damaged: its pack ends before the piece does`);
      return readBuffer.subarray(0, got);
    }
    if (st.size > rawBytes + STORED_SLACK_BYTES) throw new BdsnapError('ECORRUPT', `piece ${hash} is damaged: its file is longer than a piece of ${rawBytes} bytes can be`);
    // One byte more than the largest valid piece file, to tell a longer file from a full read.
    const room = rawBytes + STORED_SLACK_BYTES + 1;
    if (readBuffer.length < room) readBuffer = Buffer.allocUnsafe(room);
    const got = preadFullySync(fd, readBuffer, 0, room);
    if (got === room) throw new BdsnapError('ECORRUPT', `piece ${hash} is damaged: its file is longer than a piece of ${rawBytes} bytes can be`);
    return readBuffer.subarray(0, got);
  } catch (err) {
    if (err instanceof BdsnapError) throw err;
    throw new BdsnapError('EIO', `cannot read piece ${hash}: ${(err as Error).message}`);
  } finally {
    fs.closeSync(fd);
  }
}

function checkLength(raw: Buffer, hash: string, lengthBytes: number): void {
  if (raw.length !== lengthBytes) throw new BdsnapError('ECORRUPT', `piece ${hash} holds ${raw.length} bytes where ${lengthBytes} are needed`);
}

function codeAndMessage(err: unknown): { code: string; message: string } {
  const e = toBdsnapError(err);
  return { code: e.code, message: e.message };
}

/** One buffer per worker for the originals of ranges about to be overwritten. */
let originalBuffer = Buffer.alloc(0);

/**
 * A failure after the original was kept is returned, not thrown, with the bytes kept: the
 * caller must know them to put the range back.
 */
function place(task: Extract<PieceTask, { op: 'place' }>, crypto: PieceCrypto): { savedBytes: number; failure?: PlaceFailure } {
  let raw = kept.get(task.hash);
  if (!raw) {
    raw = decodeStored(crypto, readPieceFile(task.file, task.range, task.hash, task.lengthBytes), task.hash, task.lengthBytes);
    // A raw piece is a view of the read buffer: keep a copy of it.
    if (task.keep && kept.size < MAX_KEPT) kept.set(task.hash, raw.buffer === readBuffer.buffer ? Buffer.from(raw) : raw);
  } else if (!task.keep) {
    kept.delete(task.hash);
  }
  checkLength(raw, task.hash, task.lengthBytes);
  let savedBytes = 0;
  if (task.undo) {
    if (originalBuffer.length < task.lengthBytes) originalBuffer = Buffer.allocUnsafe(task.lengthBytes);
    const original = originalBuffer.subarray(0, task.lengthBytes);
    const got = preadFullySync(task.fd, original, task.offsetBytes);
    original.fill(0, got);
    if (original.equals(raw)) return { savedBytes: 0 };
    if (task.undo.keepBytes > 0) {
      try {
        pwriteFullySync(task.undo.fd, original.subarray(0, task.undo.keepBytes), task.offsetBytes);
      } catch (err) {
        return { savedBytes: 0, failure: { stage: 'undo', ...codeAndMessage(err) } };
      }
      savedBytes = task.undo.keepBytes;
    }
  }
  try {
    pwriteFullySync(task.fd, raw, task.offsetBytes);
  } catch (err) {
    return { savedBytes, failure: { stage: 'write', ...codeAndMessage(err) } };
  }
  return { savedBytes };
}

/** The raw buffer goes back to the caller's pool, and a compressed payload with it. */
function transferables(r: PieceResult): ArrayBuffer[] {
  const out = new Set<ArrayBuffer>();
  for (const u of ['raw' in r ? r.raw : undefined, ...('parts' in r ? r.parts : [])]) {
    // Only a buffer that owns its whole ArrayBuffer can be moved without taking other data along.
    if (u && u.byteOffset === 0 && u.byteLength === u.buffer.byteLength && u.buffer instanceof ArrayBuffer) out.add(u.buffer);
  }
  return [...out];
}

const workerCrypto = (workerData as { crypto?: PieceCrypto } | null)?.crypto ?? { kind: 'none' };
parentPort?.on('message', (task: PieceTask & { trace?: boolean }) => {
  const traced: FsTraceOp[] = [];
  if (task.trace) setFsTrace({ record: (op) => traced.push(op) });
  let result: PieceResult;
  try {
    result = runTask(task, workerCrypto);
  } finally {
    if (task.trace) setFsTrace(undefined);
  }
  // A write's buffers are copied by postMessage, before the next task can reuse them.
  parentPort!.postMessage(traced.length > 0 ? { ...result, traced } : result, transferables(result));
});
// Tells the pool this worker can take tasks (until then the pool works inline).
parentPort?.postMessage({ ready: true });
