/**
 * How verify and restore name a piece a backup cannot use, in the same words, so that a piece
 * one command calls damaged the other does not call missing:
 * - damaged: its bytes are there and wrong (its pack cut short before its end, altered, not
 *   decoding to its id);
 * - missing: its pack is gone, or no index places it and none says why (an index object lost).
 * Which of the two is decided by the read's code (ENOENT: the object is not there), never by an
 * error's text. A piece verify removed from the index keeps the word verify gave it
 * (Repository.droppedPieces): a restore after a verify names it as the verify did.
 *
 * Each fault comes with its pack, and every message that names one says what to do
 * (mendAdvice): verify, then a create of the device, which stores again the pieces the device
 * still holds, or a forget of the backup.
 */

import { BdsnapError, toBdsnapError } from '../errors.js';
import type { PieceLocation, PieceProblem } from '../repository/pack.js';
import type { Repository } from '../repository/repository.js';
import { plural } from '../units.js';

export interface PieceFault {
  hash: string;
  problem: PieceProblem;
  /** The pack it is, or was, in (a version-1 repository: its own object); undefined when no index says. */
  pack?: string;
  /** Verify removed it from the index before (Repository.dropPieces). */
  dropped: boolean;
  /** One clause that says it all: "piece H is damaged: ..., in pack P". */
  text: string;
}

/** Pieces a message names at most; the rest are counted. */
const MAX_NAMED = 3;

function named(items: readonly string[]): string {
  return items.length > MAX_NAMED ? `${items.slice(0, MAX_NAMED).join(', ')}, ...` : items.join(', ');
}

/** Where a piece lies: in a pack, or (a version-1 repository) an object of its own. */
function holder(at: PieceLocation): string {
  return at.lengthBytes === null ? `its object ${at.object}` : `pack ${at.object}`;
}

/** The faults of one repository's pieces. */
export class PieceFaults {
  readonly #repo: Repository;
  /** Errors met reading a piece (tag), with the piece. */
  readonly #pieceOf = new WeakMap<object, string>();

  constructor(repo: Repository) {
    this.#repo = repo;
  }

  /** A piece a backup names that no index places: dropped by verify (as it found it), or missing. */
  async unplaced(hash: string): Promise<PieceFault> {
    const d = (await this.#repo.droppedPieces()).get(hash);
    if (!d) return { hash, problem: 'missing', dropped: false, text: `piece ${hash} is missing: no index places it (an index object is lost)` };
    const text = d.problem === 'damaged'
      ? `piece ${hash} is damaged: an earlier verify found it so in pack ${d.pack} and removed it from the index`
      : `piece ${hash} is missing: its pack ${d.pack} was gone when an earlier verify removed it from the index`;
    return { hash, problem: d.problem, pack: d.pack, dropped: true, text };
  }

  /** A piece whose read failed with `err`: missing if its pack is gone (ENOENT), else damaged. */
  async read(hash: string, err: unknown): Promise<PieceFault> {
    const e = toBdsnapError(err);
    const at = (await this.#repo.pieceIndex()).get(hash);
    if (!at) return this.unplaced(hash);
    if (e.code === 'ENOENT') return { hash, problem: 'missing', pack: at.object, dropped: false, text: `piece ${hash} is missing: ${holder(at)} is not in ${this.#repo.store.location}` };
    return { hash, problem: 'damaged', pack: at.object, dropped: false, text: `${e.message}, in ${holder(at)}` };
  }

  /** `err`, remembered as met reading piece `hash`, for of(); returned to be thrown. */
  tag(hash: string, err: unknown): BdsnapError {
    const e = toBdsnapError(err);
    this.#pieceOf.set(e, hash);
    return e;
  }

  /**
   * The fault behind `err` when tag() saw it and it is a piece's (ECORRUPT or ENOENT), else
   * undefined: a target that fails to write, an abort, a store that cannot be reached.
   */
  async of(err: unknown): Promise<PieceFault | undefined> {
    const hash = typeof err === 'object' && err !== null ? this.#pieceOf.get(err) : undefined;
    const code = toBdsnapError(err).code;
    if (hash === undefined || (code !== 'ECORRUPT' && code !== 'ENOENT')) return undefined;
    return this.read(hash, err);
  }
}

/** Where a fault lies, in a few words: "in pack P", "pack P is gone", "no index places it: ...". */
export function whereOf(f: Pick<PieceFault, 'problem' | 'pack' | 'dropped'>): string {
  const where = f.pack === undefined ? 'no index places it: an index object is lost' : f.problem === 'damaged' ? `in pack ${f.pack}` : `pack ${f.pack} is gone`;
  return f.dropped ? `${where}; removed from the index by an earlier verify` : where;
}

/**
 * Faults of one backup's pieces in one phrase: "1 of its pieces is damaged (H; in pack P) and
 * 2 are missing (H, H; pack P is gone; removed from the index by an earlier verify)".
 */
export function describeFaults(faults: readonly PieceFault[]): string {
  const groups: string[] = [];
  for (const problem of ['damaged', 'missing'] as const) {
    const these = faults.filter((f) => f.problem === problem);
    if (these.length === 0) continue;
    const packs = [...new Set(these.flatMap((f) => (f.pack !== undefined ? [f.pack] : [])))];
    const unknown = these.filter((f) => f.pack === undefined).length;
    const where: string[] = [];
    if (packs.length > 0) where.push(problem === 'damaged' ? `in ${plural(packs.length, 'pack', 'packs')} ${named(packs)}` : `${plural(packs.length, 'pack', 'packs')} ${named(packs)} ${plural(packs.length, 'is', 'are')} gone`);
    if (unknown > 0) where.push(`${unknown === these.length ? '' : `${unknown} `}no index places ${plural(unknown, 'it', 'them')}: an index object is lost`);
    const dropped = these.filter((f) => f.dropped).length;
    if (dropped > 0) where.push(`${dropped === these.length ? '' : `${dropped} `}removed from the index by an earlier verify`);
    const count = groups.length === 0 ? `${these.length} of its pieces ${plural(these.length, 'is', 'are')}` : `${these.length} ${plural(these.length, 'is', 'are')}`;
    groups.push(`${count} ${problem} (${named(these.map((f) => f.hash))}; ${where.join('; ')})`);
  }
  return groups.join(' and ');
}

/**
 * What to do about backups with bad pieces: `verify` first (from a command that is not verify),
 * then a create of `devices`, which stores again the pieces they still hold and so mends every
 * backup that names them, or a forget of the backups.
 */
export function mendAdvice(location: string, backups: readonly string[], devices: readonly string[], verify: boolean): string {
  const one = backups.length === 1;
  const forget = `'bdsnap backup forget --repo ${location} ${backups.join(' ')}'`;
  const steps: string[] = [];
  if (verify) steps.push(`'bdsnap backup verify --repo ${location} ${backups.join(' ')}' lists every damaged or missing piece of ${one ? 'it' : 'them'}`);
  const then = verify ? 'then ' : '';
  if (devices.length > 0) {
    const create = `'bdsnap backup create --repo ${location} ${devices.join(' ')}' (it stores again the pieces ${plural(devices.length, 'the device still holds', 'the devices still hold')}, which mends ${one ? 'the backup' : 'the backups'})`;
    steps.push(`${then}run ${create}, or forget ${one ? 'the backup' : 'them'} with ${forget}`);
  } else {
    steps.push(`${then}forget ${one ? 'the backup' : 'them'} with ${forget}`);
  }
  return steps.join('; ');
}
