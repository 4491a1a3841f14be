/**
 * createBackup: read each source (all of it, or the pieces its changed ranges touch), store
 * the pieces that are new, and commit the backup by writing its manifest last.
 *
 * Order, and why:
 * 1. A `create` lock is put first, so prune (which takes the exclusive lock) cannot delete a
 *    piece this backup will name while it runs (see lock.ts).
 * 2. The index of stored pieces is read once. A piece whose id is there is not written again
 *    (deduplication across backups, devices and hosts); a piece an incremental takes over
 *    from its base is checked against it too, and read again from the source if it is missing.
 * 3. Pieces are encoded, named and sealed by the pool's workers and collected into packs,
 *    each staged as it fills (see pack.ts); the store's commit makes them durable, and only
 *    then is their index written. A crash or a full disk here leaves only packs no index
 *    names, or an index no manifest uses, or temp files: prune removes them all.
 * 4. The manifest is put last: the backup exists from that instant, complete. Just before, the
 *    lock is checked to have been held all along (lock.ts, assertHeld): a create that stalled
 *    long enough for a prune to take its lock over as stale fails instead of naming pieces that
 *    prune may have deleted.
 */

import os from 'node:os';
import { BdsnapError, toBdsnapError } from '../errors.js';
import { codecFor, type Codec } from '../repository/codec.js';
import { HOST_NAME, compactSlots, expandSlots, newBackupId, slotCountOf, type DeviceEntry, type Manifest } from '../repository/format.js';
import { RepoLock } from '../repository/lock.js';
import { PiecePool } from '../repository/piece-pool.js';
import { coveredPieces, normalizeRanges, touchedPieces, type ByteRange } from './ranges.js';
import type { Repository } from '../repository/repository.js';
import { runLimited } from '../run-limited.js';

/** The input of a backup, one per device. */
export interface BackupSource {
  /** Device path: the key that links backups of the same device. */
  device: string;
  sizeBytes: number;
  read(target: Buffer, offsetBytes: number): Promise<void>;
  /**
   * null: read everything (full). Otherwise the byte ranges changed since `base` (an earlier
   * backup of this device in this repository); the rest is taken from base's manifest.
   */
  changed: ByteRange[] | null;
  /** Backup id the ranges are relative to. */
  base?: string;
  /** Why full or incremental, printed: 'first backup of this device', 'changed blocks since <id>', '--full', ... */
  why: string;
  /** Extents known to read as zeroes (base:allocation), not read. */
  zeroRanges?: ByteRange[];
  /** Recorded in the manifest (change-map generation and number, snapshot id). */
  meta?: Record<string, unknown>;
}

/** Progress in bytes read (or, for verify, checked). */
export interface ProgressSink {
  start(totalBytes: number): void;
  advance(bytes: number): void;
}

export interface CreateOptions {
  progress?: ProgressSink;
  signal?: AbortSignal;
  tags?: string[];
  /** Pieces in flight (read, encode, put); default 12. */
  concurrency?: number;
  /** Codec for new pieces; default: the repository's (config.codec). */
  codec?: Codec;
  /** The host the backup is recorded as made by; default this machine's hostname (hostOf). */
  host?: string;
  /**
   * Called once every piece is durable and indexed, before the manifest: throws to record
   * nothing (what was read is no longer what the source was at its point).
   */
  beforeCommit?: () => Promise<void>;
}

export interface DeviceSummary {
  device: string;
  kind: 'full' | 'incremental';
  base: string | null;
  why: string;
  sizeBytes: number;
  readBytes: number;
  newPieces: number;
  newStoredBytes: number;
  reusedPieces: number;
  zeroPieces: number;
}

export interface BackupSummary {
  id: string;
  host: string;
  startTime: string;
  endTime: string;
  durationMs: number;
  devices: DeviceSummary[];
  readBytes: number;
  newPieces: number;
  newStoredBytes: number;
}

const DEFAULT_CONCURRENCY = 12;

interface Plan {
  source: BackupSource;
  slots: Array<string | null>;
  toRead: number[];
  baseId: string | null;
}

