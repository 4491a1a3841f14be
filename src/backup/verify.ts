/**
 * verify: every piece the chosen backups name is read, decoded and checked against its hash
 * (or, with a subset, the pieces of that slice: data-subset.ts; every piece is still looked up).
 * The answer names each damaged backup (unreadable manifest, missing or damaged pieces) and
 * each bad piece with the backups that use it.
 *
 * A damaged piece (it fails authentication, or does not decode to its id) is dropped from the
 * index (Repository.dropPieces): nothing can use it, and while it is listed every later backup
 * would take it as stored and name it again (a full one by deduplication, an incremental by
 * inheritance). Once it is unknown, the next backup of a device that still holds that content
 * reads it again and stores it under the same id, which mends every backup that names it. The
 * index keeps what it was dropped for, so a later verify or restore names it in the same word
 * (piece-faults.ts). A piece whose read failed for another reason (the store unreachable past
 * its retries, a disk error, a permission) is neither: it is reported as not read and kept.
 */

import { toBdsnapError } from '../errors.js';
import { countOf } from '../units.js';
import type { ProgressSink } from './create.js';
import { readPieces } from '../repository/pack-reader.js';
import { PiecePool } from '../repository/piece-pool.js';
import type { Repository } from '../repository/repository.js';
import { formatDataSubset, inDataSubset, type DataSubset } from './data-subset.js';
import { PieceFaults, type PieceFault } from './piece-faults.js';
import type { PieceProblem } from '../repository/pack.js';

export interface VerifyOptions {
  /** One backup; default all. */
  id?: string;
  progress?: ProgressSink;
  signal?: AbortSignal;
  /** Read only this slice of the pieces (every piece is still checked to exist). */
  subset?: DataSubset;
}

export interface BadPiece {
  hash: string;
  problem: PieceProblem;
  /** The pack it is, or was, in, when an index says. */
  pack?: string;
  /** Verify removed it from the index before this run. */
  dropped: boolean;
  detail: string;
  backups: string[];
  /** The devices of those backups that hold it. */
  devices: string[];
}

/** A piece whose read failed for a reason that is not its own (not damage, not a lost pack): neither checked nor dropped. */
export interface UnreadPiece {
  hash: string;
  pack: string;
  /** The error's code (EIO, EPERM, ...). */
  code: string;
  detail: string;
  backups: string[];
  devices: string[];
}

export interface VerifySummary {
  ok: boolean;
  /** `unchecked`: not found damaged, but some of its pieces could not be read (unreadPieces). */
  backups: Array<{ id: string; ok: boolean; unchecked?: boolean; problem?: string }>;
  /** 'N/T' when only a slice was read. */
  subset?: string;
  /** Pieces read and found whole. */
  checkedPieces: number;
  checkedBytes: number;
  badPieces: BadPiece[];
  /** Pieces that could not be read (the store did not answer, a disk error): kept in the index; verify again. */
  unreadPieces: UnreadPiece[];
}

