/**
 * restoreBackup: write one device of a backup, whole, to the device itself or to a new file.
 *
 * Before a byte is written: the manifest must read, the device must be in it, and every piece
 * it names must exist in the store; the target must be a regular file or a block device that
 * is not in use: not mounted, not behind a loop device (checkNotInUse, which refuses when it
 * cannot tell), and not open in another bdsnap process, the daemon included (FileDevice's
 * lock). Each piece is checked
 * against its hash as it is read, so a damaged piece stops the restore with its name.
 * Zero pieces are holes in a file target and written zeroes on a block device.
 */

import fs from 'node:fs';
import path from 'node:path';
import { FileDevice } from '../device/file-device.js';
import { BdsnapError, toBdsnapError } from '../errors.js';
import { checkNotInUse } from '../host/in-use.js';
import type { ProgressSink } from './create.js';
import { expandSlots, pieceObject } from './format.js';
import { PiecePool } from './piece-pool.js';
import type { Repository } from './repository.js';
import { runLimited } from './run-limited.js';

/** Decoded pieces kept for later slots at most (of the piece size each). */
const MAX_CACHED_PIECES = 32;
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
}

export async function restoreBackup(repo: Repository, id: string, device: string, options: RestoreOptions = {}): Promise<RestoreSummary> {
  const startedMs = Date.now();
  const manifest = await repo.manifest(id);
  const entry = manifest.devices.find((d) => d.device === device) ?? manifest.devices.find((d) => d.device === path.resolve(device));
  if (!entry) {
    throw new BdsnapError('ENOENT', `backup ${id} has no device ${device} (it has ${manifest.devices.map((d) => d.device).join(', ')})`);
  }
  const P = manifest.pieceSizeBytes;
  const slots = expandSlots(entry, P);
  const stored = await repo.storedPieceNames();
  const missing = [...new Set(slots.filter((s): s is string => s !== null && !stored.has(s)))];
  if (missing.length > 0) {
    throw new BdsnapError('ECORRUPT', `backup ${id} is damaged: ${missing.length} of its pieces ${missing.length === 1 ? 'is' : 'are'} missing (${missing.slice(0, 3).join(', ')}${missing.length > 3 ? ', ...' : ''}); nothing was written`);
  }
  const target = options.output !== undefined ? path.resolve(options.output) : entry.device;
  const { file, holes } = await openTarget(target, options.output !== undefined, entry.sizeBytes);
  const toWrite = slots.map((_, i) => i).filter((i) => slots[i] !== null || !holes);
  options.progress?.start(toWrite.reduce((n, i) => n + Math.min(P, entry.sizeBytes - i * P), 0));
  let writtenBytes = 0;
  const pool = new PiecePool();
  // A piece that fills many slots (a repeated pattern) is read and checked once, and kept until
  // its last slot is written, within a bound on memory.
  const uses = new Map<string, number>();
  for (const h of slots) if (h !== null) uses.set(h, (uses.get(h) ?? 0) + 1);
  const cache = new Map<string, Promise<Buffer>>();
  const load = async (hash: string): Promise<Buffer> => pool.decode(await repo.store.get(pieceObject(hash)), hash);
  /** `left`: how many slots still use the piece after this one. */
  const piece = (hash: string, left: number): Promise<Buffer> => {
    const cached = cache.get(hash);
    if (cached) {
      if (left === 0) cache.delete(hash);
      return cached;
    }
    const p = load(hash);
    if (left > 0 && cache.size < MAX_CACHED_PIECES) cache.set(hash, p);
    return p;
  };
  // Pieces kept as local files are read, checked and written by the pool's threads, through a
  // descriptor of their own (the FileDevice keeps the lock, does the zeroes and the final sync:
  // fdatasync covers the file whichever descriptor wrote it).
  const localPath = repo.store.localPath?.bind(repo.store);
  const direct = localPath ? { localPath, fh: await fs.promises.open(target, 'r+').catch((err: unknown) => { throw toBdsnapError(err); }) } : undefined;
  const stoppedAt = (at: number) => (err: unknown): never => {
    const e = toBdsnapError(err);
    throw new BdsnapError(e.code, `restore of ${target} from backup ${id} stopped at ${at}: ${e.message}`, { cause: err });
  };
  try {
    let hintedTo = 0;
    await runLimited(toWrite, PIECES_IN_FLIGHT, async (i) => {
      options.signal?.throwIfAborted();
      const hash = slots[i]!;
      const length = Math.min(P, entry.sizeBytes - i * P);
      if (hash === null) {
        await file.zero(i * P, length);
      } else {
        const left = uses.get(hash)! - 1;
        uses.set(hash, left);
        if (direct) {
          await pool.place({ file: direct.localPath(pieceObject(hash)), hash, fd: direct.fh.fd, offsetBytes: i * P, lengthBytes: length, keep: left > 0 }).catch(stoppedAt(i * P));
        } else {
          const raw = await piece(hash, left).catch(stoppedAt(i * P));
          if (raw.length !== length) throw new BdsnapError('ECORRUPT', `piece ${hash} holds ${raw.length} bytes where backup ${id} needs ${length}`);
          await file.write(raw, i * P);
        }
      }
      writtenBytes += length;
      options.progress?.advance(length);
      // Slots are handed out in order: once slot i is done, those a full round of tasks
      // before it are written too (but for a straggler, which the final flush still covers).
      // Start writing them back a window at a time, so the final flush has less left to do.
      const behind = Math.max(0, i - PIECES_IN_FLIGHT) * P;
      if (behind - hintedTo >= WRITEBACK_WINDOW_BYTES) {
        file.startWriteback(hintedTo, behind - hintedTo);
        hintedTo = behind;
      }
    });
    await file.flush();
  } finally {
    await pool.close();
    await direct?.fh.close();
    await file.close();
  }
  return { id, device: entry.device, target, sizeBytes: entry.sizeBytes, writtenBytes, zeroPieces: slots.filter((s) => s === null).length, durationMs: Date.now() - startedMs };
}