export async function createBackup(repo: Repository, sources: BackupSource[], options: CreateOptions = {}): Promise<BackupSummary> {
  if (sources.length === 0) throw new BdsnapError('EINVAL', 'nothing to back up');
  const seen = new Set<string>();
  for (const s of sources) {
    if (seen.has(s.device)) throw new BdsnapError('EINVAL', `${s.device} is given twice`);
    seen.add(s.device);
  }
  const host = hostOf(options);
  const startTime = new Date();
  const id = newBackupId(startTime);
  const packs = repo.packWriter();
  const lock = await RepoLock.acquire(repo.store, 'create');
  const pool = new PiecePool(repo.pieceCrypto);
  try {
    const stored = await repo.storedPieceNames();
    const plans: Plan[] = [];
    for (const source of sources) plans.push(await planSource(repo, source, stored));
    options.progress?.start(plans.reduce((n, p) => n + p.toRead.reduce((m, i) => m + pieceLength(repo, p.source, i), 0), 0));

    const codec = options.codec ?? codecFor(repo.config.codec);
    // Piece buffers are reused: fresh memory costs page faults on every piece.
    const free: Buffer[] = [];
    const P = repo.pieceSizeBytes;
    const puts = new Map<string, Promise<void>>();
    const entries: DeviceEntry[] = [];
    const summaries: DeviceSummary[] = [];
    for (const plan of plans) {
      const { source, slots } = plan;
      let readBytes = 0;
      let newPieces = 0;
      let newStoredBytes = 0;
      await runLimited(plan.toRead, options.concurrency ?? DEFAULT_CONCURRENCY, async (i) => {
        options.signal?.throwIfAborted();
        const length = pieceLength(repo, source, i);
        const raw = length === P ? (free.pop() ?? Buffer.allocUnsafe(P)) : Buffer.allocUnsafe(length);
        try {
          await source.read(raw, i * repo.pieceSizeBytes);
        } catch (err) {
          const e = toBdsnapError(err);
          throw new BdsnapError(e.code, `cannot read ${source.device} at ${i * repo.pieceSizeBytes}: ${e.message}`, { cause: err });
        }
        readBytes += length;
        const piece = await pool.encode(raw, codec);
        if (piece.zero) {
          slots[i] = null;
        } else {
          slots[i] = piece.hash;
          if (!stored.has(piece.hash)) {
            let put = puts.get(piece.hash);
            if (!put) {
              put = packs.add(piece.hash, piece.parts);
              puts.set(piece.hash, put);
              newPieces++;
              newStoredBytes += piece.storedBytes;
            }
            await put;
          }
        }
        // An unencrypted raw piece is stored as it is: its buffer lives on in the pack.
        if (piece.raw.length === P && (piece.zero || !piece.parts.includes(piece.raw))) free.push(piece.raw);
        options.progress?.advance(length);
      });
      for (const h of puts.keys()) stored.add(h);
      const full = source.changed === null;
      const meta = source.meta ?? {};
      entries.push({
        device: source.device, sizeBytes: source.sizeBytes, kind: full ? 'full' : 'incremental', base: plan.baseId, why: source.why,
        pieces: compactSlots(slots), readBytes, newPieces, newStoredBytes, meta,
      });
      const zeroPieces = slots.filter((s) => s === null).length;
      summaries.push({
        device: source.device, kind: full ? 'full' : 'incremental', base: plan.baseId, why: source.why, sizeBytes: source.sizeBytes,
        readBytes, newPieces, newStoredBytes, zeroPieces, reusedPieces: slots.length - zeroPieces - newPieces,
      });
    }
    options.signal?.throwIfAborted();
    // Every piece the manifest names is in the store, whole and durable, and indexed, before the manifest.
    await repo.commitPacks(await packs.finish());
    await options.beforeCommit?.();
    // ... and still there: no prune took this backup's lock over while it ran (lock.ts).
    await lock.assertHeld('this backup', 'a prune may have deleted pieces it names; nothing was recorded; run the backup again');
    const endTime = new Date();
    const manifest: Manifest = {
      format: 'bdsnap-backup', version: 1, id, startTime: startTime.toISOString(), endTime: endTime.toISOString(),
      pieceSizeBytes: repo.pieceSizeBytes, tags: options.tags ?? [], host, devices: entries,
    };
    await repo.putManifest(manifest);
    return {
      id, host, startTime: manifest.startTime, endTime: manifest.endTime, durationMs: endTime.getTime() - startTime.getTime(), devices: summaries,
      readBytes: summaries.reduce((n, d) => n + d.readBytes, 0),
      newPieces: summaries.reduce((n, d) => n + d.newPieces, 0),
      newStoredBytes: summaries.reduce((n, d) => n + d.newStoredBytes, 0),
    };
  } catch (err) {
    await repo.store.discard();
    if (options.signal?.aborted) throw new BdsnapError('ESHUTDOWN', 'the backup was interrupted; nothing was recorded', { cause: err });
    throw err;
  } finally {
    await pool.close();
    await lock.release().catch(() => undefined);
  }
}

