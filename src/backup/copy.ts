/**
 * copyBackups: replicate backups from one repository into another (a fast local one to an
 * off-site one, or an old version-1 repository into a new encrypted one), over any stores.
 *
 * Each piece a copied backup names is read from the source and checked there (authenticated,
 * decoded, its id checked), then named and sealed under the destination's keys; a piece the
 * destination already has under that id is not written. New pieces go into packs, which are
 * committed, read back and checked, and indexed before any manifest is written; the manifests
 * come last, one per backup, with the destination's ids: a copy that stops midway leaves no
 * backup half there. A backup whose id the destination holds already is skipped.
 *
 * Both repositories hold a `create` lock meanwhile (purposes `copy-from` and `copy-to`, so that a
 * prune refused says it is a copy), so neither's prune runs under the copy.
 */

import { BdsnapError } from '../errors.js';
import { codecFor } from '../repository/codec.js';
import { compactSlots, expandSlots, type Manifest } from '../repository/format.js';
import { RepoLock } from '../repository/lock.js';
import { PiecePool } from '../repository/piece-pool.js';
import type { Repository } from '../repository/repository.js';
import { runLimited } from '../run-limited.js';
import type { ProgressSink } from './create.js';

export interface CopyOptions {
  /** Only these backups; default every backup the destination does not have. */
  ids?: string[];
  progress?: ProgressSink;
  signal?: AbortSignal;
}

export interface CopySummary {
  copied: string[];
  /** Backups the destination had already. */
  skipped: string[];
  /** Distinct pieces read from the source. */
  readPieces: number;
  /** Pieces written into the destination (the others it had). */
  newPieces: number;
  newStoredBytes: number;
}

const PIECES_IN_FLIGHT = 8;

export async function copyBackups(from: Repository, to: Repository, options: CopyOptions = {}): Promise<CopySummary> {
  if (from.pieceSizeBytes !== to.pieceSizeBytes) {
    throw new BdsnapError('EINVAL', `${from.store.location} has pieces of ${from.pieceSizeBytes} bytes and ${to.store.location} of ${to.pieceSizeBytes}: a copy needs the same piece size (init the destination with --piece-size ${from.pieceSizeBytes})`);
  }
  const fromIds = await from.backupIds();
  const ids = options.ids ?? fromIds;
  for (const id of ids) if (!fromIds.includes(id)) throw new BdsnapError('ENOENT', `there is no backup ${id} in ${from.store.location}`);
  const have = new Set(await to.backupIds());
  const todo = ids.filter((id) => !have.has(id));
  const summary: CopySummary = { copied: [], skipped: ids.filter((id) => have.has(id)), readPieces: 0, newPieces: 0, newStoredBytes: 0 };
  if (todo.length === 0) return summary;

  const packs = to.packWriter();
  const fromLock = await RepoLock.acquire(from.store, 'create', { purpose: 'copy-from' });
  let toLock: RepoLock | undefined;
  const fromPool = new PiecePool(from.pieceCrypto);
  const toPool = new PiecePool(to.pieceCrypto);
  try {
    toLock = await RepoLock.acquire(to.store, 'create', { purpose: 'copy-to' });
    const manifests: Manifest[] = [];
    for (const id of todo) manifests.push(await from.manifest(id));
    const fromIndex = await from.pieceIndex();
    const toStored = await to.storedPieceNames();
    // Source id -> destination id, for every distinct piece of the copied backups.
    const renamed = new Map<string, string>();
    for (const m of manifests) for (const d of m.devices) for (const s of d.pieces) if (typeof s === 'string') renamed.set(s, '');
    // In raw bytes, as create's and restore's bars (every piece counted whole: a bound).
    options.progress?.start(renamed.size * from.pieceSizeBytes);
    const codec = codecFor(to.config.codec);
    const written = new Set<string>();
    await runLimited([...renamed.keys()], PIECES_IN_FLIGHT, async (fromId) => {
      options.signal?.throwIfAborted();
      const at = fromIndex.get(fromId);
      if (!at) throw new BdsnapError('ECORRUPT', `piece ${fromId} is missing from ${from.store.location}; nothing was copied; run 'bdsnap backup verify --repo ${from.store.location}'`);
      const raw = await fromPool.decode(await from.readStoredPiece(fromId, at), fromId, from.pieceSizeBytes);
      summary.readPieces++;
      const piece = await toPool.encode(raw, codec);
      if (piece.zero) throw new BdsnapError('ECORRUPT', `piece ${fromId} of ${from.store.location} is all zeroes, which no piece is`);
      renamed.set(fromId, piece.hash);
      if (!toStored.has(piece.hash) && !written.has(piece.hash)) {
        written.add(piece.hash);
        summary.newPieces++;
        summary.newStoredBytes += piece.storedBytes;
        await packs.add(piece.hash, piece.parts);
      }
      options.progress?.advance(piece.raw.length);
    });
    const newPacks = await packs.finish();
    await to.store.commit();
    // What was written is read back and checked before any backup names it.
    const check = new PiecePool(to.pieceCrypto);
    try {
      await runLimited(newPacks.flatMap((p) => p.pieces.map((e) => ({ object: p.object, ...e }))), PIECES_IN_FLIGHT, async (e) => {
        await check.decode(await to.readStoredPiece(e.id, e), e.id, to.pieceSizeBytes);
      });
    } finally {
      await check.close();
    }
    await to.commitPacks(newPacks);
    for (const m of manifests) {
      options.signal?.throwIfAborted();
      const devices = m.devices.map((d) => ({
        ...d, pieces: compactSlots(expandSlots(d, m.pieceSizeBytes).map((s) => (s === null ? null : renamed.get(s)!))),
      }));
      await to.putManifest({ ...m, devices });
      summary.copied.push(m.id);
    }
    return summary;
  } catch (err) {
    await to.store.discard();
    throw err;
  } finally {
    await fromPool.close();
    await toPool.close();
    await toLock?.release().catch(() => undefined);
    await fromLock.release().catch(() => undefined);
  }
}