export async function verifyRepository(repo: Repository, options: VerifyOptions = {}): Promise<VerifySummary> {
  // One backup: a missing manifest throws (ENOENT), a damaged one is reported.
  const records = options.id !== undefined
    ? [await repo.manifest(options.id).then((manifest) => ({ id: options.id!, manifest, error: undefined }), (err: unknown) => {
        const e = toBdsnapError(err);
        if (e.code === 'ENOENT') throw e;
        return { id: options.id!, manifest: undefined, error: e };
      })]
    : await repo.backups();
  const users = new Map<string, string[]>();
  const devicesOf = new Map<string, Set<string>>();
  for (const r of records) {
    for (const d of r.manifest?.devices ?? []) {
      for (const s of d.pieces) {
        if (typeof s !== 'string') continue;
        const list = users.get(s);
        if (!list) users.set(s, [r.id]);
        else if (list[list.length - 1] !== r.id) list.push(r.id);
        const devices = devicesOf.get(s);
        if (!devices) devicesOf.set(s, new Set([d.device]));
        else devices.add(d.device);
      }
    }
  }
  const index = await repo.pieceIndex();
  const stored = await repo.storedPieces();
  const faults = new PieceFaults(repo);
  const bad: BadPiece[] = [];
  const badPiece = (f: PieceFault): BadPiece => ({
    hash: f.hash, problem: f.problem, ...(f.pack !== undefined ? { pack: f.pack } : {}), dropped: f.dropped, detail: f.text, backups: users.get(f.hash)!, devices: [...devicesOf.get(f.hash)!].sort(),
  });
  // Whether a piece is there is known from the listing, for every piece; a slice limits reading.
  const toRead: string[] = [];
  for (const hash of users.keys()) {
    if (!stored.has(hash)) bad.push(badPiece(await faults.unplaced(hash)));
    else if (options.subset === undefined || inDataSubset(hash, options.subset)) toRead.push(hash);
  }
  options.progress?.start(toRead.reduce((n, h) => n + (stored.get(h) ?? 0), 0));
  let checkedPieces = 0;
  let checkedBytes = 0;
  const pool = new PiecePool(repo.pieceCrypto);
  const failed = new Map<string, unknown>();
  try {
    // Pieces close together in a pack are read together (pack-reader.ts); each has its own outcome.
    await readPieces(repo, pool, toRead.map((hash) => ({ id: hash, at: index.get(hash)! })), {
      onPiece: (hash, raw) => {
        checkedPieces++;
        checkedBytes += raw.length;
        options.progress?.advance(stored.get(hash) ?? 0);
      },
      onError: (hash, e) => {
        failed.set(hash, e);
        options.progress?.advance(stored.get(hash) ?? 0);
      },
      signal: options.signal,
      ...(options.subset ? { maxGapBytes: 0 } : {}),
    });
  } finally {
    await pool.close();
  }
  // Indexed but gone (its pack removed): as useless as a damaged one, and dropped alike. A read
  // that failed for any other reason (the server down past the store's retries, a disk error, no
  // permission) says nothing of the piece: it is reported, and stays in the index.
  const drop = new Map<string, PieceProblem>();
  const unread: UnreadPiece[] = [];
  for (const [hash, err] of failed) {
    const e = toBdsnapError(err);
    if (e.code !== 'ECORRUPT' && e.code !== 'ENOENT') {
      unread.push({ hash, pack: index.get(hash)!.object, code: e.code, detail: e.message, backups: users.get(hash)!, devices: [...devicesOf.get(hash)!].sort() });
      continue;
    }
    const f = await faults.read(hash, err);
    drop.set(hash, f.problem);
    bad.push(badPiece(f));
  }
  if (drop.size > 0) {
    const removed = await repo.dropPieces(drop).then(() => 'removed, so the next backup stores it again', (err: unknown) => `could not be removed: ${(err as Error).message}`);
    for (const b of bad) if (drop.has(b.hash)) b.detail = `${b.detail}; ${removed}`;
  }
  bad.sort((a, b) => a.hash.localeCompare(b.hash));
  const backups = records.map((r) => {
    if (r.error) return { id: r.id, ok: false, problem: r.error.message };
    const missing = bad.filter((b) => b.problem === 'missing' && b.backups.includes(r.id)).length;
    const damaged = bad.filter((b) => b.problem === 'damaged' && b.backups.includes(r.id)).length;
    const notRead = unread.filter((u) => u.backups.includes(r.id)).length;
    if (missing + damaged + notRead === 0) return { id: r.id, ok: true };
    const parts = [missing > 0 ? countOf(missing, 'missing piece', 'missing pieces') : '', damaged > 0 ? countOf(damaged, 'damaged piece', 'damaged pieces') : '', notRead > 0 ? `${countOf(notRead, 'piece', 'pieces')} not read` : ''];
    return { id: r.id, ok: false, ...(missing + damaged === 0 ? { unchecked: true } : {}), problem: parts.filter(Boolean).join(', ') };
  });
  unread.sort((a, b) => a.hash.localeCompare(b.hash));
  return {
    ok: backups.every((b) => b.ok), backups, ...(options.subset ? { subset: formatDataSubset(options.subset) } : {}), checkedPieces, checkedBytes, badPieces: bad, unreadPieces: unread,
  };
}
