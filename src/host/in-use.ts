/**
 * Is the device in use? A restore (of a session, or of a backup) writes a device in place, and
 * `bdsnap mount` puts a filesystem on it, so each must know the device is free: not mounted,
 * not behind a loop device, not open for writing by another process (a VM, dd: /proc), not
 * held open exclusively (a mount, swap, device-mapper, md), and not below a stacked device.
 * "Could not tell" is a refusal with the reason, never a pass: a second writer under a mounted
 * filesystem corrupts it.
 *
 * Everything is compared by identity, never by name: a hard link, a bind mount or a symlink of
 * an image is the same image. An image file is its (st_dev, st_ino); a block device node is its
 * rdev (and the rdevs of its partitions), whatever node names it.
 */

import fs from 'node:fs';
import path from 'node:path';
import { BdsnapError } from '../errors.js';
import { formatDevT } from './dev-t.js';
import { DEV_PATH, DisconnectedLoopError, SYS_BLOCK_PATH, listLoopDevices, loopBackingIdentity, type LoopDevice } from './loop-devices.js';
import { MOUNTINFO_PATH, readMountInfo, type MountInfoEntry } from './mountinfo.js';
import { describeWriters, openWriters, processCount, type OpenTarget, type OpenWriter } from './open-writers.js';

export const SYS_DEV_BLOCK_PATH = '/sys/dev/block';

/** Where the host facts are read from; tests point these at unreadable or crafted files. */
export interface HostPaths {
  /** Default /proc/self/mountinfo. */
  mountinfo?: string;
  /** Default /sys/block. */
  sysBlock?: string;
  /** Default /sys/dev/block (a block device's partitions and holders, by major:minor). */
  sysDevBlock?: string;
  /** Default /dev (where loop device nodes are opened to ask the kernel for their backing file). */
  dev?: string;
}

export interface InUseOptions {
  /**
   * Probe a block device with an O_EXCL open (EBUSY while mounted or claimed). Default true.
   * Off only where the caller itself holds the device open with O_EXCL: the probe would find
   * that caller, and its hold already keeps every other exclusive user out.
   */
  exclusiveProbe?: boolean;
  /**
   * Refuse while another process has it open for writing (/proc). Default true. Off where the
   * caller takes the device's lock first and then calls checkNoOtherWriters, so that a bdsnap
   * process holding the device is refused by the lock, which says what frees it.
   */
  writers?: boolean;
}

/** A block device or one of its partitions. */
interface BlockMember {
  name: string;
  majorMinor: string;
  /** Its sysfs directory. */
  dir: string;
}

/**
 * Refuse while the device is mounted, behind a loop device, held open exclusively or held by
 * a stacked device. Errors: ENOENT, EBUSY (with what holds it and what to do), EIO (cannot tell).
 */
export async function checkNotInUse(devicePath: string, host: HostPaths = {}, options: InUseOptions = {}): Promise<void> {
  let real: string;
  let st: fs.BigIntStats;
  try {
    real = await fs.promises.realpath(devicePath);
    st = await fs.promises.stat(real, { bigint: true });
  } catch (err) {
    throw new BdsnapError('ENOENT', `${devicePath} does not exist: ${(err as Error).message}`, { cause: err });
  }
  const cannotTell = cannotTellOf(devicePath);
  const block = st.isBlockDevice();
  const members = block ? await blockMembers(st.rdev, host.sysDevBlock ?? SYS_DEV_BLOCK_PATH).catch(cannotTell) : [];
  const memberNumbers = new Set(members.map((m) => m.majorMinor));

  const mounts: MountInfoEntry[] = await readMountInfo(host.mountinfo ?? MOUNTINFO_PATH).catch(cannotTell);
  for (const m of mounts) {
    // A file is mounted only through a loop device (below); a source naming it is a filesystem
    // that reads it directly (fuse2fs and the like): refused too.
    if (memberNumbers.has(m.majorMinor) || (!block && (m.source === real || m.source === devicePath))) {
      throw new BdsnapError('EBUSY', `${devicePath} is mounted at ${m.mountPoint}; unmount it first`);
    }
  }

  const loops: LoopDevice[] = await listLoopDevices(host.sysBlock ?? SYS_BLOCK_PATH).catch(cannotTell);
  for (const loop of loops) {
    const backing = await loopBackingIdentity(loop, host.dev ?? DEV_PATH).catch(async (err: unknown) => {
      // Its file's filesystem is disconnected for good: an image file stat still reaches, asked
      // after that answer, is elsewhere. (Not for a device node, which lives apart from its name.)
      if (err instanceof DisconnectedLoopError && !block && (await stillReaches(real, st))) return null;
      return cannotTell(err);
    });
    if (backing === null) continue;
    const sameFile = formatDevT(backing.dev) === formatDevT(st.dev) && backing.ino === st.ino;
    const sameDevice = block && backing.rdev !== 0n && memberNumbers.has(formatDevT(backing.rdev));
    if (!sameFile && !sameDevice) continue;
    const named = loop.backingFile === real ? '' : ` (named ${loop.backingFile}${loop.backingFileDeleted ? ', deleted' : ''} there)`;
    const mounted = loop.majorMinor === null ? undefined : mounts.find((m) => m.majorMinor === loop.majorMinor);
    if (mounted) {
      throw new BdsnapError('EBUSY', `${devicePath} is the backing file of ${loop.devicePath}${named}, mounted at ${mounted.mountPoint}; unmount it first (umount ${mounted.mountPoint})`);
    }
    throw new BdsnapError('EBUSY', `${devicePath} is the backing file of ${loop.devicePath}${named}; detach it first (losetup -d ${loop.devicePath})`);
  }

  // A process that writes it (a VM, dd, another server) writes around whatever bdsnap does.
  if (options.writers !== false) refuseWriters(devicePath, await openWriters(block ? { kind: 'block', majorMinors: memberNumbers } : { kind: 'file', dev: st.dev, ino: st.ino }).catch(cannotTell));

  if (!block) return;
  for (const member of members) {
    const holders = await fs.promises.readdir(path.join(member.dir, 'holders')).catch(cannotTell);
    if (holders.length > 0) {
      const what = member === members[0] ? devicePath : `its partition ${member.name}`;
      throw new BdsnapError('EBUSY', `${what} is held by ${holders.join(', ')} (device-mapper, md or another stacked device); remove that first`);
    }
  }
  if (options.exclusiveProbe === false) return;
  let probe: fs.promises.FileHandle;
  try {
    probe = await fs.promises.open(real, fs.constants.O_RDONLY | fs.constants.O_EXCL);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EBUSY') {
      throw new BdsnapError('EBUSY', `${devicePath} is open exclusively by another user (a mount, swap, device-mapper, md, or a bdsnap that serves it); stop that first`);
    }
    return cannotTell(err);
  }
  await probe.close();
}

