/**
 * restoreBackup: write one device of a backup, whole, to the device itself or to a new file.
 * The target ends with the backup's content or as it was: a restore that fails leaves no
 * half-written target.
 *
 * Before a byte is written: the manifest must read, the device must be in it, every piece it
 * needs must be in the index, and the target must be a regular file or a block device that is
 * not in use (see openRestoreTarget).
 *
 * A target restored in place (the device, or an existing file) is changed only once every
 * piece it needs has been read (a byte range of its pack), authenticated, decoded and checked
 * against its id: a damaged or missing piece refuses the restore with its name, its pack and the
 * backup's, in verify's words (piece-faults.ts), which buys a refusal instead of a rollback for
 * the common failure. From a local directory that
 * first pass keeps nothing, and each piece is read and checked again as it is written (by the
 * pool's threads, straight from the pack file): measured here on a 256 MiB image (516 distinct
 * pieces, 129 MiB of them) with the repository in the page cache, 0.2 s of CPU and 0.1 to
 * 0.25 s of wall time on top of about 0.5 s. From a remote store a second fetch would cost as
 * much as the first, so the pieces are fetched a few MiB of a pack at a time (pack-reader.ts),
 * decoded once, and their checked content kept in a private spool file (piece-spool.ts) that
 * the write pass reads: a local file in the page cache, where the device's distinct pieces may
 * not fit in memory.
 *
 * A new file (`--output` naming nothing yet) is written under a temporary name and named only
 * once whole and durable (restore-target.ts), so nothing is at stake while it is written: each
 * piece is read, checked and written in one pass, and a damaged one removes the temporary file
 * and names the piece. From S3 that saves the spool's write and read of every distinct piece
 * and lets the writes overlap the fetches: a 1 GiB restore (the backup bench's image, radosgw on
 * this machine) took 5.0-5.2 s with the spool (2.3-2.5 s fetching, 2.5 s writing from the
 * spool), 2.6-3.0 s in one pass.
 *
 * A write can still fail midway (a disk error, a piece damaged since it was checked). Then the
 * target undoes what was written: a new file is removed, an existing file or device gets its
 * original bytes back (restore-target.ts). A restore in place that was killed is found by the
 * next one into the same target, of any backup, which finishes it (restore-target.ts).
 * Zero pieces are holes in a new file, and elsewhere zeroes written where the range is not zero.
 */

import fs from 'node:fs';
import path from 'node:path';
import { BdsnapError, toBdsnapError } from '../errors.js';
import type { ProgressSink } from './create.js';
import { expandSlots } from '../repository/format.js';
import { pieceRange, type PieceLocation } from '../repository/pack.js';
import { readPieces } from '../repository/pack-reader.js';
import { PiecePool } from '../repository/piece-pool.js';
import type { Repository } from '../repository/repository.js';
import { PieceFaults, describeFaults, mendAdvice } from './piece-faults.js';
import { PieceSpool } from './piece-spool.js';
import { openRestoreTarget, type RestoreTarget, type SizeBefore } from './restore-target.js';
import { runLimited } from '../run-limited.js';

/** Pieces being read, decoded or written at once. */
const PIECES_IN_FLIGHT = 8;
/** Written bytes handed to writeback at a time (see startWriteback). */
const WRITEBACK_WINDOW_BYTES = 16 * 1024 * 1024;

export interface RestoreOptions {
  /** Write a new file here instead of the device. */
  output?: string;
  progress?: ProgressSink;
  signal?: AbortSignal;
}

export interface RestoreSummary {
  id: string;
  device: string;
  target: string;
  sizeBytes: number;
  writtenBytes: number;
  zeroPieces: number;
  durationMs: number;
  /** Files killed restores into the same new file left beside it (see RestoreTarget.leftovers). */
  leftovers: string[];
  /** An earlier restore in place into the target, killed half way, that this one finished. */
  finished?: { backup: string; startedAt: string };
  /** The size an existing target had, where it differed from the backup's (see RestoreTarget.sizeBefore). */
  sizeBefore?: SizeBefore;
}

