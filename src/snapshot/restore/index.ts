/**
 * Offline restore: put a device back as it was at the start of a session.
 *
 * Three steps, one module each:
 * 1. `chain.ts` resolves the chain: the session itself and every newer session of the same
 *    device in the same snapshot root. Applying them newest-first is the same as writing, for
 *    each chunk touched by any of them, the original stored by the oldest session of the chain
 *    that touched it.
 * 2. `check.ts` checks everything and builds that merged plan. Nothing is written before every
 *    check has passed: every record's checksum, the consistency of manifest, data, index and
 *    digests, the device size and identity, the device being free (`in-use.ts`), and the end
 *    digests (the newest session's against the device, each older one's against the content
 *    the newer restores would produce).
 * 3. `apply.ts` writes the plan, once per chunk, sorted by offset, in large batches with several
 *    writes in flight, one sync at the end. Around it, the restore journal (`journal.ts`) in
 *    the session directory marks a restore under way, so a second run after an interruption
 *    skips the digest check for that reason only and finishes it; once done, the journal says
 *    so and a further run finds nothing to do.
 *
 * Speed: the device's end digests are hashed in worker threads while this thread reads and
 * checks the stores (one CRC pass per record, large reads with one more in flight); then this
 * thread takes its share of what is left of the device pass rather than wait for it.
 */

import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { BdsnapError, toBdsnapError } from '../../errors.js';
import { FileDevice } from '../../device/file-device.js';
import type { BlockDevice } from '../../device/block-device.js';
import { JOURNAL_FILE } from '../format.js';
import { recoverSession, type SessionInfo } from '../sessions.js';
import { resolveChain } from './chain.js';
import {
  alreadyRestored, buildPlan, checkContinuity, checkIdentity, digestDevice, loadSession, readSessionDigests, verifyDigests, wantedDigests,
  type FinishedRestore, type LoadedSession, type RestorePlan,
} from './check.js';
import { applyPlan, checkOutput, copyToOutput } from './apply.js';
import { checkNoOtherWriters, checkNotInUse, type HostPaths } from '../../host/in-use.js';
import { readJournal, writeJournal, type Journal } from './journal.js';
import { openStagedOutputFile, stagedLeftovers, type StagedOutputFile } from '../../host/output-file.js';
import { checkPrivateDir } from '../../host/private-dir.js';
import { AsOfDevice } from './as-of.js';

export { AsOfDevice, findSessionByMountTime } from './as-of.js';

export { checkNotInUse, type HostPaths } from '../../host/in-use.js';

export interface RestoreOptions {
  /** Write a restored copy to this file (copy of the device, then the plan) and leave the device alone. */
  output?: string;
  /** Check everything and report the plan; write nothing. */
  dryRun?: boolean;
  /** Skip the end-digest check (checksums and sizes are still checked). */
  force?: boolean;
  onProgress?: (doneBytes: number, totalBytes: number) => void;
  /** Where the in-use check reads the mount table and sysfs (default: the host's). */
  hostPaths?: HostPaths;
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
  /** With --output: files that earlier restores into it, killed before they named it, left beside it (see stagedLeftovers). */
  leftovers: string[];
}

/**
 * In place, the device gets what the sessions hold, checked for damage but not for forgery: so
 * only from sessions, and a snapshot root, that no other user could have written (a session of
 * theirs can name any device they can read, with digests of its content, and originals of
 * their choice). Errors: EPERM, EINVAL, ENOENT.
 */
async function checkSessionsOurs(targetDir: string, dirs: string[]): Promise<void> {
  for (const dir of [path.dirname(targetDir), ...dirs]) {
    try {
      await checkPrivateDir(dir, 0o022);
    } catch (err) {
      const e = toBdsnapError(err);
      throw new BdsnapError(e.code, `refusing to restore in place from ${targetDir}: another user who could write there could have chosen what is written to the device (${e.message}); restore --output FILE writes a copy instead`, { cause: err });
    }
  }
}

