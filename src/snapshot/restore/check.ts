/**
 * Step 2 of a restore: check everything and plan the writes, before a byte is written.
 *
 * - Every session's store is scanned (one CRC pass per record) and checked against its
 *   manifest, index and digests (`loadSession`).
 * - The device must be the one the sessions were taken of (`checkIdentity`).
 * - The end digests: the newest session's must match the device; each older one's must match
 *   what the device would hold after the newer ones were restored (`verifyDigests`). The
 *   device's digests are hashed in worker threads while the stores are checked
 *   (`digestDevice`).
 * - The plan: for each chunk touched by any session of the chain, the original kept by the
 *   oldest session that touched it (`buildPlan`).
 */

import fs from 'node:fs';
import path from 'node:path';
import { BdsnapError, toBdsnapError } from '../../errors.js';
import type { BlockDevice, DeviceIdentity } from '../../device/block-device.js';
import { preadFully } from '../../host/fd-io.js';
import { DATA_FILE, DIGEST_ALGORITHM, DIGESTS_FILE, INDEX_FILE, chunkDigest, decodeDigests, indexMatches, type DigestAlgorithm } from '../format.js';
import type { DigestTable } from '../digest-table.js';
import { scanData } from '../store-scan.js';
import { DeviceDigestPass } from '../device-digests.js';
import { forEachChunk } from '../chunk-runs.js';
import type { SessionInfo } from '../sessions.js';
import { compareDeviceStamps, stampKey, type DeviceStamp } from '../../host/device-stamp.js';
import type { Journal } from './journal.js';
import { readOptional } from './files.js';

/** Bytes read from the device at once while checking. */
export const BATCH_BYTES = 8 * 1024 * 1024;
const MAX_LISTED_MISMATCHES = 5;

export interface LoadedSession {
  info: SessionInfo;
  fd: number;
  /** chunk -> position of its original in data.bin */
  index: Map<number, number>;
  digests: DigestTable | undefined;
}

/**
 * What to write, in offset order: chunks[i]'s original is in sessions[sessionOf[i]]'s store at
 * positions[i]. Parallel typed arrays, not an object per chunk.
 */
export interface RestorePlan {
  /** Sorted. */
  chunks: Float64Array;
  sessions: LoadedSession[];
  sessionOf: Uint32Array;
  positions: Float64Array;
  bytes: number;
  chunkSize: number;
}

/**
 * The recorded identity must name the same file: kind and inode for an image file. The numbers
 * of the filesystem's or node's device (dev, rdev) can change across reboots, so a difference
 * there is only a warning; size and digests still guard the content.
 */
export function checkIdentity(devicePath: string, current: DeviceIdentity, s: SessionInfo, warnings: string[]): void {
  const recorded = s.deviceIdentity;
  const strict: Array<keyof DeviceIdentity> = current.kind === 'file' ? ['kind', 'ino'] : ['kind'];
  const differs = (k: keyof DeviceIdentity): boolean => k in recorded && recorded[k] !== current[k];
  const describe = (k: keyof DeviceIdentity): string => `${k} ${String(recorded[k])} recorded, ${String(current[k])} now`;
  const hard = strict.filter(differs);
  if (hard.length > 0) {
    throw new BdsnapError('EMISMATCH', `${devicePath} is not the device session ${s.dir} was taken of (${hard.map(describe).join(', ')})`);
  }
  const soft = (['dev', 'rdev'] as const).filter(differs);
  if (soft.length > 0) warnings.push(`${devicePath}: device numbers differ from session ${s.dir} (${soft.map(describe).join(', ')}), e.g. after a reboot`);
}

/** The end digests of a complete session (undefined for any other state). Errors: ECORRUPT. */
export async function readSessionDigests(info: SessionInfo): Promise<DigestTable | undefined> {
  if (info.state !== 'complete') return undefined;
  const raw = await readOptional(path.join(info.dir, DIGESTS_FILE));
  if (raw === undefined) throw new BdsnapError('ECORRUPT', `${info.dir}: the session is complete but ${DIGESTS_FILE} is missing`);
  return decodeDigests(raw);
}

