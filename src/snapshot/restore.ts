/**
 * Offline restore: put a device back as it was at the start of a session.
 *
 * The chain is the session itself and every newer session of the same device in the same
 * snapshot root. Applying them newest-first is the same as writing, for each chunk touched by
 * any of them, the original stored by the oldest session of the chain that touched it; that
 * merged plan is what is written, once per chunk, sorted by offset, in large batches with
 * several writes in flight.
 *
 * Nothing is written before every check has passed: every record's checksum, the consistency of
 * manifest, data, index and digests, the device size and identity, and the end digests (the
 * newest session's against the device, each older one's against the content the newer restores
 * would produce). A restore journal in the session directory marks a restore under way, so a
 * second run after an interruption skips the digest check for that reason only and finishes it;
 * once done, the journal says so and a further run finds nothing to do.
 *
 * Speed: the device's end digests are hashed in worker threads while this thread reads and
 * checks the stores (one CRC pass per record, large reads with one more in flight); the apply
 * writes large sorted runs, several in flight, with one sync at the end.
 */

import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { BdsnapError, toBdsnapError } from '../errors.js';
import { FileDevice } from '../device/file-device.js';
import type { BlockDevice } from '../device/block-device.js';
import {
  DATA_FILE, DIGEST_ALGORITHM, DIGESTS_FILE, INDEX_FILE, JOURNAL_FILE, chunkDigest, decodeDigests, decodeIndex, writeFileAtomic, type DigestAlgorithm,
} from './format.js';
import { scanData, preadFully } from './store.js';
import { digestDeviceChunks } from './device-digests.js';
import { chunkRuns, forEachChunk } from './chunk-runs.js';
import { compareSessions, listSessions, readSessionInfo, recoverSession, type SessionInfo } from './sessions.js';

const BATCH_BYTES = 8 * 1024 * 1024;
const WRITES_IN_FLIGHT = 4;
const MAX_LISTED_MISMATCHES = 5;

export interface RestoreOptions {
  /** Write a restored copy to this file (copy of the device, then the plan) and leave the device alone. */
  output?: string;
  /** Check everything and report the plan; write nothing. */
  dryRun?: boolean;
  /** Skip the end-digest check (checksums and sizes are still checked). */
  force?: boolean;
  onProgress?: (doneBytes: number, totalBytes: number) => void;
}

/** What restore() did (or, with dryRun, would do). */
export interface RestoreSummary {
  sessionDir: string;
  devicePath: string;
  /** Where the restored content went: the device path, or the --output file. */
  targetPath: string;
  dryRun: boolean;
  /** Session directories whose originals were applied, newest first (the asked-for one last). */
  sessionsApplied: string[];
  /** Chunks and bytes written (or to be written). */
  chunks: number;
  bytes: number;
  durationMs: number;
  /**
   * 'verified': every session's end digests matched; 'partial': some sessions had no digests
   * (interrupted) and were not checked; 'skipped-force': --force; 'skipped-resume': finishing an
   * interrupted restore; 'already-restored': the device already holds the restored content.
   */
  digestCheck: 'verified' | 'partial' | 'skipped-force' | 'skipped-resume' | 'already-restored';
  /** Nothing was written because a previous run already restored the device. */
  alreadyRestored: boolean;
  warnings: string[];
}

interface LoadedSession {
  info: SessionInfo;
  fd: number;
  /** chunk -> position of its original in data.bin */
  index: Map<number, number>;
  digests: Map<number, Buffer> | undefined;
}

interface Journal {
  state: 'running' | 'done';
  devicePath: string;
  sessions: string[];
  startedAt: string;
  finishedAt?: string;
}

