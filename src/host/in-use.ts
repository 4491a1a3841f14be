/**
 * Is the device in use? A restore (of a session, or of a backup) writes a device in place, so
 * it must know the device is free: not mounted, not the backing file of a loop device (a
 * server of it holds the FileDevice lock, checked by open). "Could not tell" is a refusal with
 * the reason, never a pass: a restore under a mounted filesystem corrupts it.
 */

import fs from 'node:fs';
import { BdsnapError } from '../errors.js';
import { formatDevT } from './dev-t.js';
import { SYS_BLOCK_PATH, listLoopDevices, type LoopDevice } from './loop-devices.js';
import { MOUNTINFO_PATH, readMountInfo, type MountInfoEntry } from './mountinfo.js';

/** Where the host facts are read from; tests point these at unreadable or crafted files. */
export interface HostPaths {
  /** Default /proc/self/mountinfo. */
  mountinfo?: string;
  /** Default /sys/block. */
  sysBlock?: string;
}

/** Refuse while the device is mounted or behind a loop device. Errors: ENOENT, EBUSY, EIO (cannot tell). */
export async function checkNotInUse(devicePath: string, host: HostPaths = {}): Promise<void> {
  let real: string;
  let st: fs.Stats;
  try {
    real = await fs.promises.realpath(devicePath);
    st = await fs.promises.stat(real);
  } catch (err) {
    throw new BdsnapError('ENOENT', `${devicePath} does not exist: ${(err as Error).message}`, { cause: err });
  }
  const cannotTell = (err: unknown): never => {
    throw new BdsnapError('EIO', `cannot tell whether ${devicePath} is in use, so it is not restored in place: ${(err as Error).message}`, { cause: err });
  };
  const mounts: MountInfoEntry[] = await readMountInfo(host.mountinfo ?? MOUNTINFO_PATH).catch(cannotTell);
  const majorMinor = st.isBlockDevice() ? formatDevT(st.rdev) : undefined;
  for (const m of mounts) {
    if ((majorMinor !== undefined && m.majorMinor === majorMinor) || m.source === real || m.source === devicePath) {
      throw new BdsnapError('EBUSY', `${devicePath} is mounted at ${m.mountPoint}; unmount it first`);
    }
  }
  const loops: LoopDevice[] = await listLoopDevices(host.sysBlock ?? SYS_BLOCK_PATH).catch(cannotTell);
  for (const loop of loops) {
    if (loop.backingFile === real || loop.backingFile === devicePath) {
      throw new BdsnapError('EBUSY', `${devicePath} is the backing file of ${loop.devicePath}; detach it first (losetup -d ${loop.devicePath})`);
    }
  }
}