/** Put the device back as it was at the start of `sessionDir`. Errors: ENOENT, ECORRUPT, EMISMATCH, ESESSION, EBUSY, EIO. */
export async function restore(sessionDir: string, options: RestoreOptions = {}): Promise<RestoreSummary> {
  const startedMs = performance.now();
  const dryRun = options.dryRun ?? false;
  const warnings: string[] = [];
  const { target, sessions: chain, targetUndone, undoes, restores } = await resolveChain(sessionDir, warnings);
  const devicePath = target.devicePath;

  const outputPath = options.output === undefined ? undefined : path.resolve(options.output);
  if (outputPath !== undefined) await checkOutput(devicePath, outputPath);
  else await checkSessionsOurs(target.dir, chain.map((s) => s.dir));
  await checkNotInUse(devicePath, options.hostPaths, { writers: false });
  const device = await FileDevice.open(devicePath, { readOnly: dryRun || outputPath !== undefined });
  const loaded: LoadedSession[] = [];
  let output: FileDevice | undefined;
  // Opened only after every check passed, so a refused restore leaves no file behind.
  let outFile: StagedOutputFile | undefined;
  try {
    // Under the device's lock now: a bdsnap holding the device was refused by it, naming what frees it.
    await checkNoOtherWriters(devicePath);
    const journalPath = path.join(target.dir, JOURNAL_FILE);
    const journal = await readJournal(journalPath, devicePath);
    const resuming = journal?.state === 'running' && outputPath === undefined;
    const { plan, digestCheck, verified } = await checkChain({ chain, targetUndone, restores, device, journal, resuming, force: options.force ?? false, loaded, warnings });
    const summary = async (written: boolean): Promise<RestoreSummary> => ({
      sessionDir: target.dir,
      devicePath,
      targetPath: outputPath ?? devicePath,
      dryRun,
      sessionsApplied: loaded.map((s) => s.info.dir).reverse(),
      chunks: written ? plan.chunks.length : 0,
      bytes: written ? plan.bytes : 0,
      durationMs: Math.round(performance.now() - startedMs),
      digestCheck,
      alreadyRestored: digestCheck === 'already-restored',
      warnings,
      leftovers: outputPath === undefined ? [] : await stagedLeftovers(outputPath, outFile?.tempPath),
    });
    // A dry run plans what the real run would write: nothing when the device is already restored.
    if (dryRun) return await summary(digestCheck !== 'already-restored');
    if (digestCheck === 'already-restored') {
      // The device already holds the restored content: a copy of it is the restored copy.
      if (outputPath !== undefined) {
        outFile = await openStagedOutputFile(outputPath, { replace: true });
        await (await copyToOutput(device, devicePath, outFile)).close();
        await outFile.publish();
      } else if (journal?.state === 'done' && undoes.some((dir) => !journal.sessions.includes(dir))) {
        // Sessions since the last run left the device as it was (they wrote what was there): they are undone all the same.
        await writeJournal(journalPath, { ...journal, sessions: [...new Set([...journal.sessions, ...undoes])], listsAll: true });
      }
      return await summary(false);
    }

    for (const s of loaded) {
      // Make a crashed, never-recovered session say what it is now that nobody has it open.
      if (s.info.state === 'active') await recoverSession(s.info.dir);
    }
    // Every session from the target on is undone, those an earlier restore undid included, and
    // the ones undone by earlier restores from here stay undone.
    const undone = [...new Set([...(journal?.sessions ?? []), ...undoes])];
    let writeTo: BlockDevice = device;
    if (outputPath !== undefined) {
      outFile = await openStagedOutputFile(outputPath, { replace: true });
      output = await copyToOutput(device, devicePath, outFile);
      writeTo = output;
    } else {
      await writeJournal(journalPath, { ...(journal?.stamps ? { stamps: journal.stamps } : {}), state: 'running', devicePath, sessions: undone, listsAll: true, verified, startedAt: new Date().toISOString() });
    }
    await applyPlan(writeTo, plan, options.onProgress);
    await writeTo.flush();
    // The output's name shows the restored copy only now, whole and durable.
    await outFile?.publish();
    if (outputPath === undefined) {
      const startedAt = journal?.state === 'running' ? journal.startedAt : new Date(Date.now() - (performance.now() - startedMs)).toISOString();
      // The stamp after a verified restore stands for the target's start in later checks.
      const after = verified ? await device.stamp() : undefined;
      const stamps = [...(journal?.stamps ?? []), ...(after ? [after] : [])];
      await writeJournal(journalPath, {
        ...(stamps.length > 0 ? { stamps } : {}), state: 'done', devicePath, sessions: undone, listsAll: true, verified, startedAt, finishedAt: new Date().toISOString(),
      });
    }
    return await summary(true);
  } catch (err) {
    if (!outFile) throw err;
    // A failed --output restore removes the file it was writing; the output's name never showed it.
    await output?.close();
    output = undefined;
    const e = toBdsnapError(err);
    const hint = e.code === 'ENOSPC' ? '; free space there or give another --output' : '';
    throw new BdsnapError(e.code, `${e.message}; ${await outFile.discard()}, and ${outputPath} was not touched${hint}`, { cause: err });
  } finally {
    for (const s of loaded) fs.closeSync(s.fd);
    await output?.close();
    await outFile?.close();
    await device.close();
  }
}

