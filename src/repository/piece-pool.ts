/**
 * A small pool of piece workers (one per core, two at most on a two-core machine: the main
 * thread needs a share for I/O). Tasks are queued and handed to the first idle worker; the
 * buffers given are transferred, so the caller must not use them afterwards.
 *
 * A worker takes from 50 ms (idle machine) to 300 ms (busy one) to start, longer than a small
 * incremental backup needs in all; until the first worker says it is ready, tasks run inline
 * on the calling thread.
 */

import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { BdsnapError, type ErrorCode } from '../errors.js';
import { fsTrace, type FsTraceOp } from '../host/fs-trace.js';
import type { Codec } from './codec.js';
import type { PieceCrypto } from './crypto.js';
import { runTask, type PieceRange, type PieceResult, type PieceTask, type PlaceFailure, type PlaceUndo } from './piece-worker.js';

const WORKER_URL = new URL('./piece-worker.js', import.meta.url);

/**
 * `raw` is the caller's buffer, handed back; `parts` are the stored piece's bytes in order (for
 * an unencrypted raw piece, `raw` itself is one of them).
 */
export type EncodeResult = { zero: true; raw: Buffer } | { zero: false; hash: string; parts: Buffer[]; storedBytes: number; raw: Buffer; codec: number };

interface Waiter {
  resolve(r: PieceResult): void;
  reject(e: Error): void;
}

type TaskBody =
  | { op: 'encode'; raw: Uint8Array; codec: Codec }
  | { op: 'decode'; stored: Uint8Array; hash: string; maxRawBytes?: number }
  | { op: 'place'; file: string; range: PieceRange; hash: string; fd: number; offsetBytes: number; lengthBytes: number; keep: boolean; undo?: PlaceUndo }
  | { op: 'check'; file: string; range: PieceRange; hash: string; lengthBytes: number };

function toBuffer(u: Uint8Array): Buffer {
  return Buffer.from(u.buffer, u.byteOffset, u.byteLength);
}

/** A buffer that can be transferred: one that owns its whole ArrayBuffer (else a copy). */
function ownBuffer(b: Buffer): Buffer {
  if (b.byteOffset === 0 && b.byteLength === b.buffer.byteLength && b.buffer instanceof ArrayBuffer) return b;
  return Buffer.from(b);
}

