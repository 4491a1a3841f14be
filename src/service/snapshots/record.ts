/**
 * A snapshot's record (`snapshot.json` in its directory under the state dir): what a restart
 * needs to put it back, written atomically at every change of state. Also the shape of
 * snapshot ids and of image export names (`<device path>@<id>`).
 */

import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import { writeFileAtomic } from '../../host/atomic-file.js';
import { stampIdentitySchema } from '../../host/device-stamp.js';
import { DURABILITIES } from '../../snapshot/format.js';
import { ownerSchema } from './owner.js';

/** The snapshots' folder under the daemon's state dir. */
export const SNAPSHOTS_DIR = 'snapshots';
const RECORD_FILE = 'snapshot.json';
const ID_PATTERN = /^[0-9a-z]{6,40}$/;
export const RECORD_VERSION = 1;

const recordSchema = z.object({
  version: z.literal(RECORD_VERSION),
  id: z.string().regex(ID_PATTERN),
  state: z.enum(['creating', 'ok', 'overflowed', 'failed']),
  reason: z.string().nullable(),
  createdAt: z.string(),
  chunkSize: z.number().int().positive(),
  durability: z.enum(DURABILITIES),
  storage: z.object({ dirs: z.array(z.string().min(1)).min(1), limitBytes: z.number().int().positive().nullable() }),
  devices: z.array(z.object({
    path: z.string().min(1),
    key: z.number().int().nonnegative(),
    sizeBytes: z.number().int().nonnegative(),
    cbt: z.object({ generation: z.string(), number: z.number().int() }).nullable(),
    /** What the device was at the take; absent in records written before it was kept. */
    identity: stampIdentitySchema.optional(),
  })).min(1),
  frozen: z.array(z.string()),
  stallMs: z.number().nonnegative(),
  /** The process that took the snapshot for itself (backup create); absent for a user's snapshot. */
  owner: ownerSchema.optional(),
}).strict();

export type SnapshotRecord = z.infer<typeof recordSchema>;

/** Read and check the record in `dir`. Errors: as fs and zod throw them (the caller logs and skips). */
export async function readRecord(dir: string): Promise<SnapshotRecord> {
  return recordSchema.parse(JSON.parse(await fs.promises.readFile(path.join(dir, RECORD_FILE), 'utf8')));
}

/** Replace the record in `dir` atomically. */
export async function writeRecord(dir: string, record: SnapshotRecord): Promise<void> {
  await writeFileAtomic(path.join(dir, RECORD_FILE), `${JSON.stringify(record, null, 2)}\n`, 0o600);
}

/** Time-ordered, unique, short, safe in a URI: base-36 milliseconds then 4 random bytes. */
export function newSnapshotId(): string {
  return `${Date.now().toString(36).padStart(9, '0')}${crypto.randomBytes(4).toString('hex')}`;
}

/** The export name of the image of `device` in snapshot `id`. */
export function imageExportName(device: string, id: string): string {
  return `${device}@${id}`;
}

/** The device and snapshot id of an image name `<path>@<id>`; undefined when it is not one. */
export function parseImageName(name: string): { device: string; id: string } | undefined {
  const at = name.lastIndexOf('@');
  const id = name.slice(at + 1);
  return at > 0 && ID_PATTERN.test(id) ? { device: name.slice(0, at), id } : undefined;
}