export async function restoreBackup(repo: Repository, id: string, device: string, options: RestoreOptions = {}): Promise<RestoreSummary> {
  const startedMs = Date.now();
  const manifest = await repo.manifest(id);
  const entry = manifest.devices.find((d) => d.device === device) ?? manifest.devices.find((d) => d.device === path.resolve(device));
  if (!entry) throw await noSuchDevice(id, manifest.devices.map((d) => d.device), device);
  const P = manifest.pieceSizeBytes;
  const slots = expandSlots(entry, P);
  const output = options.output !== undefined ? path.resolve(options.output) : undefined;
  const command = `bdsnap backup restore --repo ${repo.store.location} ${id} ${entry.device}${output !== undefined ? ` --output ${output}` : ''}`;
  const target = await openRestoreTarget(output ?? entry.device, output !== undefined, entry.sizeBytes, { backup: id, command }, options.output ?? device);
  const pool = new PiecePool(repo.pieceCrypto);
  const faults = new PieceFaults(repo);
  const advice = mendAdvice(repo.store.location, [id], [entry.device], true);
  // Pieces kept as local files are read where they are; others are fetched once.
  const remote = !repo.store.localPath;
  let spool: PieceSpool | undefined;
  try {
    const needed = neededPieces(slots, P, entry.sizeBytes);
    const index = await repo.pieceIndex();
    await checkIndexed(id, needed, index, faults, advice);
    const toWrite = slots.map((_, i) => i).filter((i) => slots[i] !== null || !target.holes);
    const writeBytes = toWrite.reduce((n, i) => n + Math.min(P, entry.sizeBytes - i * P), 0);
    const neededBytes = [...needed.values()].reduce((n, b) => n + b, 0);
    options.progress?.start((target.checkFirst ? neededBytes : 0) + writeBytes);
    if (target.checkFirst) {
      if (remote) spool = await PieceSpool.create(neededBytes);
      await checkPieces(repo, id, needed, index, pool, spool, options, faults, advice);
    }
    let writtenBytes: number;
    try {
      await target.begin();
      writtenBytes = remote && !target.checkFirst
        ? await streamSlots(repo, slots, index, needed, entry.sizeBytes, P, target, pool, faults, options)
        : await writeSlots(repo, id, slots, index, toWrite, entry.sizeBytes, P, target, pool, spool, faults, options);
      await target.commit();
    } catch (err) {
      const e = toBdsnapError(err);
      // A bad piece met while writing a new file: refused like one met by the check pass.
      const fault = target.checkFirst ? undefined : await faults.of(err);
      if (fault) throw new BdsnapError('ECORRUPT', `cannot restore backup ${id}: ${fault.text}; ${await target.abandon()}; ${advice}`, { cause: err });
      throw new BdsnapError(e.code, `${e.message}; ${await target.abandon()}`, { cause: err });
    }
    return {
      id, device: entry.device, target: target.path, sizeBytes: entry.sizeBytes, writtenBytes, zeroPieces: slots.filter((s) => s === null).length, durationMs: Date.now() - startedMs,
      leftovers: await target.leftovers(),
      ...(target.interrupted && { finished: { backup: target.interrupted.backup, startedAt: target.interrupted.startedAt } }),
      ...(target.sizeBefore && { sizeBefore: target.sizeBefore }),
    };
  } finally {
    await pool.close();
    await spool?.close();
    await target.close();
  }
}

/**
 * `device` is none of `has`. A symbolic link to one of them is said to be one: a restore takes
 * the device by the name its backup gives it, not by another that leads there.
 */
async function noSuchDevice(id: string, has: string[], device: string): Promise<BdsnapError> {
  const real = await fs.promises.realpath(device).catch(() => undefined);
  const linked = real !== undefined && real !== path.resolve(device) ? real : undefined;
  if (linked !== undefined && has.includes(linked)) {
    return new BdsnapError('ENOENT', `backup ${id} has no device ${device}: that name is a symbolic link to ${linked}, which the backup has; a restore takes the device by the name its backup gives it: give ${linked}`);
  }
  return new BdsnapError('ENOENT', `backup ${id} has no device ${device}${linked !== undefined ? ` (a symbolic link to ${linked})` : ''} (it has ${has.join(', ')})`);
}

