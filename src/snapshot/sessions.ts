/**
 * Offline access to session directories: listing them from their manifests, and recovering one
 * after a crash (cut the torn tail of data.bin, rebuild index.bin, mark it interrupted).
 * Listing never changes anything; recovery must only run on a session no process has open.
 * The session's writer holds an exclusive flock on its data.bin for as long as the session is
 * open (the kernel drops it when the writer exits, however it ends), and recovery takes that
 * lock before it touches anything: a session that is still being written is refused, never cut
 * or marked interrupted under its writer.
 */

import fs from 'node:fs';
import path from 'node:path';
import { BdsnapError, toBdsnapError } from '../errors.js';
import { writeFileAtomic } from '../host/atomic-file.js';
import { readDeviceStamp, type DeviceStamp } from '../host/device-stamp.js';
import { formatDevT } from '../host/dev-t.js';
import { closeFd, fdatasyncFd, ftruncateFd, openFd, pwriteFully, removePath } from '../host/fd-io.js';
import { lockOpenFile } from '../host/lock-file.js';
import {
  DATA_FILE, DIGESTS_FILE, INDEX_FILE, encodeIndex, encodeSealRecords, FORGOTTEN_SUFFIX, isSessionDirNameOf, readManifest, writeManifest, SESSION_FILE_MODE, type DigestAlgorithm, type SessionState, type Durability,
} from './format.js';
import { scanData } from './store-scan.js';

/** One session directory as its manifest describes it. */
export interface SessionInfo {
  /** Absolute path of the session directory. */
  dir: string;
  devicePath: string;
  deviceSize: number;
  deviceIdentity: Record<string, unknown>;
  chunkSize: number;
  durability: Durability;
  /** ISO 8601, UTC. */
  mountTime: string;
  /** ISO 8601, or null while active / when the end was not recorded (crash). */
  endTime: string | null;
  /** 'unreadable': the directory looks like a session but its manifest is missing or corrupt. */
  state: SessionState | 'unreadable';
  preservedChunks: number;
  preservedBytes: number;
  storeBytes: number;
  /** Chunks with an end digest (complete sessions), else null. */
  digestedChunks: number | null;
  /** How the end digests were computed. */
  digestAlgorithm: DigestAlgorithm;
  failedReason: string | null;
  /** The device's stamp before the session's first write and after its last (absent: not known). */
  startStamp?: DeviceStamp;
  endStamp?: DeviceStamp;
  /** For 'unreadable': what is wrong. */
  problem?: string;
  /** Set by recoverSession: bytes cut from a torn tail of data.bin, and why. */
  recovery?: { cutBytes: number; reason?: string };
}

function infoFromManifest(dir: string, m: Awaited<ReturnType<typeof readManifest>>): SessionInfo {
  return {
    dir,
    devicePath: m.devicePath,
    deviceSize: m.deviceSize,
    deviceIdentity: m.deviceIdentity,
    chunkSize: m.chunkSize,
    durability: m.durability,
    mountTime: m.mountTime,
    endTime: m.endTime,
    state: m.state,
    preservedChunks: m.preservedChunks,
    preservedBytes: m.preservedBytes,
    storeBytes: m.storeBytes,
    digestedChunks: m.digestedChunks,
    digestAlgorithm: m.digestAlgorithm ?? 'sha256',
    failedReason: m.failedReason,
    ...(m.startStamp ? { startStamp: m.startStamp } : {}),
    ...(m.endStamp ? { endStamp: m.endStamp } : {}),
  };
}

/** Read one session directory's manifest. Errors: ENOENT, ECORRUPT. */
export async function readSessionInfo(dir: string): Promise<SessionInfo> {
  const abs = path.resolve(dir);
  return infoFromManifest(abs, await readManifest(abs));
}

/** Order: mount time, then the collision suffix (`-2`, `-10`) numerically. */
export function compareSessions(a: SessionInfo, b: SessionInfo): number {
  if (a.mountTime !== b.mountTime) return a.mountTime < b.mountTime ? -1 : 1;
  const suffix = (d: string): number => Number(/-(\d+)$/.exec(path.basename(d))?.[1] ?? 1);
  return suffix(a.dir) - suffix(b.dir) || (a.dir < b.dir ? -1 : a.dir > b.dir ? 1 : 0);
}

/**
 * Sessions under `snapshotRoot`, oldest first, optionally only those of `devicePath`.
 * Directories whose manifest cannot be read are listed as 'unreadable' (when a device is
 * given, only those whose name says they belong to it). A missing root gives an empty list.
 */
