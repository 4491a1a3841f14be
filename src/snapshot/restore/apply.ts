/**
 * Step 3 of a restore: write the plan (the journal around it is kept by the caller). The plan
 * is written sorted by offset, in runs of adjacent chunks up to BATCH_BYTES with several runs
 * in flight; each run is gathered from the stores into one buffer and written once.
 */

import fs from 'node:fs';
import path from 'node:path';
import { BdsnapError, toBdsnapError } from '../../errors.js';
import type { BlockDevice } from '../../device/block-device.js';
import { FileDevice } from '../../device/file-device.js';
import { preadFully, pwriteFully } from '../../host/fd-io.js';
import type { StagedOutputFile } from '../../host/output-file.js';
import { chunkRuns } from '../chunk-runs.js';
import { BATCH_BYTES, type LoadedSession, type RestorePlan } from './check.js';

const WRITES_IN_FLIGHT = 4;

export async function applyPlan(device: BlockDevice, plan: RestorePlan, onProgress?: (doneBytes: number, totalBytes: number) => void): Promise<void> {
  const { chunks, chunkSize: cs, bytes: totalBytes } = plan;
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
      // Adjacent chunks whose originals lie in order in one store are read in one piece.
      for (let k = from; k < to;) {
        const session = plan.sessionOf[k]!;
        const position = plan.positions[k]!;
        let m = k + 1;
        while (m < to && plan.sessionOf[m] === session && plan.positions[m] === position + (m - k) * cs) m++;
        const at = (chunks[k]! - first) * cs;
        const length = Math.min((chunks[m - 1]! - first + 1) * cs, runBytes) - at;
        pieces.push({ session: plan.sessions[session]!, position, at, length });
        k = m;
      }
      scratch ??= Buffer.allocUnsafe(maxRun * cs);
      const buf = scratch.subarray(0, runBytes);
      for (const piece of pieces) {
        const into = buf.subarray(piece.at, piece.at + piece.length);
        if ((await preadFully(piece.session.fd, into, piece.position)) !== piece.length) {
          throw new BdsnapError('ECORRUPT', `${piece.session.info.dir}: the store ended while reading chunk ${first + piece.at / cs}`);
        }
      }
      await device.write(buf, start);
      // Start writing the run back now, so the final flush does not wait for all of it.
      device.startWriteback?.(start, runBytes);
      doneBytes += runBytes;
      onProgress?.(doneBytes, totalBytes);
    }
  };
  await Promise.all(Array.from({ length: Math.min(WRITES_IN_FLIGHT, chunks.length) }, worker));
}

/** Refuse an --output that is the device itself. Errors: EINVAL. */
export async function checkOutput(devicePath: string, out: string): Promise<void> {
  const [a, b] = await Promise.all([fs.promises.stat(devicePath).catch(() => undefined), fs.promises.stat(out).catch(() => undefined)]);
  const same = a !== undefined && b !== undefined && a.dev === b.dev && a.ino === b.ino;
  if (out === path.resolve(devicePath) || same) throw new BdsnapError('EINVAL', `--output ${out} is the device itself; omit --output to restore in place`);
}

/**
 * Copy the device into the opened output file and open the copy as a device (the restored copy
 * is written there). Everything goes through the descriptor opened by `openStagedOutputFile`.
 */
export async function copyToOutput(device: FileDevice, devicePath: string, out: StagedOutputFile): Promise<FileDevice> {
  if (device.identity.kind === 'file') {
    // copyFile can share blocks (reflink, copy_file_range); /proc/self/fd names the opened file.
    await fs.promises.copyFile(devicePath, out.procPath).catch((err: unknown) => {
      // Named by its temporary name: the /proc path in the system's message says nothing.
      const e = toBdsnapError(err);
      throw new BdsnapError(e.code, `cannot copy ${devicePath} to ${out.tempPath}: ${e.code === 'ENOSPC' ? 'no space left on device' : e.message}`, { cause: err });
    });
    fs.fchmodSync(out.fd, out.mode); // copyFile copies the device's mode
  } else {
    const buf = Buffer.allocUnsafe(BATCH_BYTES);
    for (let pos = 0; pos < device.size; pos += BATCH_BYTES) {
      const part = buf.subarray(0, Math.min(BATCH_BYTES, device.size - pos));
      await device.read(part, pos);
      await pwriteFully(out.fd, part, pos);
    }
  }
  return FileDevice.open(out.procPath, { followSymlinks: true });
}
