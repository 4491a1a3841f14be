/**
 * A device's stamp: what can be read from outside that moves whenever anything writes the
 * device, so a stamp taken when bdsnap stops serving it and one taken when it serves it again
 * tell whether something else wrote it in between.
 *
 * - An image file: st_dev, st_ino, size, mtime and ctime. A user can set mtime back (touch -d);
 *   nobody can set ctime, and every write moves it.
 * - A block device: the kernel's counters of sectors written and discarded
 *   (/sys/dev/block/MAJ:MIN/stat), which every write that reaches the device moves, whoever
 *   issued it (not the request counts: an empty flush counts as a write request there, and
 *   the daemon flushes before each stamp); they start again at every boot, so they compare only within one boot id. Its
 *   size, and what names the disk behind the number (WWN, serial, dm UUID, partition start),
 *   so that another disk given the same number is not taken for it. A loop device also carries
 *   its backing file's stamp, offset and size limit: a write to the file itself bypasses the
 *   loop device's counters, and after a reboot the file's stamp alone still proves the content
 *   unchanged.
 * - Writes still in the page cache have reached neither the counters nor the file: the daemon
 *   flushes before it reads a stamp at open, and after its last write before it reads one at close.
 */

import fs from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import { BdsnapError } from '../errors.js';
import { tryParseJson } from '../stored-json.js';
import { formatDevT } from './dev-t.js';
import { loopBackingFile } from './loop-devices.js';

export const BOOT_ID_FILE = '/proc/sys/kernel/random/boot_id';
export const SYS_DEV_BLOCK_PATH = '/sys/dev/block';

export interface FileStamp {
  kind: 'file';
  /** st_dev and st_ino, decimal. */
  dev: string;
  ino: string;
  sizeBytes: number;
  /** Nanoseconds since the epoch, decimal. */
  mtimeNs: string;
  ctimeNs: string;
}

export interface BlockStamp {
  kind: 'block';
  /** `major:minor`. */
  majorMinor: string;
  sizeBytes: number;
  /** What names the disk behind the number (`wwid=...;serial=...;partition=...`), '' when sysfs names nothing. */
  diskId: string;
  /** The boot the counters belong to. */
  bootId: string;
  sectorsWritten: number;
  sectorsDiscarded: number;
  /** A loop device: what it reads and writes. */
  loop?: { backingFile: FileStamp; offsetBytes: number; sizeLimitBytes: number } | undefined;
}

export type DeviceStamp = FileStamp | BlockStamp;

const count = z.number().int().nonnegative();
const fileStampSchema = z.object({
  kind: z.literal('file'), dev: z.string(), ino: z.string(), sizeBytes: count, mtimeNs: z.string(), ctimeNs: z.string(),
}).strict();
const blockStampSchema = z.object({
  kind: z.literal('block'), majorMinor: z.string(), sizeBytes: count, diskId: z.string(), bootId: z.string(),
  sectorsWritten: count, sectorsDiscarded: count,
  loop: z.object({ backingFile: fileStampSchema, offsetBytes: count, sizeLimitBytes: count }).strict().optional(),
}).strict();
/** The schema of a stored stamp (manifests, journals, change-map headers). */
export const deviceStampSchema = z.discriminatedUnion('kind', [fileStampSchema, blockStampSchema]);

/** A stamp as stored (JSON); undefined when it does not parse as one. */
export function parseDeviceStamp(text: string): DeviceStamp | undefined {
  return tryParseJson(text, deviceStampSchema);
}

/** Where the stamp's facts are read from; tests point these at crafted files. */
export interface StampSources {
  /** Default /sys/dev/block. */
  sysDevBlock?: string;
  /** Default /proc/sys/kernel/random/boot_id. */
  bootIdFile?: string;
}

/** This boot's id; '' when it cannot be read (nothing can then be proven to come from this boot). */
export function readBootId(file = BOOT_ID_FILE): string {
  // It cannot change while this process runs: read it once (tests point `file` elsewhere).
  if (file === BOOT_ID_FILE && thisBootId !== undefined) return thisBootId;
  let id: string;
  try {
    id = fs.readFileSync(file, 'utf8').trim();
  } catch {
    id = '';
  }
  if (file === BOOT_ID_FILE && id !== '') thisBootId = id;
  return id;
}

let thisBootId: string | undefined;

