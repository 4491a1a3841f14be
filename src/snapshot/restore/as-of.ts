/**
 * A device as it was at the start of an earlier session, read-only, without writing the device:
 * the content a restore of that session would write, read where it lies. The same chain and
 * the same checks as a restore (`index.ts`): a chain a restore would refuse is refused here,
 * so the view is exact or not there at all. Reads of a chunk some session of the chain kept
 * come from the oldest such session's store; every other chunk from the device, which must
 * not change while the view is open (the caller holds it: the daemon refuses users of it).
 */

import fs from 'node:fs';
import { BdsnapError } from '../../errors.js';
import { checkRange, type BlockDevice, type BlockSizes, type Extent } from '../../device/block-device.js';
import type { FileDevice } from '../../device/file-device.js';
import { preadFully } from '../../host/fd-io.js';
import { listSessions, type SessionInfo } from '../sessions.js';
import type { LoadedSession, RestorePlan } from './check.js';

/** Session mount times are compared without their separators: `2026-11-23T10:47:14.273Z` and `20261123T104714.273Z` are one time. */
function compactTime(t: string): string {
  return t.replace(/[-:]/g, '');
}

/** The session of `devicePath` that started at `mountTime`. Errors: ENOENT. */
export async function findSessionByMountTime(snapshotRoot: string, devicePath: string, mountTime: string): Promise<SessionInfo> {
  const wanted = compactTime(mountTime);
  const sessions = await listSessions(snapshotRoot, devicePath);
  const found = sessions.find((s) => s.mountTime !== '' && compactTime(s.mountTime) === wanted);
  if (!found) {
    const known = sessions.filter((s) => s.mountTime !== '').map((s) => compactTime(s.mountTime));
    throw new BdsnapError('ENOENT', `${devicePath} has no session that started at ${mountTime} under ${snapshotRoot}`
      + (known.length > 0 ? ` (sessions: ${known.slice(-5).join(', ')}; see bdsnap list ${devicePath})` : ' (see bdsnap list)'));
  }
  return found;
}

/** The read-only view. `close()` closes the stores it reads, not the device below. */
export class AsOfDevice implements BlockDevice {
  readonly readOnly = true;
  readonly canTrim = false;
  readonly canFastZero = false;
  readonly canMultiConn = true;
  readonly #device: FileDevice;
  readonly #plan: RestorePlan;
  readonly #loaded: LoadedSession[];
  #closed = false;

  constructor(device: FileDevice, plan: RestorePlan, loaded: LoadedSession[]) {
    this.#device = device;
    this.#plan = plan;
    this.#loaded = loaded;
  }

  get size(): number { return this.#device.size; }
  get blockSizes(): BlockSizes { return this.#device.blockSizes; }

  /** The plan's index of the first chunk >= `chunk`. */
  #lowerBound(chunk: number): number {
    const chunks = this.#plan.chunks;
    let lo = 0;
    let hi = chunks.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (chunks[mid]! < chunk) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  async read(target: Buffer, offsetBytes: number): Promise<void> {
    if (this.#closed) throw new BdsnapError('EIO', 'the as-of view is closed');
    checkRange(this, offsetBytes, target.length, false);
    const { chunks, chunkSize: cs, sessionOf, positions } = this.#plan;
    const end = offsetBytes + target.length;
    let pos = offsetBytes;
    let i = this.#lowerBound(Math.floor(offsetBytes / cs));
    while (pos < end) {
      const kept = i < chunks.length ? chunks[i]! * cs : Infinity;
      if (kept > pos) {
        // From here to the next kept chunk, the device holds the content.
        const until = Math.min(end, kept);
        await this.#device.read(target.subarray(pos - offsetBytes, until - offsetBytes), pos);
        pos = until;
        continue;
      }
      const chunkEnd = Math.min(kept + cs, end, this.size);
      const store = this.#loaded[sessionOf[i]!]!;
      const into = target.subarray(pos - offsetBytes, chunkEnd - offsetBytes);
      if ((await preadFully(store.fd, into, positions[i]! + (pos - kept))) !== into.length) {
        throw new BdsnapError('ECORRUPT', `${store.info.dir}: the store ended while reading chunk ${chunks[i]}`);
      }
      pos = chunkEnd;
      i++;
    }
  }

  #readOnlyError(): Promise<never> {
    return Promise.reject(new BdsnapError('EPERM', 'an as-of view is read-only'));
  }

  write(): Promise<void> { return this.#readOnlyError(); }
  trim(): Promise<void> { return this.#readOnlyError(); }
  zero(): Promise<void> { return this.#readOnlyError(); }
  flush(): Promise<void> { return Promise.resolve(); }
  cache(): Promise<void> { return Promise.resolve(); }

  /** All data: a hole of the device may hold a kept original here, so none is reported. */
  extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    checkRange(this, offsetBytes, lengthBytes, false);
    return Promise.resolve([{ length: lengthBytes, flags: 0 }]);
  }

  close(): Promise<void> {
    if (this.#closed) return Promise.resolve();
    this.#closed = true;
    for (const s of this.#loaded) fs.closeSync(s.fd);
    return Promise.resolve();
  }
}
