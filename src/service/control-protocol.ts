/**
 * The control protocol between the `bdsnap` CLI and the daemon: JSON lines over a unix socket.
 * Each request line is one object `{ id, euid, op, ... }`; each answer line is
 * `{ id, ok: true, result }` or `{ id, ok: false, error: { code, message } }`. Requests on one
 * connection are answered in order.
 *
 * Every request is validated with zod before anything acts on it, and a line longer than
 * MAX_LINE_BYTES is refused without being buffered whole: the decoder drops its bytes up to
 * the next newline and reports one error for it.
 */

import { z } from 'zod';
import type { ErrorCode } from '../errors.js';

const MAX_PATH_CHARS = 4096;
const MAX_PASSWORD_CHARS = 1024;

const devicePath = z.string().min(1).max(MAX_PATH_CHARS);
const password = z.string().max(MAX_PASSWORD_CHARS);
const envelope = { id: z.number().int().nonnegative(), euid: z.number().int().nonnegative() };

export const requestSchema = z.discriminatedUnion('op', [
  z.object({ ...envelope, op: z.literal('ping') }).strict(),
  z.object({ ...envelope, op: z.literal('passwd'), newPassword: password, currentPassword: password.optional() }).strict(),
  z.object({ ...envelope, op: z.literal('activate'), device: devicePath, password }).strict(),
  z.object({ ...envelope, op: z.literal('deactivate'), device: devicePath, password }).strict(),
  z.object({ ...envelope, op: z.literal('status') }).strict(),
  z.object({ ...envelope, op: z.literal('list'), device: devicePath.optional() }).strict(),
  z.object({
    ...envelope,
    op: z.literal('mount'),
    device: devicePath,
    mountpoint: z.string().min(1).max(MAX_PATH_CHARS),
    type: z.string().regex(/^[a-z0-9_.]{1,32}$/, 'a filesystem type is lowercase letters, digits, dots or underscores').optional(),
    options: z.string().regex(/^[^\s\0]{1,1024}$/, 'mount options are one word without spaces').optional(),
  }).strict(),
  z.object({ ...envelope, op: z.literal('umount'), mountpoint: z.string().min(1).max(MAX_PATH_CHARS) }).strict(),
]);

export type Request = z.infer<typeof requestSchema>;
export type RequestOp = Request['op'];
/** A request as the client builds it; the client adds id and euid. */
export type RequestBody<Op extends RequestOp = RequestOp> = Omit<Extract<Request, { op: Op }>, 'id' | 'euid'>;

export interface ActivationResult {
  device: string;
  active: boolean;
  /** False when the device was already in the asked state. */
  changed: boolean;
  /** For deactivate while mounted: the session that carries on until unmount. */
  sessionContinues: string | null;
}

export interface DeviceStatus {
  device: string;
  active: boolean;
  /** Open through bdsnap right now (mounted, or NBD clients connected). */
  attached: boolean;
  connections: number;
  mountpoint: string | null;
  loopDevice: string | null;
  /** Directory of the open session, once the first modifying request has created it. */
  currentSession: string | null;
  /** Whether the open attach runs under a session at all. */
  inSession: boolean;
  bytesPreserved: number;
  sessionState: string | null;
  sessionCount: number;
  dirtyOutsideSession: boolean;
}

export interface StatusResult {
  runDir: string;
  snapshotRoot: string;
  pid: number;
  devices: DeviceStatus[];
}

export interface SessionSummary {
  dir: string;
  device: string;
  mountTime: string | null;
  endTime: string | null;
  state: string;
  /** Bytes of originals preserved. */
  preservedBytes: number;
  /** Bytes the session directory takes on disk. */
  sizeBytes: number;
}

export interface ListResult {
  sessions: SessionSummary[];
}

export interface MountResult {
  device: string;
  mountpoint: string;
  loopDevice: string | null;
  /** The device is under a session for this mount (it was active). */
  inSession: boolean;
}

export interface UmountResult {
  device: string;
  mountpoint: string;
  /** The session closed by this unmount, or null (inactive device, or nothing was written). */
  sessionDir: string | null;
}

export interface PasswdResult {
  changed: boolean;
}

export interface PingResult {
  pid: number;
  version: number;
  /** Whether a service password has been set. */
  passwordSet: boolean;
}

export interface ResultMap {
  ping: PingResult;
  passwd: PasswdResult;
  activate: ActivationResult;
  deactivate: ActivationResult;
  status: StatusResult;
  list: ListResult;
  mount: MountResult;
  umount: UmountResult;
}

export interface ErrorBody {
  code: ErrorCode;
  message: string;
}

export type Response =
  | { id: number | null; ok: true; result: unknown }
  | { id: number | null; ok: false; error: ErrorBody };

export const PROTOCOL_VERSION = 1;

// The response check and the line framing live in ./control-lines.ts, without zod, so that
// client commands start without loading it.
export { LineDecoder, MAX_LINE_BYTES, parseResponse, type LineEvent } from './control-lines.js';
