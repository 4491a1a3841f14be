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
import { scanData } from '../store.js';
import { digestDeviceChunks } from '../device-digests.js';
import { forEachChunk } from '../chunk-runs.js';
import type { SessionInfo } from '../sessions.js';
import { readOptional } from './files.js';

/** Bytes read from the device at once while checking. */
export const BATCH_BYTES = 8 * 1024 * 1024;
const MAX_LISTED_MISMATCHES = 5;

export interface LoadedSession {
  info: SessionInfo;
  fd: number;
  /** chunk -> position of its original in data.bin */
  index: Map<number, number>;
  digests: Map<number, Buffer> | undefined;
}

/** What to write: each chunk's original, where it is kept, and the chunks in offset order. */
export interface RestorePlan {
  entries: Map<number, { session: LoadedSession; position: number }>;
  /** Sorted. */
  chunks: Float64Array;
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
export async function readSessionDigests(info: SessionInfo): Promise<Map<number, Buffer> | undefined> {
  if (info.state !== 'complete') return undefined;
  const raw = await readOptional(path.join(info.dir, DIGESTS_FILE));
  if (raw === undefined) throw new BdsnapError('ECORRUPT', `${info.dir}: the session is complete but ${DIGESTS_FILE} is missing`);
  return decodeDigests(raw);
}

/** Open and verify one session's store. The caller closes `fd`. Errors: ECORRUPT. */
export async function loadSession(info: SessionInfo, digestsRead: Promise<Map<number, Buffer> | undefined>): Promise<LoadedSession> {
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
    if (digests !== undefined && !sameKeys(digests, scan.index)) {
      throw new BdsnapError('ECORRUPT', `${path.join(info.dir, DIGESTS_FILE)} does not list the same chunks as ${DATA_FILE}`);
    }
    // A torn tail (crashed session) is not applied: keep only the valid records' bytes.
    return { info, fd, index: scan.index, digests };
  } catch (err) {
    fs.closeSync(fd);
    throw err;
  }
}

/** Same chunks in both maps. */
function sameKeys(a: Map<number, unknown>, b: Map<number, unknown>): boolean {
  if (a.size !== b.size) return false;
  for (const c of a.keys()) if (!b.has(c)) return false;
  return true;
}

/** One original from a session's store. Errors: ECORRUPT (store too short). */
export async function readOriginal(s: LoadedSession, position: number, lengthBytes: number): Promise<Buffer> {
  const buf = Buffer.allocUnsafe(lengthBytes);
  if ((await preadFully(s.fd, buf, position)) !== lengthBytes) throw new BdsnapError('ECORRUPT', `${s.info.dir}: the store ended while reading`);
  return buf;
}

/** Oldest first: the first session of the chain that touched a chunk holds the original to write. */
export function buildPlan(loaded: LoadedSession[], chunkSize: number, deviceSize: number): RestorePlan {
  const entries: RestorePlan['entries'] = new Map();
  for (const s of loaded) for (const [chunk, position] of s.index) if (!entries.has(chunk)) entries.set(chunk, { session: s, position });
  // A typed array sorts numerically, several times faster than a comparator over an array.
  const chunks = Float64Array.from(entries.keys()).sort();
  let bytes = 0;
  for (const c of chunks) bytes += Math.min(chunkSize, deviceSize - c * chunkSize);
  return { entries, chunks, bytes, chunkSize };
}

/** Device end digests by algorithm, then by chunk. */
export type DeviceDigests = Map<DigestAlgorithm, Map<number, Buffer>>;

/** Hash the `wanted` chunks of the device in worker threads, each with its algorithm. */
export async function digestDevice(devicePath: string, wanted: Map<number, DigestAlgorithm>, cs: number, sizeBytes: number): Promise<DeviceDigests> {
  const byAlgorithm = new Map<DigestAlgorithm, number[]>();
  for (const [c, algorithm] of wanted) {
    const list = byAlgorithm.get(algorithm);
    if (list) list.push(c);
    else byAlgorithm.set(algorithm, [c]);
  }
  const out: DeviceDigests = new Map();
  for (const [algorithm, chunks] of byAlgorithm) {
    out.set(algorithm, await digestDeviceChunks(devicePath, Float64Array.from(chunks).sort(), cs, sizeBytes, algorithm));
  }
  return out;
}

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
    if (!s.digests) continue;
    const algorithm = s.info.digestAlgorithm;
    const newer = loaded.slice(k + 1);
    const missing: number[] = [];
    let digests = precomputed.get(algorithm);
    for (const [chunk, expected] of s.digests) {
      const source = newer.length === 0 ? undefined : newer.find((n) => n.index.has(chunk));
      if (source) fromStores.push({ session: s, chunk, expected, source });
      else if (!digests?.has(chunk)) missing.push(chunk);
    }
    if (missing.length > 0) {
      digests ??= new Map<number, Buffer>();
      precomputed.set(algorithm, digests);
      const into = digests;
      await forEachChunk(device, missing.sort((a, b) => a - b), cs, BATCH_BYTES, (c, data) => into.set(c, chunkDigest(data, algorithm)));
    }
    for (const [chunk, expected] of s.digests) {
      const actual = digests?.get(chunk);
      if (actual !== undefined && !actual.equals(expected) && !newer.some((n) => n.index.has(chunk))) {
        mismatches.push({ session: s, chunk, against: 'the device' });
      }
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
  const current = new Map<number, Buffer>();
  await forEachChunk(device, plan.chunks, cs, BATCH_BYTES, (c, data) => current.set(c, chunkDigest(data, DIGEST_ALGORITHM)));
  for (const c of plan.chunks) {
    const p = plan.entries.get(c)!;
    const original = await readOriginal(p.session, p.position, Math.min(cs, device.size - c * cs));
    if (!chunkDigest(original, DIGEST_ALGORITHM).equals(current.get(c)!)) return false;
  }
  return true;
}