/**
 * The device as at the start of `sessionDir`, read-only (see as-of.ts), over `device` opened
 * by the caller, who keeps it unchanged while the view is open. Refused where a restore would
 * be (without --force), and while a restore from the session is unfinished.
 * Errors: ENOENT, ECORRUPT, EMISMATCH, ESESSION, EINVAL.
 */
export async function openAsOf(sessionDir: string, device: FileDevice): Promise<{ view: AsOfDevice; warnings: string[] }> {
  const warnings: string[] = [];
  const { target, sessions: chain, targetUndone, restores } = await resolveChain(sessionDir, warnings);
  if (path.resolve(target.devicePath) !== path.resolve(device.path)) {
    throw new BdsnapError('EINVAL', `session ${target.dir} is of ${target.devicePath}, not of ${device.path}`);
  }
  const journal = await readJournal(path.join(target.dir, JOURNAL_FILE), target.devicePath);
  if (journal?.state === 'running') {
    throw new BdsnapError('ESESSION', `a restore from ${target.dir} started at ${journal.startedAt} did not finish; run bdsnap restore ${target.dir} to finish it first`);
  }
  const loaded: LoadedSession[] = [];
  try {
    const { plan } = await checkChain({ chain, targetUndone, restores, device, journal, resuming: false, force: false, loaded, warnings });
    return { view: new AsOfDevice(device, plan, loaded), warnings };
  } catch (err) {
    for (const s of loaded) fs.closeSync(s.fd);
    throw err;
  }
}

/** What checkChain() found: the merged plan, and how far the device's content was checked. */
interface CheckedChain {
  plan: RestorePlan;
  digestCheck: RestoreSummary['digestCheck'];
  /** False when --force overrode a failed check. */
  verified: boolean;
}

/**
 * Step 2 for a resolved chain on an opened device: load every session (into `loaded`, which the
 * caller closes), build the plan, and check the device's content against the sessions' end
 * digests and stamps. A failed check throws EMISMATCH, or with `force` is reported in
 * `warnings` and overridden.
 */