export async function listSessions(snapshotRoot: string, devicePath?: string): Promise<SessionInfo[]> {
  const root = path.resolve(snapshotRoot);
  let entries: fs.Dirent[];
  try {
    entries = await fs.promises.readdir(root, { withFileTypes: true });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw toBdsnapError(err);
  }
  const out: SessionInfo[] = [];
  for (const e of entries) {
    if (!e.isDirectory() || e.name.endsWith(FORGOTTEN_SUFFIX)) continue;
    const dir = path.join(root, e.name);
    try {
      const info = await readSessionInfo(dir);
      if (devicePath === undefined || info.devicePath === devicePath) out.push(info);
    } catch (err) {
      if (devicePath !== undefined && !isSessionDirNameOf(e.name, devicePath)) continue;
      out.push({
        dir, devicePath: devicePath ?? '', deviceSize: 0, deviceIdentity: {}, chunkSize: 0, durability: 'process',
        mountTime: '', endTime: null, state: 'unreadable', preservedChunks: 0, preservedBytes: 0, storeBytes: 0,
        digestedChunks: null, digestAlgorithm: 'sha256', failedReason: null, problem: (err as Error).message,
      });
    }
  }
  return out.sort(compareSessions);
}

/** The stamp of the device at `devicePath` if it is still the device of `identity` (else undefined: not known). */
async function deviceStampNow(devicePath: string, identity: Record<string, unknown>): Promise<DeviceStamp | undefined> {
  const stamp = await readDeviceStamp(devicePath).catch(() => undefined);
  if (stamp?.kind === 'file' && identity.kind === 'file' && stamp.ino === String(identity.ino)) return stamp;
  if (stamp?.kind === 'block' && identity.kind === 'block' && typeof identity.rdev === 'number' && stamp.majorMinor === formatDevT(identity.rdev)) return stamp;
  return undefined;
}

/**
 * After a crash: cut the torn tail of data.bin, seal the cloned records the session had not
 * sealed yet (their checksum computed from the store as it is now), rebuild index.bin from the
 * data, drop any digest file (digests are only trusted from a clean close) and mark the session
 * 'interrupted'. A complete or failed session is returned unchanged. Errors: ENOENT, ECORRUPT.
 */
export async function recoverSession(sessionDir: string): Promise<SessionInfo> {
  const dir = path.resolve(sessionDir);
  const found = await readManifest(dir);
  if (found.state === 'complete' || found.state === 'failed') return infoFromManifest(dir, found);
  const dataPath = path.join(dir, DATA_FILE);
  let fd: number;
  try {
    fd = await openFd(dataPath, 'r+');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new BdsnapError('ECORRUPT', `${dir}: the data file ${DATA_FILE} is missing`, { cause: err });
    throw toBdsnapError(err);
  }
  let manifest = found;
  let cutBytes = 0;
  let reason: string | undefined;
  let scan;
  let storeBytes: number;
  try {
    // Held until fd closes: no writer can come back, and a second recovery waits its turn.
    if (lockOpenFile(fd, dataPath) === 'held-elsewhere') {
      throw new BdsnapError('EBUSY', `${dir} is still open by a running process (its session is live); end that session (or stop its daemon) first`);
    }
    // The writer may have ended the session between the first read and the lock.
    manifest = await readManifest(dir);
    if (manifest.state === 'complete' || manifest.state === 'failed') return infoFromManifest(dir, manifest);
    scan = await scanData(fd, { chunkSize: manifest.chunkSize, deviceSize: manifest.deviceSize, allowTornTail: true, where: dataPath });
    if (scan.validBytes < scan.fileBytes) {
      cutBytes = scan.fileBytes - scan.validBytes;
      reason = scan.tornReason;
      await ftruncateFd(fd, scan.validBytes);
    }
    storeBytes = scan.validBytes;
    for (const { header, payload } of encodeSealRecords(scan.unsealed)) {
      const record = Buffer.concat([header, payload]);
      await pwriteFully(fd, record, storeBytes);
      storeBytes += record.length;
    }
    await fdatasyncFd(fd);
  } finally {
    await closeFd(fd);
  }
  await writeFileAtomic(path.join(dir, INDEX_FILE), encodeIndex(scan.index), SESSION_FILE_MODE);
  await removePath(path.join(dir, DIGESTS_FILE));
  // Nothing writes the device of a session being recovered (its process is gone), so its stamp
  // now is the one the session left.
  const endStamp = manifest.endStamp ?? await deviceStampNow(manifest.devicePath, manifest.deviceIdentity);
  const recovered = {
    ...manifest,
    ...(endStamp ? { endStamp } : {}),
    state: 'interrupted' as const,
    preservedChunks: scan.index.size,
    preservedBytes: scan.preservedBytes,
    storeBytes,
    digestedChunks: null,
  };
  await writeManifest(dir, recovered);
  return { ...infoFromManifest(dir, recovered), recovery: reason === undefined ? { cutBytes } : { cutBytes, reason } };
}