/** Open and verify one session's store. The caller closes `fd`. Errors: ECORRUPT. */
export async function loadSession(info: SessionInfo, digestsRead: Promise<DigestTable | undefined>): Promise<LoadedSession> {
  const dataPath = path.join(info.dir, DATA_FILE);
  let fd: number;
  try {
    fd = fs.openSync(dataPath, 'r');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new BdsnapError('ECORRUPT', `${info.dir}: the data file ${DATA_FILE} is missing`, { cause: err });
    throw toBdsnapError(err);
  }
  try {
    const scan = await scanData(fd, { chunkSize: info.chunkSize, deviceSize: info.deviceSize, allowTornTail: info.state === 'active', where: dataPath });
    if (info.state !== 'active') {
      if (scan.fileBytes !== info.storeBytes) {
        throw new BdsnapError('ECORRUPT', `${dataPath} is ${scan.fileBytes} bytes but the manifest records ${info.storeBytes}: the store was truncated or extended`);
      }
      if (scan.index.size !== info.preservedChunks) {
        throw new BdsnapError('ECORRUPT', `${dataPath} holds ${scan.index.size} chunks but the manifest records ${info.preservedChunks}`);
      }
    }
    const index = await readOptional(path.join(info.dir, INDEX_FILE));
    if (index !== undefined && !indexMatches(index, scan.index)) {
      throw new BdsnapError('ECORRUPT', `${path.join(info.dir, INDEX_FILE)} does not match ${DATA_FILE}`);
    }
    const digests = await digestsRead;
    if (digests !== undefined && !digests.sameChunksAs(scan.index)) {
      throw new BdsnapError('ECORRUPT', `${path.join(info.dir, DIGESTS_FILE)} does not list the same chunks as ${DATA_FILE}`);
    }
    // A torn tail (crashed session) is not applied: keep only the valid records' bytes.
    return { info, fd, index: scan.index, digests };
  } catch (err) {
    fs.closeSync(fd);
    throw err;
  }
}

/** One original from a session's store. Errors: ECORRUPT (store too short). */
export async function readOriginal(s: LoadedSession, position: number, lengthBytes: number): Promise<Buffer> {
  const buf = Buffer.allocUnsafe(lengthBytes);
  if ((await preadFully(s.fd, buf, position)) !== lengthBytes) throw new BdsnapError('ECORRUPT', `${s.info.dir}: the store ended while reading`);
  return buf;
}

/** Oldest first: the first session of the chain that touched a chunk holds the original to write. */
export function buildPlan(loaded: LoadedSession[], chunkSize: number, deviceSize: number): RestorePlan {
  // chunk -> which session holds its original; with one session, every chunk is its own.
  let owner: Map<number, number> | undefined;
  if (loaded.length > 1) {
    owner = new Map();
    loaded.forEach((s, k) => {
      for (const chunk of s.index.keys()) if (!owner!.has(chunk)) owner!.set(chunk, k);
    });
  }
  // A typed array sorts numerically, several times faster than a comparator over an array.
  const chunks = Float64Array.from(owner ? owner.keys() : (loaded[0]?.index.keys() ?? [])).sort();
  const sessionOf = new Uint32Array(chunks.length);
  const positions = new Float64Array(chunks.length);
  let bytes = 0;
  for (let i = 0; i < chunks.length; i++) {
    const c = chunks[i]!;
    const k = owner ? owner.get(c)! : 0;
    sessionOf[i] = k;
    positions[i] = loaded[k]!.index.get(c)!;
    bytes += Math.min(chunkSize, deviceSize - c * chunkSize);
  }
  return { chunks, sessions: loaded, sessionOf, positions, bytes, chunkSize };
}

/** Device end digests by algorithm. */
export type DeviceDigests = Map<DigestAlgorithm, DigestTable>;

/**
 * The device chunks to digest, by algorithm, sorted: every chunk some session of the chain has
 * an end digest for, with the algorithm of the newest such session (`tables` oldest first).
 */
export function wantedDigests(tables: Array<{ algorithm: DigestAlgorithm; digests: DigestTable | undefined }>): Map<DigestAlgorithm, Float64Array> {
  const present = tables.filter((t) => t.digests !== undefined && t.digests.size > 0);
  if (present.length === 1) return new Map([[present[0]!.algorithm, present[0]!.digests!.chunks]]);
  const newest = new Map<number, DigestAlgorithm>();
  for (const t of present) for (const c of t.digests!.chunks) newest.set(c, t.algorithm);
  const byAlgorithm = new Map<DigestAlgorithm, number[]>();
  for (const [c, algorithm] of newest) {
    const list = byAlgorithm.get(algorithm);
    if (list) list.push(c);
    else byAlgorithm.set(algorithm, [c]);
  }
  return new Map([...byAlgorithm].map(([algorithm, list]) => [algorithm, Float64Array.from(list).sort()]));
}