/** Put the device back as it was at the start of `sessionDir`. Errors: ENOENT, ECORRUPT, EMISMATCH, ESESSION, EBUSY. */
export async function restore(sessionDir: string, options: RestoreOptions = {}): Promise<RestoreSummary> {
  const startedMs = performance.now();
  const dryRun = options.dryRun ?? false;
  const target = await readSessionInfo(sessionDir);
  const devicePath = target.devicePath;
  const warnings: string[] = [];

  const all = await listSessions(path.dirname(target.dir), devicePath);
  // Names sort by mount time within one device (fixed-width UTC stamp), so an unreadable
  // directory named after the target may be a newer session: without it the chain is unknown.
  const unreadable = all.filter((s) => s.state === 'unreadable' && path.basename(s.dir) > path.basename(target.dir));
  if (unreadable.length > 0) {
    const s = unreadable[0]!;
    throw new BdsnapError('ECORRUPT', `session directory ${s.dir} (which may be a newer session of ${devicePath}) cannot be read: ${s.problem ?? 'unknown problem'}`);
  }
  let chain = all.filter((s) => compareSessions(s, target) >= 0);
  // A finished restore from a session took it and the sessions it applied back: those are undone.
  // Newer ones leave the chain (their originals describe states that no longer exist); the
  // target stays (its originals are still the content to restore) but its end digests are stale.
  let targetUndone = false;
  for (const s of [...chain]) {
    const j = await readJournal(path.join(s.dir, JOURNAL_FILE));
    if (j?.state !== 'done' || !chain.includes(s)) continue;
    const undone = new Set(j.sessions);
    chain = chain.filter((c) => c.dir === target.dir || !undone.has(c.dir));
    if (s.dir === target.dir) targetUndone = true;
    else warnings.push(`session ${s.dir} and ${j.sessions.length - 1} later one(s) were already undone by a restore finished at ${j.finishedAt ?? '?'}`);
  }
  if (chain[0]?.dir !== target.dir) throw new BdsnapError('ENOENT', `${target.dir} is not listed in its snapshot root`);
  for (const s of chain) {
    if (s.state === 'failed') {
      throw new BdsnapError('ESESSION', `session ${s.dir} failed (${s.failedReason ?? 'no reason recorded'}): its originals are incomplete, so the device cannot be restored to ${s.dir === target.dir ? 'its start' : `a point before it`}`);
    }
    if (s.deviceSize !== target.deviceSize) {
      throw new BdsnapError('EMISMATCH', `session ${s.dir} recorded a device size of ${s.deviceSize} bytes but ${target.dir} recorded ${target.deviceSize}`);
    }
    if (s.chunkSize !== target.chunkSize) {
      throw new BdsnapError('ESESSION', `sessions ${target.dir} and ${s.dir} use different chunk sizes (${target.chunkSize}, ${s.chunkSize}); restore them one at a time, newest first`);
    }
    if (s.state === 'interrupted') warnings.push(`session ${s.dir} was interrupted (recovered after a crash): its originals are used, but it has no end digests to check`);
    if (s.state === 'active') warnings.push(`session ${s.dir} was never closed (crash?): it is treated as interrupted and has no end digests to check`);
  }

  const outputPath = options.output === undefined ? undefined : path.resolve(options.output);
  if (outputPath !== undefined) await checkOutput(devicePath, outputPath);
  await checkNotInUse(devicePath);
  const device = await FileDevice.open(devicePath, { readOnly: dryRun || options.output !== undefined });
  const loaded: LoadedSession[] = [];
  let output: FileDevice | undefined;
  try {
    for (const s of chain) {
      if (device.size !== s.deviceSize) {
        throw new BdsnapError('EMISMATCH', `${devicePath} is ${device.size} bytes but session ${s.dir} recorded ${s.deviceSize} bytes`);
      }
      checkIdentity(device, s, warnings);
    }
    const journalPath = path.join(target.dir, JOURNAL_FILE);
    const journal = await readJournal(journalPath);
    // Digest the device in workers while this thread checks the stores: every chunk some end
    // digest may be compared with (a superset of what verifyDigests reads from the device), with
    // the algorithm of the newest session that has a digest for it.
    // Each session's digests are read once: for the device pass here and by loadSession.
    const digestsOf = new Map(chain.map((s) => [s.dir, readSessionDigests(s)] as const));
    for (const d of digestsOf.values()) d.catch(() => undefined); // loadSession reports the error
    let deviceDigests: Promise<DeviceDigests> | undefined;
    if (!options.force && !(journal?.state === 'running' && outputPath === undefined)) {
      const wanted = new Map<number, DigestAlgorithm>();
      for (const s of chain) {
        const digests = await digestsOf.get(s.dir)!.catch(() => undefined);
        for (const c of digests?.keys() ?? []) wanted.set(c, s.digestAlgorithm);
      }
      deviceDigests = digestDevice(devicePath, wanted, target.chunkSize, device.size);
      deviceDigests.catch(() => undefined);
    }
    for (const s of chain) loaded.push(await loadSession(s, digestsOf.get(s.dir)!));
    if (targetUndone && loaded[0]) loaded[0] = { ...loaded[0], digests: undefined };
    const cs = target.chunkSize;
    // Oldest first: the first session of the chain that touched a chunk holds the original to write.
    const plan = new Map<number, { session: LoadedSession; position: number }>();
    for (const s of loaded) for (const [chunk, position] of s.index) if (!plan.has(chunk)) plan.set(chunk, { session: s, position });
    const chunks = [...plan.keys()].sort((a, b) => a - b);
    const chunkBytes = (c: number): number => Math.min(cs, device.size - c * cs);
    const bytes = chunks.reduce((n, c) => n + chunkBytes(c), 0);

    let digestCheck: RestoreSummary['digestCheck'];
    if (journal?.state === 'running' && options.output === undefined) {
      digestCheck = 'skipped-resume';
      warnings.push(`a restore from this session started at ${journal.startedAt} did not finish: finishing it without the digest check`);
    } else if (journal?.state === 'done' && (await alreadyRestored(device, plan, chunks, cs))) {
      digestCheck = 'already-restored';
    } else if (targetUndone && !options.force && loaded.length === 1) {
      // Restored before and changed since, with no session recording the change: nothing to check against.
      throw new BdsnapError('EMISMATCH', `${devicePath} was restored from ${target.dir} at ${journal?.finishedAt ?? '?'} and has changed since outside bdsnap; use --force to restore again`);
    } else if (options.force) {
      digestCheck = 'skipped-force';
      warnings.push('--force: the end digests were not checked');
    } else {
      await verifyDigests(device, loaded, cs, await deviceDigests);
      digestCheck = loaded.some((s) => s.digests === undefined) ? 'partial' : 'verified';
      if (targetUndone) warnings.push(`${devicePath} was already restored from this session once; only the sessions since then were checked`);
    }
    const summary = (written: boolean): RestoreSummary => ({
      sessionDir: target.dir,
      devicePath,
      targetPath: options.output !== undefined ? path.resolve(options.output) : devicePath,
      dryRun,
      sessionsApplied: loaded.map((s) => s.info.dir).reverse(),
      chunks: written ? chunks.length : 0,
      bytes: written ? bytes : 0,
      durationMs: Math.round(performance.now() - startedMs),
      digestCheck,
      alreadyRestored: digestCheck === 'already-restored',
      warnings,
    });
    if (dryRun) return { ...summary(true), chunks: chunks.length, bytes };
    if (digestCheck === 'already-restored') {
      // The device already holds the restored content: a copy of it is the restored copy.
      if (outputPath !== undefined) await (await copyToOutput(device, devicePath, outputPath)).close();
      return summary(false);
    }

    for (const s of loaded) {
      // Make a crashed, never-recovered session say what it is now that nobody has it open.
      if (s.info.state === 'active') await recoverSession(s.info.dir);
    }
    let writeTo: BlockDevice = device;
    if (outputPath !== undefined) {
      output = await copyToOutput(device, devicePath, outputPath!);
      writeTo = output;
    } else {
      await writeFileAtomic(journalPath, JSON.stringify({ state: 'running', devicePath, sessions: [...new Set([...(journal?.sessions ?? []), ...chain.map((s) => s.dir)])], startedAt: new Date().toISOString() } satisfies Journal));
    }
    await applyPlan(writeTo, plan, chunks, cs, bytes, options.onProgress);
    await writeTo.flush();
    if (options.output === undefined) {
      // Keep the sessions undone by earlier restores from here: they stay undone.
      const undone = [...new Set([...(journal?.sessions ?? []), ...chain.map((s) => s.dir)])];
      const startedAt = journal?.state === 'running' ? journal.startedAt : new Date(Date.now() - (performance.now() - startedMs)).toISOString();
      await writeFileAtomic(journalPath, JSON.stringify({ state: 'done', devicePath, sessions: undone, startedAt, finishedAt: new Date().toISOString() } satisfies Journal));
    }
    return summary(true);
  } finally {
    for (const s of loaded) fs.closeSync(s.fd);
    await output?.close();
    await device.close();
  }
}