/** Size of a block device from sysfs (512-byte sectors). Errors: EIO. */
export async function blockDeviceSizeBytes(devicePath: string, rdev: number | bigint, sysDevBlock = SYS_DEV_BLOCK_PATH): Promise<number> {
  const sysPath = path.join(sysDevBlock, formatDevT(rdev), 'size');
  try {
    return Number((await fs.promises.readFile(sysPath, 'utf8')).trim()) * 512;
  } catch (err) {
    throw new BdsnapError('EIO', `cannot read the size of block device ${devicePath} from ${sysPath}`, { cause: err });
  }
}

/** The stamp of the image file or block device at `devicePath` now. Errors: ENOENT, EINVAL, EIO. */
export async function readDeviceStamp(devicePath: string, sources: StampSources = {}): Promise<DeviceStamp> {
  const st = await statBig(devicePath);
  if (st.isFile()) return fileStamp(st);
  if (!st.isBlockDevice()) throw new BdsnapError('EINVAL', `${devicePath} is neither a regular image file nor a block device`);
  const sysDevBlock = sources.sysDevBlock ?? SYS_DEV_BLOCK_PATH;
  const majorMinor = formatDevT(st.rdev);
  const sys = path.join(sysDevBlock, majorMinor);
  const counters = parseStat(await readSys(path.join(sys, 'stat')), sys);
  const backing = await loopBackingFile(majorMinor, sysDevBlock);
  let loop: BlockStamp['loop'];
  if (backing !== null) {
    loop = {
      backingFile: fileStamp(await statBig(backing)),
      offsetBytes: Number(await readSys(path.join(sys, 'loop', 'offset'))),
      sizeLimitBytes: Number(await readSys(path.join(sys, 'loop', 'sizelimit'))),
    };
  }
  return {
    kind: 'block',
    majorMinor,
    sizeBytes: await blockDeviceSizeBytes(devicePath, st.rdev, sysDevBlock),
    diskId: await diskId(sys),
    bootId: readBootId(sources.bootIdFile),
    ...counters,
    loop,
  };
}

/** The stamp of an open image file, from its descriptor: it cannot be swapped by renaming the path. Errors: EINVAL. */
export async function fileStampOfFd(fd: number): Promise<FileStamp> {
  const st = await new Promise<fs.BigIntStats>((resolve, reject) => fs.fstat(fd, { bigint: true }, (err, s) => (err ? reject(err) : resolve(s))));
  if (!st.isFile()) throw new BdsnapError('EINVAL', `descriptor ${fd} is not a regular file`);
  return fileStamp(st);
}

/**
 * What a device is, whatever name points at it: the part of its stamp no write moves. An image
 * file is its (st_dev, st_ino), so a hard link or a bind-mounted path of it is the same device;
 * a block device node is its number and the disk behind it, so a second node (mknod) of the same
 * disk is the same device.
 */
export type StampIdentity =
  | { kind: 'file'; dev: string; ino: string }
  | { kind: 'block'; majorMinor: string; diskId: string };

export const stampIdentitySchema = z.discriminatedUnion('kind', [
  z.object({ kind: z.literal('file'), dev: z.string(), ino: z.string() }).strict(),
  z.object({ kind: z.literal('block'), majorMinor: z.string(), diskId: z.string() }).strict(),
]);

export function identityOfStamp(s: DeviceStamp): StampIdentity {
  return s.kind === 'file' ? { kind: 'file', dev: s.dev, ino: s.ino } : { kind: 'block', majorMinor: s.majorMinor, diskId: s.diskId };
}

/** Whether two identities are one device (a block device's number names one disk at a time). */
export function sameIdentity(a: StampIdentity, b: StampIdentity): boolean {
  if (a.kind === 'file' && b.kind === 'file') return a.dev === b.dev && a.ino === b.ino;
  if (a.kind === 'block' && b.kind === 'block') return a.majorMinor === b.majorMinor && a.diskId === b.diskId;
  return false;
}

export function describeIdentity(i: StampIdentity): string {
  return i.kind === 'file' ? `file ${i.dev}:${i.ino}` : `block device ${i.majorMinor}${i.diskId ? ` (${i.diskId})` : ''}`;
}

