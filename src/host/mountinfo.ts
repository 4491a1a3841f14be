/**
 * /proc/self/mountinfo, parsed once for every layer. The kernel escapes space, tab, newline and
 * backslash in paths as `\040`, `\011`, `\012` and `\134`, so each mount is exactly one line and
 * fields split on single spaces; every path field is unescaped here, never by a caller.
 * A mountinfo that cannot be read is an error (EIO), never an empty table: a caller that asks
 * "is this mounted?" must not hear "no" because it could not tell.
 */

import fs from 'node:fs';
import path from 'node:path';
import { BdsnapError } from '../errors.js';

export const MOUNTINFO_PATH = '/proc/self/mountinfo';

export interface MountInfoEntry {
  mountId: number;
  parentId: number;
  /** `major:minor` of the filesystem's device, as the kernel prints it. */
  majorMinor: string;
  /** The directory of the filesystem that is mounted (usually `/`). */
  root: string;
  mountPoint: string;
  mountOptions: string;
  fsType: string;
  /** The mount source (a device path for block filesystems), or '' when absent. */
  source: string;
  superOptions: string;
}

/** Undo the kernel's octal escapes (`\040` is a space). */
export function unescapeMountField(field: string): string {
  return field.replace(/\\([0-7]{3})/g, (_m, octal: string) => String.fromCharCode(parseInt(octal, 8)));
}

/** Parse mountinfo text. Malformed lines are skipped; the kernel never writes them. */
export function parseMountInfo(text: string): MountInfoEntry[] {
  const out: MountInfoEntry[] = [];
  for (const line of text.split('\n')) {
    if (line === '') continue;
    const fields = line.split(' ');
    // Fields 7.. are optional tags up to a lone '-'; fstype, source and super options follow it.
    const sep = fields.indexOf('-', 6);
    if (sep < 0 || fields.length < 5) continue;
    out.push({
      mountId: Number(fields[0]),
      parentId: Number(fields[1]),
      majorMinor: fields[2] ?? '',
      root: unescapeMountField(fields[3] ?? ''),
      mountPoint: unescapeMountField(fields[4] ?? ''),
      mountOptions: fields[5] ?? '',
      fsType: unescapeMountField(fields[sep + 1] ?? ''),
      source: unescapeMountField(fields[sep + 2] ?? ''),
      superOptions: fields[sep + 3] ?? '',
    });
  }
  return out;
}

/** Read and parse the mount table. Errors: EIO (with the reason) when it cannot be read. */
export async function readMountInfo(file = MOUNTINFO_PATH): Promise<MountInfoEntry[]> {
  let text: string;
  try {
    text = await fs.promises.readFile(file, 'utf8');
  } catch (err) {
    throw new BdsnapError('EIO', `cannot read the mount table ${file}: ${(err as Error).message}`, { cause: err });
  }
  return parseMountInfo(text);
}

/** Whether something is mounted on `dir` (compared as an absolute path). Errors: EIO. */
export async function isMountpoint(dir: string, file = MOUNTINFO_PATH): Promise<boolean> {
  const target = path.resolve(dir);
  return (await readMountInfo(file)).some((m) => m.mountPoint === target);
}