/**
 * The recorded identity must name the same file: kind and inode for an image file. The numbers
 * of the filesystem's or node's device (dev, rdev) can change across reboots, so a difference
 * there is only a warning; size and digests still guard the content.
 */
function checkIdentity(device: FileDevice, s: SessionInfo, warnings: string[]): void {
  const current = device.identity as unknown as Record<string, unknown>;
  const recorded = s.deviceIdentity;
  const strict = current.kind === 'file' ? ['kind', 'ino'] : ['kind'];
  const differs = (k: string): boolean => k in recorded && recorded[k] !== current[k];
  const describe = (k: string): string => `${k} ${String(recorded[k])} recorded, ${String(current[k])} now`;
  const hard = strict.filter(differs);
  if (hard.length > 0) {
    throw new BdsnapError('EMISMATCH', `${device.path} is not the device session ${s.dir} was taken of (${hard.map(describe).join(', ')})`);
  }
  const soft = ['dev', 'rdev'].filter(differs);
  if (soft.length > 0) warnings.push(`${device.path}: device numbers differ from session ${s.dir} (${soft.map(describe).join(', ')}), e.g. after a reboot`);
}

/** The end digests of a complete session (undefined for any other state). Errors: ECORRUPT. */
async function readSessionDigests(info: SessionInfo): Promise<Map<number, Buffer> | undefined> {
  if (info.state !== 'complete') return undefined;
  const raw = await readOptional(path.join(info.dir, DIGESTS_FILE));
  if (raw === undefined) throw new BdsnapError('ECORRUPT', `${info.dir}: the session is complete but ${DIGESTS_FILE} is missing`);
  return decodeDigests(raw);
}