/** The identity of what `devicePath` names now (no counters read). Errors: ENOENT, EINVAL, EIO. */
export async function readDeviceIdentity(devicePath: string, sources: StampSources = {}): Promise<StampIdentity> {
  const st = await statBig(devicePath);
  if (st.isFile()) return { kind: 'file', dev: st.dev.toString(), ino: st.ino.toString() };
  if (!st.isBlockDevice()) throw new BdsnapError('EINVAL', `${devicePath} is neither a regular image file nor a block device`);
  const majorMinor = formatDevT(st.rdev);
  return { kind: 'block', majorMinor, diskId: await diskId(path.join(sources.sysDevBlock ?? SYS_DEV_BLOCK_PATH, majorMinor)) };
}

/** A key equal for equal stamps (fields in a fixed order). */
export function stampKey(s: DeviceStamp): string {
  if (s.kind === 'file') return `file:${s.dev}:${s.ino}:${s.sizeBytes}:${s.mtimeNs}:${s.ctimeNs}`;
  const loop = s.loop ? `:${stampKey(s.loop.backingFile)}:${s.loop.offsetBytes}:${s.loop.sizeLimitBytes}` : '';
  return `block:${s.majorMinor}:${s.sizeBytes}:${JSON.stringify(s.diskId)}:${s.bootId}:${s.sectorsWritten}:${s.sectorsDiscarded}${loop}`;
}

/** How a recorded stamp compares with the stamp now. */
export type StampComparison =
  | { same: true }
  /** `proven`: the device was changed (or is another one); otherwise its content cannot be vouched for. */
  | { same: false; proven: boolean; detail: string };

/**
 * Compare the stamp recorded when bdsnap stopped serving a device with its stamp now. Any
 * difference is a change, but for a block device's counters from another boot, which prove
 * nothing either way (unless the loop device's backing file proves the content unchanged).
 */
export function compareDeviceStamps(recorded: DeviceStamp, now: DeviceStamp, when = 'while it was not served'): StampComparison {
  const changed = (detail: string): StampComparison => ({ same: false, proven: true, detail });
  if (recorded.kind !== now.kind) return changed(`it was ${describeKind(recorded.kind)} and is now ${describeKind(now.kind)}`);
  if (recorded.kind === 'file' && now.kind === 'file') {
    const diff = fileDifferences(recorded, now);
    return diff.length === 0 ? { same: true } : changed(`the image file changed ${when} (${diff.join(', ')})`);
  }
  const was = recorded as BlockStamp;
  const is = now as BlockStamp;
  const diff: string[] = [];
  for (const k of ['majorMinor', 'diskId', 'sizeBytes'] as const) if (was[k] !== is[k]) diff.push(`${k} ${show(was[k])} -> ${show(is[k])}`);
  if (Boolean(was.loop) !== Boolean(is.loop)) diff.push(is.loop ? 'it became a loop device' : 'it is no longer a loop device');
  if (was.loop && is.loop) {
    if (was.loop.offsetBytes !== is.loop.offsetBytes) diff.push(`loop offset ${was.loop.offsetBytes} -> ${is.loop.offsetBytes}`);
    if (was.loop.sizeLimitBytes !== is.loop.sizeLimitBytes) diff.push(`loop size limit ${was.loop.sizeLimitBytes} -> ${is.loop.sizeLimitBytes}`);
    diff.push(...fileDifferences(was.loop.backingFile, is.loop.backingFile).map((d) => `backing file ${d}`));
  }
  if (diff.length > 0) return changed(`the block device changed ${when} (${diff.join(', ')})`);
  if (was.bootId === '' || was.bootId !== is.bootId) {
    // The backing file's ctime moves with every write through any loop device, in any boot.
    if (was.loop) return { same: true };
    return {
      same: false,
      proven: false,
      detail: `the host restarted since the map was closed (boot ${was.bootId || 'unknown'}, now ${is.bootId || 'unknown'}); a block device's write counters start again at boot, so nothing proves it unchanged`,
    };
  }
  for (const k of ['sectorsWritten', 'sectorsDiscarded'] as const) if (was[k] !== is[k]) diff.push(`${k} ${was[k]} -> ${is[k]}`);
  return diff.length === 0 ? { same: true } : changed(`the block device was written ${when} (${diff.join(', ')})`);
}

function describeKind(kind: DeviceStamp['kind']): string {
  return kind === 'file' ? 'an image file' : 'a block device';
}