/** Start hashing the `wanted` chunks of the device in worker threads, each list with its algorithm. */
export function digestDevice(devicePath: string, wanted: Map<DigestAlgorithm, Float64Array>, cs: number, sizeBytes: number): { finish(): Promise<DeviceDigests> } {
  const lists = [...wanted].map(([algorithm, chunks]) => ({ algorithm, chunks }));
  const pass = new DeviceDigestPass(devicePath, lists, cs, sizeBytes);
  return { finish: async () => new Map((await pass.finish()).map((table, i) => [lists[i]!.algorithm, table] as const)) };
}

/** Marks in verifyDigests' plan of checks (any other value is a place in the precomputed table). */
const NEWER = -1;
const HERE = -2;

/**
 * The newest session's digests must match the device; each older session's must match what the
 * device would hold after the newer ones were restored (the newer sessions' originals, else the
 * device). Every mismatch is collected and the first few are listed. Errors: EMISMATCH.
 */
export async function verifyDigests(device: BlockDevice, loaded: LoadedSession[], cs: number, precomputed: DeviceDigests = new Map()): Promise<void> {
  const mismatches: Array<{ session: LoadedSession; chunk: number; against: string }> = [];
  // Checks against a newer session's original: read from its store after the device checks.
  const fromStores: Array<{ session: LoadedSession; chunk: number; expected: Buffer; source: LoadedSession }> = [];
  for (let k = 0; k < loaded.length; k++) {
    const s = loaded[k]!;
    const table = s.digests;
    if (!table) continue;
    const algorithm = s.info.digestAlgorithm;
    const newer = loaded.slice(k + 1);
    const computed = precomputed.get(algorithm);
    // The usual case: the device was digested for exactly this table's chunks, entry by entry.
    const aligned = computed !== undefined && computed.alignedWith(table);
    if (aligned && newer.length === 0) {
      // The newest session: every entry against the device's digest at the same place.
      for (let i = 0; i < table.size; i++) if (!table.sameAt(i, computed, i)) mismatches.push({ session: s, chunk: table.chunks[i]!, against: 'the device' });
      continue;
    }
    // Where each entry is checked, decided once: its place in `computed`, NEWER (against a newer
    // session's original, after the device checks) or HERE (a digest computed below).
    const where = new Int32Array(table.size);
    const missing: number[] = [];
    for (let i = 0; i < table.size; i++) {
      const chunk = table.chunks[i]!;
      const source = newer.length === 0 ? undefined : newer.find((n) => n.index.has(chunk));
      if (source) {
        fromStores.push({ session: s, chunk, expected: table.digest(i), source });
        where[i] = NEWER;
        continue;
      }
      const j = aligned ? i : computed?.indexOf(chunk) ?? -1;
      where[i] = j >= 0 ? j : HERE;
      if (j < 0) missing.push(chunk);
    }
    // Device digests nobody computed beforehand (sorted, as the table is).
    const here = new Map<number, Buffer>();
    if (missing.length > 0) await forEachChunk(device, missing, cs, BATCH_BYTES, (c, data) => here.set(c, chunkDigest(data, algorithm)));
    for (let i = 0; i < table.size; i++) {
      const j = where[i]!;
      if (j === NEWER) continue;
      const chunk = table.chunks[i]!;
      if (!(j === HERE ? table.equalsAt(i, here.get(chunk)!) : table.sameAt(i, computed!, j))) mismatches.push({ session: s, chunk, against: 'the device' });
    }
  }
  for (const check of fromStores) {
    const len = Math.min(cs, device.size - check.chunk * cs);
    const actual = chunkDigest(await readOriginal(check.source, check.source.index.get(check.chunk)!, len), check.session.info.digestAlgorithm);
    if (!actual.equals(check.expected)) mismatches.push({ session: check.session, chunk: check.chunk, against: `the original kept by ${check.source.info.dir}` });
  }
  if (mismatches.length === 0) return;
  const bySession = new Map<string, typeof mismatches>();
  for (const m of mismatches) {
    const list = bySession.get(m.session.info.dir);
    if (list) list.push(m);
    else bySession.set(m.session.info.dir, [m]);
  }
  const clauses = [...bySession].map(([dir, list]) => {
    const listed = list.slice(0, MAX_LISTED_MISMATCHES)
      .map((m) => `chunk ${m.chunk} (bytes ${m.chunk * cs}..${Math.min((m.chunk + 1) * cs, device.size) - 1}) vs ${m.against}`)
      .join(', ');
    return `${list.length} chunk(s) of ${dir} differ from its end digests: ${listed}${list.length > MAX_LISTED_MISMATCHES ? ', ...' : ''}`;
  });
  throw new BdsnapError('EMISMATCH',
    `the device is not in the state the sessions left it in (${clauses.join('; ')}); `
    + 'it was changed outside bdsnap or by a session that is not in this snapshot root; use --force to restore anyway');
}