async function loadSession(info: SessionInfo, digestsRead: Promise<Map<number, Buffer> | undefined>): Promise<LoadedSession> {
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
    if (index !== undefined && !sameKeys(decodeIndex(index), scan.index, (p, c) => scan.index.get(c) === p)) {
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

/** Same chunks in both maps (and, with `match`, each entry of `a` accepted). */
function sameKeys<V>(a: Map<number, V>, b: Map<number, unknown>, match?: (value: V, chunk: number) => boolean): boolean {
  if (a.size !== b.size) return false;
  for (const [c, v] of a) if (!b.has(c) || (match !== undefined && !match(v, c))) return false;
  return true;
}

async function readOptional(file: string): Promise<Buffer | undefined> {
  try {
    return await fs.promises.readFile(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw toBdsnapError(err);
  }
}

async function readJournal(file: string): Promise<Journal | undefined> {
  const raw = await readOptional(file);
  if (raw === undefined) return undefined;
  try {
    const j = JSON.parse(raw.toString('utf8')) as Journal;
    if (j.state === 'running' || j.state === 'done') return j;
  } catch {
    // fall through
  }
  throw new BdsnapError('ECORRUPT', `${file} is not a valid restore journal`);
}

async function readOriginal(s: LoadedSession, position: number, lengthBytes: number): Promise<Buffer> {
  const buf = Buffer.allocUnsafe(lengthBytes);
  if ((await preadFully(s.fd, buf, position)) !== lengthBytes) throw new BdsnapError('ECORRUPT', `${s.info.dir}: the store ended while reading`);
  return buf;
}

/** Device end digests by algorithm, then by chunk. */
type DeviceDigests = Map<DigestAlgorithm, Map<number, Buffer>>;

async function digestDevice(devicePath: string, wanted: Map<number, DigestAlgorithm>, cs: number, sizeBytes: number): Promise<DeviceDigests> {
  const byAlgorithm = new Map<DigestAlgorithm, number[]>();
  for (const [c, algorithm] of wanted) {
    const list = byAlgorithm.get(algorithm);
    if (list) list.push(c);
    else byAlgorithm.set(algorithm, [c]);
  }
  const out: DeviceDigests = new Map();
  for (const [algorithm, chunks] of byAlgorithm) {
    out.set(algorithm, await digestDeviceChunks(devicePath, chunks.sort((a, b) => a - b), cs, sizeBytes, algorithm));
  }
  return out;
}

/**
 * The newest session's digests must match the device; each older session's must match what the
 * device would hold after the newer ones were restored (the newer sessions' originals, else the
 * device). Every mismatch is collected and the first few are listed.
 */
async function verifyDigests(device: BlockDevice, loaded: LoadedSession[], cs: number, precomputed: DeviceDigests = new Map()): Promise<void> {
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

async function alreadyRestored(device: BlockDevice, plan: Map<number, { session: LoadedSession; position: number }>, chunks: number[], cs: number): Promise<boolean> {
  const current = new Map<number, Buffer>();
  await forEachChunk(device, chunks, cs, BATCH_BYTES, (c, data) => current.set(c, chunkDigest(data, DIGEST_ALGORITHM)));
  for (const c of chunks) {
    const p = plan.get(c)!;
    const original = await readOriginal(p.session, p.position, Math.min(cs, device.size - c * cs));
    if (!chunkDigest(original, DIGEST_ALGORITHM).equals(current.get(c)!)) return false;
  }
  return true;
}

/**
 * Write the plan sorted by offset: runs of adjacent chunks up to BATCH_BYTES, several in flight.
 * A run whose originals lie in order in one store is written straight from the verified bytes
 * in memory (in pieces of at least DIRECT_PIECE_BYTES); otherwise its pieces are gathered into
 * one buffer (copied from memory, or read from the store when it did not fit) and written once.
 */
async function applyPlan(
  device: BlockDevice,
  plan: Map<number, { session: LoadedSession; position: number }>,
  chunks: number[],
  cs: number,
  totalBytes: number,
  onProgress: RestoreOptions['onProgress'],
): Promise<void> {
  const maxRun = Math.max(1, BATCH_BYTES / cs);
  let doneBytes = 0;
  onProgress?.(0, totalBytes);
  // Shared by the workers: each next() hands out the next run.
  const runs = chunkRuns(chunks, maxRun);
  const worker = async (): Promise<void> => {
    let scratch: Buffer | undefined;
    const pieces: Array<{ session: LoadedSession; position: number; at: number; length: number }> = [];
    for (let run = runs.next(); !run.done; run = runs.next()) {
      const [from, to] = run.value;
      const first = chunks[from]!;
      const start = first * cs;
      const runBytes = Math.min((first + to - from) * cs, device.size) - start;
      pieces.length = 0;
      for (let k = from; k < to;) {
        const p = plan.get(chunks[k]!)!;
        let m = k + 1;
        while (m < to && plan.get(chunks[m]!)!.session === p.session && plan.get(chunks[m]!)!.position === p.position + (m - k) * cs) m++;
        const at = (chunks[k]! - first) * cs;
        const length = Math.min((chunks[m - 1]! - first + 1) * cs, runBytes) - at;
        pieces.push({ session: p.session, position: p.position, at, length });
        k = m;
      }
      // Gather the run from the stores into one buffer, then one write.
      scratch ??= Buffer.allocUnsafe(maxRun * cs);
      const buf = scratch.subarray(0, runBytes);
      for (const piece of pieces) {
        const into = buf.subarray(piece.at, piece.at + piece.length);
        if ((await preadFully(piece.session.fd, into, piece.position)) !== piece.length) {
          throw new BdsnapError('ECORRUPT', `${piece.session.info.dir}: the store ended while reading chunk ${first + piece.at / cs}`);
        }
      }
      await device.write(buf, start);
      doneBytes += runBytes;
      onProgress?.(doneBytes, totalBytes);
    }
  };
  await Promise.all(Array.from({ length: Math.min(WRITES_IN_FLIGHT, chunks.length) }, worker));
}

async function checkOutput(devicePath: string, out: string): Promise<void> {
  const [a, b] = await Promise.all([fs.promises.stat(devicePath).catch(() => undefined), fs.promises.stat(out).catch(() => undefined)]);
  const same = a !== undefined && b !== undefined && a.dev === b.dev && a.ino === b.ino;
  if (out === path.resolve(devicePath) || same) throw new BdsnapError('EINVAL', `--output ${out} is the device itself; omit --output to restore in place`);
}

async function copyToOutput(device: FileDevice, devicePath: string, out: string): Promise<FileDevice> {
  if (device.identity.kind === 'file') {
    await fs.promises.copyFile(devicePath, out).catch((err: unknown) => {
      throw toBdsnapError(err);
    });
  } else {
    const fh = await fs.promises.open(out, 'w', 0o600);
    try {
      const buf = Buffer.allocUnsafe(BATCH_BYTES);
      for (let pos = 0; pos < device.size; pos += BATCH_BYTES) {
        const part = buf.subarray(0, Math.min(BATCH_BYTES, device.size - pos));
        await device.read(part, pos);
        await fh.write(part, 0, part.length, pos);
      }
    } finally {
      await fh.close();
    }
  }
  return FileDevice.open(out);
}

/**
 * Refuse while the device is in use: a server of it holds the FileDevice lock (checked by
 * open), a filesystem on it is mounted, or it is the backing file of a loop device.
 */
export async function checkNotInUse(devicePath: string): Promise<void> {
  let real: string;
  let st: fs.Stats;
  try {
    real = await fs.promises.realpath(devicePath);
    st = await fs.promises.stat(real);
  } catch (err) {
    throw new BdsnapError('ENOENT', `the device ${devicePath} of this session does not exist: ${(err as Error).message}`, { cause: err });
  }
  const mountinfo = await fs.promises.readFile('/proc/self/mountinfo', 'utf8').catch(() => '');
  const rdev = st.isBlockDevice() ? `${Math.floor(st.rdev / 256) & 0xfff}:${(st.rdev & 0xff) | ((st.rdev >> 12) & 0xfff00)}` : undefined;
  for (const line of mountinfo.split('\n')) {
    const fields = line.split(' ');
    const sep = fields.indexOf('-');
    const source = sep >= 0 ? fields[sep + 2] : undefined;
    if ((rdev !== undefined && fields[2] === rdev) || source === real || source === devicePath) {
      throw new BdsnapError('EBUSY', `${devicePath} is mounted at ${fields[4] ?? '?'}; unmount it first`);
    }
  }
  let loops: string[] = [];
  try {
    loops = (await fs.promises.readdir('/sys/block')).filter((n) => n.startsWith('loop'));
  } catch {
    // No sysfs: nothing more to check.
  }
  for (const loop of loops) {
    const backing = await fs.promises.readFile(`/sys/block/${loop}/loop/backing_file`, 'utf8').catch(() => undefined);
    if (backing === undefined) continue;
    const file = backing.trim().replace(/ \(deleted\)$/, '');
    if (file === real || file === devicePath) {
      throw new BdsnapError('EBUSY', `${devicePath} is the backing file of /dev/${loop}; detach it first (losetup -d /dev/${loop})`);
    }
  }
}