/** Each distinct piece of `slots` with its length (only the last slot may be shorter than P). */
function neededPieces(slots: Array<string | null>, P: number, sizeBytes: number): Map<string, number> {
  const needed = new Map<string, number>();
  slots.forEach((hash, i) => {
    if (hash !== null && !needed.has(hash)) needed.set(hash, Math.min(P, sizeBytes - i * P));
  });
  return needed;
}

/**
 * Every needed piece must be in the index: one that is not (verify dropped it, or an index
 * object is lost) refuses the restore before anything is read, named as verify names it.
 */
async function checkIndexed(id: string, needed: Map<string, number>, index: Map<string, PieceLocation>, faults: PieceFaults, advice: string): Promise<void> {
  const unplaced = [...needed.keys()].filter((h) => !index.has(h));
  if (unplaced.length === 0) return;
  const found = await Promise.all(unplaced.map((h) => faults.unplaced(h)));
  throw new BdsnapError('ECORRUPT', `cannot restore backup ${id}: ${describeFaults(found)}; nothing was written; ${advice}`);
}

/**
 * The first pass: every needed piece is read, decoded and checked, as the write pass will; kept
 * in `spool` when given, else (a local store) kept nothing of. Stops at the first missing or
 * damaged piece, with the backup's name and where to see the rest.
 */
async function checkPieces(
  repo: Repository, id: string, needed: Map<string, number>, index: Map<string, PieceLocation>, pool: PiecePool, spool: PieceSpool | undefined, options: RestoreOptions,
  faults: PieceFaults, advice: string,
): Promise<void> {
  const refuse = async (err: unknown): Promise<BdsnapError> => {
    const e = toBdsnapError(err);
    const fault = await faults.of(err);
    return new BdsnapError(e.code === 'ENOENT' ? 'ECORRUPT' : e.code, `cannot restore backup ${id}: ${fault?.text ?? e.message}; nothing was written; ${advice}`, { cause: err });
  };
  if (spool) {
    try {
      await readPieces(repo, pool, [...needed.keys()].map((hash) => ({ id: hash, at: index.get(hash)! })), {
        maxRawBytes: (hash) => needed.get(hash)!,
        onPiece: async (hash, raw) => {
          const lengthBytes = needed.get(hash)!;
          if (raw.length !== lengthBytes) throw new BdsnapError('ECORRUPT', `piece ${hash} holds ${raw.length} bytes where ${lengthBytes} are needed`);
          await spool.add(hash, raw);
          options.progress?.advance(lengthBytes);
        },
        onError: (hash, e) => {
          throw faults.tag(hash, e);
        },
        signal: options.signal,
      });
    } catch (err) {
      throw await refuse(err);
    }
    return;
  }
  const localPath = repo.store.localPath!.bind(repo.store);
  await runLimited(needed, PIECES_IN_FLIGHT, async ([hash, lengthBytes]) => {
    options.signal?.throwIfAborted();
    try {
      const at = index.get(hash)!;
      await pool.check({ file: localPath(at.object), range: pieceRange(at), hash, lengthBytes });
    } catch (err) {
      throw await refuse(faults.tag(hash, err));
    }
    options.progress?.advance(lengthBytes);
  });
}

/**
 * One pass from a remote store into a new file: each needed piece fetched, decoded and checked
 * (readPieces), then written into every slot that holds it. Zero slots are the new file's
 * holes. Returns the bytes written.
 */