/** Whether the device already holds every original of the plan (a finished restore, run again). */
export async function alreadyRestored(device: BlockDevice, plan: RestorePlan): Promise<boolean> {
  const cs = plan.chunkSize;
  const current: Buffer[] = [];
  await forEachChunk(device, plan.chunks, cs, BATCH_BYTES, (_c, data, i) => (current[i] = chunkDigest(data, DIGEST_ALGORITHM)));
  for (let i = 0; i < plan.chunks.length; i++) {
    const c = plan.chunks[i]!;
    const original = await readOriginal(plan.sessions[plan.sessionOf[i]!]!, plan.positions[i]!, Math.min(cs, device.size - c * cs));
    if (!chunkDigest(original, DIGEST_ALGORITHM).equals(current[i]!)) return false;
  }
  return true;
}

/** A finished restore: the session it took the device back to, and its journal. */
export interface FinishedRestore {
  target: SessionInfo;
  journal: Journal;
}

/** Where the chain cannot be followed: writes outside bdsnap (breaks) and links with no stamp to compare (unknown). */
export interface Continuity {
  breaks: string[];
  unknown: string[];
}

/**
 * Whether anything outside bdsnap wrote the device between the states the chain links: the
 * end of each session and the start of the next one in the chain, and the end of the newest
 * and the device now. A verified restore's stamp stands for its target's start (the device
 * held exactly that content then), which links a session to the first one started after a
 * restore undid the sessions between. Stamps are compared, not content: a write to a chunk no
 * session touched leaves every end digest intact but moves the stamp.
 */
export function checkContinuity(chain: SessionInfo[], targetUndone: boolean, restores: FinishedRestore[], current: DeviceStamp | undefined): Continuity {
  const parent = new Map<string, string>();
  const find = (k: string): string => {
    let root = k;
    while (parent.has(root)) root = parent.get(root)!;
    return root;
  };
  const union = (a: string, b: string): void => {
    const [ra, rb] = [find(a), find(b)];
    if (ra !== rb) parent.set(ra, rb);
  };
  for (const { target, journal } of restores) {
    if (journal.state !== 'done' || journal.verified === false || target.startStamp === undefined) continue;
    for (const s of journal.stamps ?? []) union(stampKey(s), stampKey(target.startStamp));
  }
  const out: Continuity = { breaks: [], unknown: [] };
  chain.forEach((s, i) => {
    const next = chain[i + 1];
    const undoneTarget = i === 0 && targetUndone;
    const from = undoneTarget ? s.startStamp : s.endStamp;
    const fromWhat = undoneTarget ? `the restore from ${s.dir}` : `session ${s.dir} ended`;
    const to = next ? next.startStamp : current;
    const toWhat = next ? `before session ${next.dir} started` : 'since';
    const where = next ? `between ${fromWhat} and the start of ${next.dir}` : `after ${fromWhat}`;
    if (from === undefined || to === undefined) {
      out.unknown.push(`no stamp of the device ${where}, so writes outside bdsnap there would go unseen where no session touched the device`);
      return;
    }
    if (find(stampKey(from)) === find(stampKey(to))) return;
    const compared = compareDeviceStamps(from, to);
    // A loop device's backing file can vouch across a reboot; other block devices' counters cannot.
    if (compared.same) return;
    if (!compared.proven) out.unknown.push(`${where}: ${compared.detail}`);
    else out.breaks.push(`after ${fromWhat} and ${toWhat} (${compared.detail})`);
  });
  return out;
}