function show(v: string | number): string {
  return typeof v === 'string' ? JSON.stringify(v) : String(v);
}

/** Nanoseconds since the epoch as an ISO time to the nanosecond (what a reader compares), with the raw count. */
function showNs(ns: string): string {
  const n = BigInt(ns);
  const iso = new Date(Number(n / 1_000_000n)).toISOString().replace(/\.\d{3}Z$/, '');
  return `${iso}.${String(n % 1_000_000_000n).padStart(9, '0')}Z (${ns} ns)`;
}

function fileDifferences(was: FileStamp, is: FileStamp): string[] {
  const diff: string[] = [];
  if (was.dev !== is.dev || was.ino !== is.ino) diff.push(`file ${was.dev}:${was.ino} -> ${is.dev}:${is.ino}`);
  if (was.sizeBytes !== is.sizeBytes) diff.push(`size ${was.sizeBytes} -> ${is.sizeBytes}`);
  if (was.mtimeNs !== is.mtimeNs) diff.push(`mtime ${showNs(was.mtimeNs)} -> ${showNs(is.mtimeNs)}`);
  if (was.ctimeNs !== is.ctimeNs) diff.push(`ctime ${showNs(was.ctimeNs)} -> ${showNs(is.ctimeNs)}`);
  return diff;
}

function fileStamp(st: fs.BigIntStats): FileStamp {
  return { kind: 'file', dev: st.dev.toString(), ino: st.ino.toString(), sizeBytes: Number(st.size), mtimeNs: st.mtimeNs.toString(), ctimeNs: st.ctimeNs.toString() };
}

async function statBig(file: string): Promise<fs.BigIntStats> {
  try {
    return await fs.promises.stat(file, { bigint: true });
  } catch (err) {
    throw new BdsnapError('ENOENT', `cannot stat ${file}: ${(err as Error).message}`, { cause: err });
  }
}

async function readSys(file: string): Promise<string> {
  try {
    return (await fs.promises.readFile(file, 'utf8')).trim();
  } catch (err) {
    throw new BdsnapError('EIO', `cannot read ${file}: ${(err as Error).message}`, { cause: err });
  }
}

/** A sysfs attribute, or undefined when the device has none (or an empty one). */
async function readSysOptional(file: string): Promise<string | undefined> {
  try {
    const value = (await fs.promises.readFile(file, 'utf8')).trim();
    return value === '' ? undefined : value;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    // Some drivers list an attribute they cannot answer (EIO, EINVAL on read): it names nothing.
    if (code === 'ENOENT' || code === 'ENOTDIR' || code === 'EIO' || code === 'EINVAL' || code === 'ENXIO') return undefined;
    throw new BdsnapError('EIO', `cannot read ${file}: ${(err as Error).message}`, { cause: err });
  }
}

/**
 * Fields of the block layer's stat file (Documentation/block/stat.rst): 7 sectors written and
 * 14 sectors discarded (kernels before 4.18 have no discard fields; their discards count as
 * writes).
 */
function parseStat(text: string, sys: string): Pick<BlockStamp, 'sectorsWritten' | 'sectorsDiscarded'> {
  const f = text.split(/\s+/).map(Number);
  if (f.length < 11 || f.some((n) => !Number.isSafeInteger(n) || n < 0)) throw new BdsnapError('EIO', `${sys}/stat does not read as block layer counters: "${text}"`);
  return { sectorsWritten: f[6]!, sectorsDiscarded: f[13] ?? 0 };
}

const DISK_ID_ATTRIBUTES = ['wwid', 'device/wwid', 'serial', 'device/serial', 'dm/uuid', 'md/uuid'];

/** The names sysfs gives the disk at `sys` (a partition: its disk's, with its number and start). */
async function diskId(sys: string): Promise<string> {
  const parts: string[] = [];
  let disk = sys;
  const partition = await readSysOptional(path.join(sys, 'partition'));
  if (partition !== undefined) {
    parts.push(`partition=${partition}`, `start=${await readSys(path.join(sys, 'start'))}`);
    disk = path.dirname(await fs.promises.realpath(sys));
  }
  for (const attribute of DISK_ID_ATTRIBUTES) {
    const value = await readSysOptional(path.join(disk, attribute));
    if (value !== undefined) parts.push(`${attribute}=${value}`);
  }
  return parts.join(';');
}
