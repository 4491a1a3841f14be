/**
 * Worker thread of the piece pool: the CPU-heavy part of a piece (zero check, sha256,
 * compression; or decompression and the hash check on the way back), so that both cores work
 * while the main thread moves bytes between the source, the store and the target.
 */

import { parentPort } from 'node:worker_threads';
import { BdsnapError } from '../errors.js';
import { decodePiece, encodePieceParts, sha256Hex, type Codec } from './codec.js';

export type PieceTask =
  | { id: number; op: 'encode'; raw: Uint8Array; codec: Codec }
  | { id: number; op: 'decode'; stored: Uint8Array; hash: string };

export type PieceResult =
  | { id: number; op: 'encode'; zero: true; raw: Uint8Array }
  | { id: number; op: 'encode'; zero: false; hash: string; header: Uint8Array; payload: Uint8Array; raw: Uint8Array; codec: number }
  | { id: number; op: 'decode'; raw: Uint8Array }
  | { id: number; error: { code: string; message: string } };

let zeros = Buffer.alloc(0);

function isZero(buf: Buffer): boolean {
  if (zeros.length < buf.length) zeros = Buffer.alloc(buf.length);
  return buf.equals(zeros.subarray(0, buf.length));
}

function asBuffer(u: Uint8Array): Buffer {
  return Buffer.from(u.buffer, u.byteOffset, u.byteLength);
}

export function runTask(task: PieceTask): PieceResult {
  try {
    if (task.op === 'encode') {
      const raw = asBuffer(task.raw);
      if (isZero(raw)) return { id: task.id, op: 'encode', zero: true, raw };
      const { header, payload } = encodePieceParts(raw, task.codec);
      return { id: task.id, op: 'encode', zero: false, hash: sha256Hex(raw), header, payload, raw, codec: header.readUInt8(5) };
    }
    return { id: task.id, op: 'decode', raw: decodePiece(asBuffer(task.stored), task.hash) };
  } catch (err) {
    const code = err instanceof BdsnapError ? err.code : 'EIO';
    return { id: task.id, error: { code, message: (err as Error).message } };
  }
}

/** The raw buffer goes back to the caller's pool, and a compressed payload with it. */
function transferables(r: PieceResult): ArrayBuffer[] {
  const out = new Set<ArrayBuffer>();
  for (const u of ['raw' in r ? r.raw : undefined, 'payload' in r ? r.payload : undefined]) {
    // Only a buffer that owns its whole ArrayBuffer can be moved without taking other data along.
    if (u && u.byteOffset === 0 && u.byteLength === u.buffer.byteLength && u.buffer instanceof ArrayBuffer) out.add(u.buffer);
  }
  return [...out];
}

parentPort?.on('message', (task: PieceTask) => {
  const result = runTask(task);
  parentPort!.postMessage(result, transferables(result));
});
// Tells the pool this worker can take tasks (until then the pool works inline).
parentPort?.postMessage({ ready: true });