export class PiecePool {
  readonly #workers: Worker[] = [];
  /** Ready and waiting for a task. */
  readonly #idle: Worker[] = [];
  #anyReady = false;
  readonly #queue: Array<{ task: PieceTask; transfer: ArrayBuffer[] }> = [];
  readonly #waiting = new Map<number, Waiter>();
  #nextId = 1;
  #failure: Error | undefined;
  #inline = 0;
  readonly #crypto: PieceCrypto;
  #markReady!: () => void;
  /** Resolves once a worker can take tasks; until then tasks run on the calling thread. */
  readonly ready = new Promise<void>((resolve) => (this.#markReady = resolve));

  /** `crypto`: the repository's piece keys (Repository.pieceCrypto); pieces are plain without. */
  constructor(crypto: PieceCrypto = { kind: 'none' }, size = Math.max(1, Math.min(2, availableParallelism()))) {
    this.#crypto = crypto;
    for (let i = 0; i < size; i++) {
      const w = new Worker(WORKER_URL, { workerData: { crypto } });
      w.unref();
      w.on('message', (r: (PieceResult & { traced?: FsTraceOp[] }) | { ready: true }) => {
        if ('ready' in r) {
          this.#anyReady = true;
          this.#markReady();
          this.#dispatch(w);
          return;
        }
        // What the worker wrote, reported on this thread once its answer is here: before
        // anything the caller syncs after it, which is all a crash state built from it needs.
        for (const op of r.traced ?? []) fsTrace?.record(op.op === 'write' ? { ...op, buffers: op.buffers.map((b) => Buffer.from(b.buffer, b.byteOffset, b.byteLength)) } : op);
        this.#done(w, r);
      });
      w.on('error', (err) => this.#fail(new BdsnapError('EIO', `piece worker failed: ${err.message}`, { cause: err })));
      w.on('exit', (code) => {
        if (code !== 0) this.#fail(new BdsnapError('EIO', `piece worker exited with code ${code}`));
      });
      this.#workers.push(w);
    }
  }

  /** Zero check, id, compression and sealing of one piece. `raw` is transferred. */
  async encode(raw: Buffer, codec: Codec): Promise<EncodeResult> {
    const b = ownBuffer(raw);
    const r = await this.#run({ op: 'encode', raw: b, codec }, [b.buffer as ArrayBuffer]);
    if ('error' in r || r.op !== 'encode') throw new BdsnapError('EIO', 'unexpected worker answer');
    if (r.zero) return { zero: true, raw: toBuffer(r.raw) };
    const back = toBuffer(r.raw);
    const parts = r.parts.map((p) => (p.buffer === r.raw.buffer ? back : toBuffer(p)));
    return { zero: false, hash: r.hash, parts, storedBytes: r.storedBytes, raw: back, codec: r.codec };
  }

  /**
   * Decode and check a stored piece against its hash; ECORRUPT if it claims more than
   * `maxRawBytes` (checked before decoding). `stored` is transferred. `urgent`: a client waits
   * for it, so it goes before the tasks queued (a background copy's many pieces).
   */
  async decode(stored: Buffer, hash: string, maxRawBytes?: number, options: { urgent?: boolean } = {}): Promise<Buffer> {
    const b = ownBuffer(stored);
    const r = await this.#run({ op: 'decode', stored: b, hash, maxRawBytes }, [b.buffer as ArrayBuffer], options.urgent);
    if ('error' in r || r.op !== 'decode') throw new BdsnapError('EIO', 'unexpected worker answer');
    return toBuffer(r.raw);
  }

  /**
   * Read, decode, check and write one piece into `fd` (see 'place' in piece-worker.ts). With
   * `undo`, `savedBytes` is what was kept of the original, and a failure to keep it or to
   * write the range comes back as `failure` rather than thrown.
   */
  async place(body: { file: string; range: PieceRange; hash: string; fd: number; offsetBytes: number; lengthBytes: number; keep: boolean; undo?: PlaceUndo }): Promise<{ savedBytes: number; failure?: PlaceFailure }> {
    const r = await this.#run({ op: 'place', ...body }, []);
    if ('error' in r || r.op !== 'place') throw new BdsnapError('EIO', 'unexpected worker answer');
    return { savedBytes: r.savedBytes, failure: r.failure };
  }

  /** Read, decode and check one piece file of `lengthBytes` raw bytes, keeping nothing (see 'check' in piece-worker.ts). */
  async check(body: { file: string; range: PieceRange; hash: string; lengthBytes: number }): Promise<void> {
    const r = await this.#run({ op: 'check', ...body }, []);
    if ('error' in r || r.op !== 'check') throw new BdsnapError('EIO', 'unexpected worker answer');
  }

  /** Tasks run on the calling thread because no worker was ready yet. */
  get tasksRunInline(): number {
    return this.#inline;
  }

  async #run(body: TaskBody, transfer: ArrayBuffer[], urgent = false): Promise<PieceResult> {
    // Before working inline, give the event loop a turn to deliver a worker's 'ready': a caller
    // whose own work is all synchronous (a restore's 'place' tasks) would otherwise never see
    // it and do every task on this thread, leaving the workers idle.
    if (!this.#anyReady) await new Promise((resolve) => setImmediate(resolve));
    if (this.#failure) throw this.#failure;
    const id = this.#nextId++;
    if (!this.#anyReady) {
      const task = { id, ...body } as PieceTask;
      this.#inline++;
      // Inline, its calls are this thread's and recorded as they happen.
      const r = runTask(task, this.#crypto);
      return 'error' in r ? Promise.reject(new BdsnapError(r.error.code as ErrorCode, r.error.message)) : Promise.resolve(r);
    }
    const task = { id, ...body, ...(fsTrace !== undefined ? { trace: true } : {}) } as PieceTask;
    return new Promise<PieceResult>((resolve, reject) => {
      this.#waiting.set(id, {
        resolve: (r) => {
          if ('error' in r) reject(new BdsnapError(r.error.code as ErrorCode, r.error.message));
          else resolve(r);
        },
        reject,
      });
      const w = this.#idle.pop();
      if (w) w.postMessage(task, transfer);
      else if (urgent) this.#queue.unshift({ task, transfer });
      else this.#queue.push({ task, transfer });
    });
  }

  #dispatch(w: Worker): void {
    const next = this.#queue.shift();
    if (next) w.postMessage(next.task, next.transfer);
    else this.#idle.push(w);
  }

  #done(w: Worker, r: PieceResult): void {
    this.#dispatch(w);
    const waiter = this.#waiting.get(r.id);
    this.#waiting.delete(r.id);
    waiter?.resolve(r);
  }

  #fail(err: Error): void {
    this.#failure ??= err;
    for (const w of this.#waiting.values()) w.reject(err);
    this.#waiting.clear();
  }

  async close(): Promise<void> {
    this.#failure ??= new BdsnapError('ESHUTDOWN', 'the piece pool is closed');
    // Not awaited: the workers are unref'd and idle; waiting for their exit costs 50-100 ms.
    for (const w of this.#workers) void w.terminate();
  }
}
