/**
 * readPieces: many pieces of a repository read in few requests, each decoded and checked once.
 *
 * The wanted pieces of one pack that lie close together are fetched as one byte range (a run):
 * a run grows while the next piece starts at most MAX_GAP_BYTES after the last one ends and
 * the whole stays within MAX_RUN_BYTES; runs of several packs are in flight at once. On S3 a
 * request costs a round trip and the server's own overhead, some milliseconds, in which a
 * connection moves hundreds of KiB: reading a small gap costs less than a request of its own.
 *
 * Each piece still gets its own outcome: a run that cannot be read whole (a pack cut short,
 * a request that fails) is read again piece by piece, so one bad piece does not taint the
 * good ones around it. A version-1 piece (an object of its own) is a run by itself.
 */

import { BdsnapError, toBdsnapError } from '../errors.js';
import type { PieceLocation } from './pack.js';
import type { PiecePool } from './piece-pool.js';
import type { Repository } from './repository.js';
import { runLimited } from '../run-limited.js';

/** Bytes between two wanted pieces of a pack that are read rather than skipped by a second request. */
export const MAX_GAP_BYTES = 512 * 1024;
/** The longest byte range read at once. */
export const MAX_RUN_BYTES = 4 * 1024 * 1024;
/** Runs being read and decoded at once. */
export const RUNS_IN_FLIGHT = 4;

export interface WantedPiece {
  id: string;
  at: PieceLocation;
}

/** One read: a byte range of an object (lengthBytes null: the whole object, one v1 piece) and the pieces in it. */
export interface PackRun {
  object: string;
  offsetBytes: number;
  lengthBytes: number | null;
  pieces: WantedPiece[];
}

/** The runs that read `wanted`: by object, in offset order, close pieces together. */
export function planRuns(wanted: Iterable<WantedPiece>, maxGapBytes = MAX_GAP_BYTES, maxRunBytes = MAX_RUN_BYTES): PackRun[] {
  const byObject = new Map<string, WantedPiece[]>();
  const runs: PackRun[] = [];
  for (const w of wanted) {
    if (w.at.lengthBytes === null) {
      runs.push({ object: w.at.object, offsetBytes: 0, lengthBytes: null, pieces: [w] });
      continue;
    }
    const list = byObject.get(w.at.object);
    if (list) list.push(w);
    else byObject.set(w.at.object, [w]);
  }
  for (const [object, list] of byObject) {
    list.sort((a, b) => a.at.offsetBytes - b.at.offsetBytes);
    let run: PackRun | undefined;
    for (const w of list) {
      const start = w.at.offsetBytes;
      const end = start + w.at.lengthBytes!;
      const runEnd = run ? run.offsetBytes + run.lengthBytes! : 0;
      if (run && start >= runEnd && start - runEnd <= maxGapBytes && end - run.offsetBytes <= maxRunBytes) {
        run.lengthBytes = end - run.offsetBytes;
        run.pieces.push(w);
      } else {
        run = { object, offsetBytes: start, lengthBytes: end - start, pieces: [w] };
        runs.push(run);
      }
    }
  }
  return runs;
}

export interface ReadPiecesOptions {
  /** Decoded bytes a piece may have at most (checked before decoding); default the repository's piece size. */
  maxRawBytes?(id: string): number;
  /** A piece, decoded and checked against its id; awaited before its run's slot is free. */
  onPiece(id: string, raw: Buffer): Promise<void> | void;
  /** A piece that could not be read or did not check; without it, the first such error is thrown. */
  onError?(id: string, err: BdsnapError): void;
  signal?: AbortSignal;
  /** Runs in flight (default RUNS_IN_FLIGHT). */
  concurrency?: number;
  /**
   * Default MAX_GAP_BYTES; 0 when the pieces wanted are a sparse sample (a verify of one
   * slice), where reading what lies between them would read most of the repository.
   */
  maxGapBytes?: number;
}

/** Read, decode and check every piece of `wanted` (see the file header); each is handed to `onPiece` once. */
export async function readPieces(repo: Repository, pool: PiecePool, wanted: Iterable<WantedPiece>, options: ReadPiecesOptions): Promise<void> {
  const maxRaw = options.maxRawBytes ?? ((): number => repo.pieceSizeBytes);
  const piece = async (w: WantedPiece, stored: Buffer | Promise<Buffer>): Promise<void> => {
    try {
      const raw = await pool.decode(await stored, w.id, maxRaw(w.id));
      await options.onPiece(w.id, raw);
    } catch (err) {
      if (!options.onError) throw err;
      options.onError(w.id, toBdsnapError(err));
    }
  };
  await runLimited(planRuns(wanted, options.maxGapBytes), options.concurrency ?? RUNS_IN_FLIGHT, async (run) => {
    options.signal?.throwIfAborted();
    if (run.pieces.length === 1) {
      const w = run.pieces[0]!;
      await piece(w, repo.readStoredPiece(w.id, w.at));
      return;
    }
    let bytes: Buffer | undefined;
    try {
      if (run.pieces.some((w) => w.at.lengthBytes! > repo.maxStoredPieceBytes)) throw new BdsnapError('ECORRUPT', 'a piece of the run is larger than a piece can be');
      bytes = await repo.store.get(run.object, { offsetBytes: run.offsetBytes, lengthBytes: run.lengthBytes! });
    } catch {
      // Each piece on its own, for its own outcome.
    }
    await Promise.all(run.pieces.map((w) => {
      const from = w.at.offsetBytes - run.offsetBytes;
      return piece(w, bytes ? bytes.subarray(from, from + w.at.lengthBytes!) : repo.readStoredPiece(w.id, w.at));
    }));
  });
}