/** Whether stat of `file` still reaches the file `st` describes. */
function stillReaches(file: string, st: fs.BigIntStats): Promise<boolean> {
  return fs.promises.stat(file, { bigint: true }).then((now) => now.dev === st.dev && now.ino === st.ino, () => false);
}

function refuseWriters(devicePath: string, writers: readonly OpenWriter[]): void {
  if (writers.length === 0) return;
  const one = processCount(writers) === 1;
  throw new BdsnapError('EBUSY', `${devicePath} is open for writing by ${describeWriters(writers)}; stop ${one ? 'that process' : 'those processes'} first: ${one ? 'its' : 'their'} writes would go around bdsnap`);
}

/**
 * Refuse (EBUSY) while another process has the device open for writing, for a caller that has
 * taken the device's lock since checkNotInUse (given `writers: false`): a bdsnap process that
 * holds the device is then named by the lock, with what frees it. Errors: EIO (cannot tell).
 */
export async function checkNoOtherWriters(devicePath: string): Promise<void> {
  refuseWriters(devicePath, await otherWritersOf(devicePath));
}

/** The other processes that have the device open for writing now. Errors: EIO (cannot tell). */
export async function otherWritersOf(devicePath: string): Promise<OpenWriter[]> {
  return openWriters(await openTargetOf(devicePath)).catch(cannotTellOf(devicePath));
}

function cannotTellOf(devicePath: string): (err: unknown) => never {
  return (err) => {
    throw new BdsnapError('EIO', `cannot tell whether ${devicePath} is in use, so bdsnap leaves it alone: ${(err as Error).message}`, { cause: err });
  };
}

async function openTargetOf(devicePath: string): Promise<OpenTarget> {
  const cannotTell = cannotTellOf(devicePath);
  const st = await fs.promises.stat(devicePath, { bigint: true }).catch(cannotTell);
  return st.isBlockDevice()
    ? { kind: 'block', majorMinors: new Set((await blockMembers(st.rdev, SYS_DEV_BLOCK_PATH).catch(cannotTell)).map((m) => m.majorMinor)) }
    : { kind: 'file', dev: st.dev, ino: st.ino };
}

/**
 * A block device and, for a whole disk, its partitions (sysfs subdirectories with a
 * `partition` file), each with its major:minor. Errors: whatever sysfs answers.
 */
async function blockMembers(rdev: bigint, sysDevBlock: string): Promise<BlockMember[]> {
  const majorMinor = formatDevT(rdev);
  const dir = path.join(sysDevBlock, majorMinor);
  const self: BlockMember = { name: path.basename(await fs.promises.realpath(dir)), majorMinor, dir };
  const out = [self];
  for (const entry of await fs.promises.readdir(dir, { withFileTypes: true })) {
    if (!entry.isDirectory()) continue;
    const sub = path.join(dir, entry.name);
    if (!fs.existsSync(path.join(sub, 'partition'))) continue;
    out.push({ name: entry.name, majorMinor: (await fs.promises.readFile(path.join(sub, 'dev'), 'utf8')).trim(), dir: sub });
  }
  return out;
}