/** The host a backup is made for: `--host`, or this machine's hostname. EINVAL if it is not a plain host name. */
export function hostOf(options: { host?: string }): string {
  const host = options.host ?? os.hostname();
  if (!HOST_NAME.test(host)) {
    throw new BdsnapError('EINVAL', options.host === undefined
      ? `this machine's hostname "${host}" cannot name backups (letters, digits, '.', '_' and '-'); give --host NAME`
      : `bad --host "${host}": letters, digits, '.', '_' and '-', at most 253`);
  }
  return host;
}

function pieceLength(repo: Repository, source: BackupSource, i: number): number {
  return Math.min(repo.pieceSizeBytes, source.sizeBytes - i * repo.pieceSizeBytes);
}

/** Which pieces to read; the others come from the base backup or are known zeroes. */
async function planSource(repo: Repository, source: BackupSource, stored: Set<string>): Promise<Plan> {
  const P = repo.pieceSizeBytes;
  if (!Number.isSafeInteger(source.sizeBytes) || source.sizeBytes < 0) throw new BdsnapError('EINVAL', `bad size of ${source.device}: ${source.sizeBytes}`);
  const count = slotCountOf(source.device, source.sizeBytes, P);
  let slots: Array<string | null> = new Array<string | null>(count).fill(null);
  let read: (i: number) => boolean = () => true;
  let baseId: string | null = null;
  if (source.changed !== null) {
    if (source.base === undefined) throw new BdsnapError('EINVAL', `an incremental backup of ${source.device} needs a base backup`);
    const base = await repo.manifest(source.base).catch((err: unknown) => {
      if (err instanceof BdsnapError && err.code === 'ENOENT') return undefined;
      throw err;
    });
    if (base === undefined) {
      // Forgotten since this backup chose it (a forget running alongside): read everything.
      return planSource(repo, { ...source, changed: null, base: undefined, why: `${source.why}; base backup ${source.base} was forgotten meanwhile, so full` }, stored);
    }
    const entry = base.devices.find((d) => d.device === source.device);
    if (!entry) throw new BdsnapError('EINVAL', `base backup ${source.base} has no ${source.device}`);
    if (entry.sizeBytes !== source.sizeBytes) {
      throw new BdsnapError('EINVAL', `${source.device} is ${source.sizeBytes} bytes, but ${entry.sizeBytes} in base backup ${source.base}; a full backup is needed`);
    }
    slots = expandSlots(entry, P);
    const touched = touchedPieces(normalizeRanges(source.changed, source.sizeBytes), P);
    // A base piece that has gone missing is read again rather than inherited.
    read = (i) => touched.has(i) || (slots[i] !== null && !stored.has(slots[i]!));
    baseId = source.base;
  }
  const zero = coveredPieces(normalizeRanges(source.zeroRanges ?? [], source.sizeBytes), P, source.sizeBytes);
  const toRead: number[] = [];
  for (let i = 0; i < count; i++) {
    if (!read(i)) continue;
    if (zero.has(i)) slots[i] = null;
    else toRead.push(i);
  }
  return { source, slots, toRead, baseId };
}