/**
 * Open the target for writing. A file (new for --output, or the device's image file) is cut
 * to zero and set to the size, so zero pieces are holes; a block device must not be mounted
 * and must be large enough.
 */
async function openTarget(target: string, output: boolean, sizeBytes: number): Promise<{ file: FileDevice; holes: boolean }> {
  const st = await fs.promises.stat(target).catch((err: unknown) => {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw toBdsnapError(err);
  });
  if (!st && !output) throw new BdsnapError('ENOENT', `${target} does not exist; give --output FILE to restore into a new file`);
  if (st && !st.isFile() && !(st.isBlockDevice() && !output)) {
    throw new BdsnapError('EINVAL', `${target} is not a regular file${output ? '' : ' or a block device'}; refusing to write to it`);
  }
  if (st) await checkNotInUse(target);
  if (st?.isBlockDevice()) {
    const file = await openFree(target);
    if (file.size < sizeBytes) {
      await file.close();
      throw new BdsnapError('ENOSPC', `${target} holds ${file.size} bytes; the backup needs ${sizeBytes}`);
    }
    return { file, holes: false };
  }
  // The lock of FileDevice.open refuses a file another bdsnap process has open; take it before
  // the file is cut.
  if (!st) await fs.promises.writeFile(target, '', { flag: 'wx' }).catch((err: unknown) => { throw toBdsnapError(err); });
  const file = await openFree(target);
  await file.close();
  await fs.promises.truncate(target, 0);
  await fs.promises.truncate(target, sizeBytes);
  return { file: await FileDevice.open(target), holes: true };
}

/** FileDevice.open, with EBUSY saying who may hold the device. */
async function openFree(target: string): Promise<FileDevice> {
  try {
    return await FileDevice.open(target);
  } catch (err) {
    const e = toBdsnapError(err);
    if (e.code !== 'EBUSY') throw e;
    throw new BdsnapError('EBUSY', `${target} is in use, so it is not restored in place: ${e.message}`, { cause: err });
  }
}