async function streamSlots(
  repo: Repository, slots: Array<string | null>, index: Map<string, PieceLocation>, needed: Map<string, number>, sizeBytes: number, P: number, target: RestoreTarget, pool: PiecePool,
  faults: PieceFaults, options: RestoreOptions,
): Promise<number> {
  const slotsOf = new Map<string, number[]>();
  slots.forEach((hash, i) => {
    if (hash === null) return;
    const list = slotsOf.get(hash);
    if (list) list.push(i);
    else slotsOf.set(hash, [i]);
  });
  const hints = new WritebackHints(target);
  let writtenBytes = 0;
  await readPieces(repo, pool, [...needed.keys()].map((hash) => ({ id: hash, at: index.get(hash)! })), {
    maxRawBytes: (hash) => needed.get(hash)!,
    onPiece: async (hash, raw) => {
      for (const i of slotsOf.get(hash)!) {
        const length = Math.min(P, sizeBytes - i * P);
        if (raw.length !== length) throw new BdsnapError('ECORRUPT', `piece ${hash} holds ${raw.length} bytes where slot ${i} of the backup needs ${length}`);
        await target.put(i * P, raw);
        writtenBytes += length;
        options.progress?.advance(length);
        hints.written(i * P, length);
      }
    },
    // Tagged with its piece, for the refusal to name (a target's failure is told apart there by its code).
    onError: (hash, e) => {
      throw faults.tag(hash, e);
    },
    signal: options.signal,
  });
  return writtenBytes;
}

/**
 * Written ranges handed to writeback a window at a time (see BlockDevice.startWriteback), so
 * the final flush has less left to do. Writes come in no set order (pack order, or slots
 * finishing out of turn): the window is the span of what was written since the last hint,
 * which may cover ranges still being written; the final flush covers those.
 */
class WritebackHints {
  #from = Infinity;
  #to = 0;
  #bytes = 0;
  constructor(private readonly target: RestoreTarget) {}

  written(offsetBytes: number, lengthBytes: number): void {
    this.#from = Math.min(this.#from, offsetBytes);
    this.#to = Math.max(this.#to, offsetBytes + lengthBytes);
    this.#bytes += lengthBytes;
    if (this.#bytes < WRITEBACK_WINDOW_BYTES) return;
    this.target.startWriteback(this.#from, this.#to - this.#from);
    this.#from = Infinity;
    this.#to = 0;
    this.#bytes = 0;
  }
}

/** The second pass: every slot of `toWrite` into the target, from `spool` when given. Returns the bytes written. */
async function writeSlots(
  repo: Repository, id: string, slots: Array<string | null>, index: Map<string, PieceLocation>, toWrite: number[], sizeBytes: number, P: number, target: RestoreTarget, pool: PiecePool,
  spool: PieceSpool | undefined, faults: PieceFaults, options: RestoreOptions,
): Promise<number> {
  // A piece that fills many slots (a repeated pattern) is kept decoded by the worker that
  // placed it while more slots use it.
  const uses = new Map<string, number>();
  for (const h of slots) if (h !== null) uses.set(h, (uses.get(h) ?? 0) + 1);
  const localPath = repo.store.localPath?.bind(repo.store);
  let writtenBytes = 0;
  const hints = new WritebackHints(target);
  await runLimited(toWrite, PIECES_IN_FLIGHT, async (i) => {
    options.signal?.throwIfAborted();
    const hash = slots[i]!;
    const length = Math.min(P, sizeBytes - i * P);
    try {
      if (hash === null) {
        await target.put(i * P, { zeroBytes: length });
      } else if (spool) {
        const raw = await spool.read(hash);
        if (raw.length !== length) throw new BdsnapError('ECORRUPT', `piece ${hash} holds ${raw.length} bytes where backup ${id} needs ${length}`);
        await target.put(i * P, raw);
      } else {
        const left = uses.get(hash)! - 1;
        uses.set(hash, left);
        const at = index.get(hash);
        if (!at) throw new BdsnapError('ECORRUPT', `piece ${hash} is missing`);
        await target.place(pool, { file: localPath!(at.object), range: pieceRange(at), hash, offsetBytes: i * P, lengthBytes: length, keep: left > 0 });
      }
    } catch (err) {
      const e = toBdsnapError(err);
      // A new file's bad piece is refused by name (restoreBackup), wherever it was met.
      if (!target.checkFirst && hash !== null && (e.code === 'ECORRUPT' || e.code === 'ENOENT')) throw faults.tag(hash, e);
      throw new BdsnapError(e.code, `restore of ${target.path} from backup ${id} stopped at ${i * P}: ${e.message}`, { cause: err });
    }
    writtenBytes += length;
    options.progress?.advance(length);
    hints.written(i * P, length);
  });
  return writtenBytes;
}