async function checkChain(args: {
  chain: SessionInfo[]; targetUndone: boolean; restores: FinishedRestore[]; device: FileDevice; journal: Journal | undefined;
  resuming: boolean; force: boolean; loaded: LoadedSession[]; warnings: string[];
}): Promise<CheckedChain> {
  const { chain, targetUndone, restores, device, journal, resuming, loaded, warnings } = args;
  const target = chain[0]!;
  const devicePath = target.devicePath;
  for (const s of chain) {
    if (device.size !== s.deviceSize) {
      throw new BdsnapError('EMISMATCH', `${devicePath} is ${device.size} bytes but session ${s.dir} recorded ${s.deviceSize} bytes`);
    }
    checkIdentity(device.path, device.identity, s, warnings);
  }
  // Digest the device in workers while this thread checks the stores: every chunk some end
  // digest may be compared with (a superset of what verifyDigests reads from the device), with
  // the algorithm of the newest session that has a digest for it.
  // Each session's digests are read once: for the device pass here and by loadSession.
  const digestsOf = new Map(chain.map((s) => [s.dir, readSessionDigests(s)] as const));
  for (const d of digestsOf.values()) d.catch(() => undefined); // loadSession reports the error
  let deviceDigests: ReturnType<typeof digestDevice> | undefined;
  if (!resuming) {
    const tables = [];
    for (const s of chain) tables.push({ algorithm: s.digestAlgorithm, digests: await digestsOf.get(s.dir)!.catch(() => undefined) });
    deviceDigests = digestDevice(devicePath, wantedDigests(tables), target.chunkSize, device.size);
  }
  for (const s of chain) loaded.push(await loadSession(s, digestsOf.get(s.dir)!));
  if (targetUndone && loaded[0]) loaded[0] = { ...loaded[0], digests: undefined };
  const plan = buildPlan(loaded, target.chunkSize, device.size);

  const continuity = checkContinuity(chain, targetUndone, restores, await device.stamp());
  // With --force a failed check is reported and overridden; the journal then says the result
  // is not verified, so no later restore builds on it without --force.
  let verified = resuming ? journal?.verified !== false : true;
  const check = async (run: () => Promise<void> | void): Promise<void> => {
    try {
      await run();
    } catch (err) {
      if (!args.force || !(err instanceof BdsnapError) || err.code !== 'EMISMATCH') throw err;
      verified = false;
      warnings.push(`--force: ${err.message}`);
    }
  };
  let digestCheck: RestoreSummary['digestCheck'];
  if (resuming) {
    digestCheck = 'skipped-resume';
    warnings.push(`a restore from this session started at ${journal?.startedAt ?? '?'} did not finish: finishing it without the digest check`);
  } else if (journal?.state === 'done' && continuity.breaks.length === 0 && (await alreadyRestored(device, plan))) {
    digestCheck = 'already-restored';
  } else {
    await check(async () => {
      if (targetUndone && loaded.length === 1) {
        // Restored before and changed since, with no session recording the change: nothing to check against.
        throw new BdsnapError('EMISMATCH', `${devicePath} was restored from ${target.dir} at ${journal?.finishedAt ?? '?'} and has changed since outside bdsnap; use --force to restore again`);
      }
      // The stores are checked: this thread takes its share of what is left of the device pass.
      await verifyDigests(device, loaded, target.chunkSize, await deviceDigests?.finish());
    });
    await check(() => {
      if (continuity.breaks.length === 0) return;
      throw new BdsnapError('EMISMATCH', `${devicePath} was written outside bdsnap ${continuity.breaks.join('; ')}: no session recorded what changed, so the result would not be the state at the start of ${target.dir}; `
        + 'use --force to restore anyway (what no session recorded stays as it is now)');
    });
    warnings.push(...continuity.unknown);
    digestCheck = !verified ? 'skipped-force' : loaded.some((s) => s.digests === undefined) || continuity.unknown.length > 0 ? 'partial' : 'verified';
    if (targetUndone && loaded.length > 1) warnings.push(`${devicePath} was already restored from this session once; only the sessions since then were checked`);
  }
  return { plan, digestCheck, verified };
}
