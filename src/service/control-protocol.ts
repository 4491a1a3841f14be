/**
 * The control protocol between the `bdsnap` CLI and the daemon: JSON lines over a unix socket.
 * Each request line is one object `{ id, op, ... }`; each answer line is
 * `{ id, ok: true, result }` or `{ id, ok: false, error: { code, message } }`. Requests on one
 * connection are answered in order.
 *
 * Every request is validated with zod before anything acts on it, and a line longer than
 * MAX_LINE_BYTES is refused without being buffered whole: the decoder drops its bytes up to
 * the next newline and reports one error for it.
 */

import { z } from 'zod';

const MAX_PATH_CHARS = 4096;
const MAX_PASSWORD_CHARS = 1024;

const devicePath = z.string().min(1).max(MAX_PATH_CHARS);
const password = z.string().max(MAX_PASSWORD_CHARS);
const MAX_SNAPSHOT_DEVICES = 64;
/** Longest a client may ask `events` to wait for the next event. */
export const MAX_EVENT_WAIT_MS = 60_000;
const snapshotId = z.string().regex(/^[0-9a-z]{1,64}$/, 'a snapshot id is lowercase letters and digits');
const replicaId = z.string().regex(/^[0-9a-z]{1,64}$/, 'a replica id is lowercase letters and digits');
// No uid field: the daemon learns who is calling from the kernel (SO_PEERCRED), never from the request.
const envelope = { id: z.number().int().nonnegative() };

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
  z.object({ ...envelope, op: z.literal('register'), device: devicePath }).strict(),
  z.object({
    ...envelope,
    op: z.literal('snapshot-create'),
    devices: z.array(devicePath).min(1).max(MAX_SNAPSHOT_DEVICES),
    storageDir: z.string().min(1).max(MAX_PATH_CHARS).optional(),
    limitBytes: z.number().int().positive().optional(),
    freeze: z.boolean().optional(),
    /** Taken for the asking process (backup create): destroyed once its connection closes. */
    owned: z.boolean().optional(),
  }).strict(),
  z.object({ ...envelope, op: z.literal('snapshot-list') }).strict(),
  z.object({ ...envelope, op: z.literal('snapshot-info'), snapshot: snapshotId }).strict(),
  z.object({
    ...envelope,
    op: z.literal('snapshot-extend'),
    snapshot: snapshotId,
    limitBytes: z.number().int().positive().optional(),
    storageDir: z.string().min(1).max(MAX_PATH_CHARS).optional(),
  }).strict(),
  z.object({ ...envelope, op: z.literal('snapshot-destroy'), snapshot: snapshotId, force: z.boolean().optional() }).strict(),
  z.object({
    ...envelope,
    op: z.literal('snapshot-changes'),
    snapshot: snapshotId,
    device: devicePath,
    generation: z.string().min(1).max(64),
    since: z.number().int().nonnegative(),
  }).strict(),
  z.object({ ...envelope, op: z.literal('cbt-info'), device: devicePath }).strict(),
  z.object({ ...envelope, op: z.literal('cbt-map'), device: devicePath, since: z.number().int().nonnegative() }).strict(),
  z.object({
    ...envelope,
    op: z.literal('cbt-mark-dirty'),
    device: devicePath,
    ranges: z.array(z.object({ offsetBytes: z.number().int().nonnegative(), lengthBytes: z.number().int().positive() }).strict()).min(1).max(4096),
  }).strict(),
  z.object({ ...envelope, op: z.literal('cbt-reset'), device: devicePath }).strict(),
  z.object({
    ...envelope,
    op: z.literal('instant-restore'),
    repo: z.string().min(1).max(MAX_PATH_CHARS),
    backup: z.string().regex(/^[0-9A-Za-z.-]{1,64}$/, 'a backup id is letters, digits, dots and dashes'),
    device: devicePath,
    output: devicePath.optional(),
    /** The repository's password (an encrypted repository), kept by the daemon until the restore ends. */
    password: password.optional(),
    /** Give up the stopped restore of this backup onto this target instead of starting or resuming it. */
    abandon: z.boolean().optional(),
  }).strict(),
  z.object({
    ...envelope,
    op: z.literal('replica-add'),
    devices: z.array(devicePath).min(1).max(MAX_SNAPSHOT_DEVICES),
    to: z.string().min(1).max(MAX_PATH_CHARS),
    everyMs: z.number().int().min(1000).optional(),
    laggingAfterMs: z.number().int().min(1000).optional(),
    limitBytesPerSecond: z.number().int().positive().optional(),
    standbyRunDir: z.string().min(1).max(MAX_PATH_CHARS).optional(),
    insecureTcp: z.boolean().optional(),
  }).strict(),
  z.object({ ...envelope, op: z.literal('replica-list') }).strict(),
  z.object({
    ...envelope,
    op: z.literal('replica-action'),
    action: z.enum(['sync', 'pause', 'resume', 'remove', 'failover']),
    replica: replicaId,
    /** remove: even when the other side (the standby, or here a replica not at a complete point) cannot let go. */
    force: z.boolean().optional(),
  }).strict(),
  z.object({
    ...envelope,
    op: z.literal('replica-receive'),
    action: z.enum(['begin', 'commit', 'abort']),
    replica: replicaId,
    devices: z.array(devicePath).min(1).max(MAX_SNAPSHOT_DEVICES).optional(),
    /** The point in time being sent (the source's snapshot time), recorded at commit. */
    point: z.string().min(1).max(64).optional(),
    token: z.string().regex(/^[0-9a-f]{1,64}$/).optional(),
    /** commit: the devices (as named at begin) this sync sent whole; a standby refuses a commit that did not send whole a device begin asked for. */
    full: z.array(devicePath).max(MAX_SNAPSHOT_DEVICES).optional(),
  }).strict(),
  z.object({
    ...envelope,
    op: z.literal('events'),
    after: z.number().int().min(-1).optional(),
    waitMs: z.number().int().min(0).max(MAX_EVENT_WAIT_MS).optional(),
  }).strict(),
]);

export type Request = z.infer<typeof requestSchema>;
export type RequestOp = Request['op'];
/** A request as the client builds it; the client adds the id. */
export type RequestBody<Op extends RequestOp = RequestOp> = Omit<Extract<Request, { op: Op }>, 'id'>;

export interface ActivationResult {
  device: string;
  active: boolean;
  /** False when the device was already in the asked state. */
  changed: boolean;
  /** For deactivate while mounted: the session that carries on until unmount. */
  sessionContinues: string | null;
  /** For activate: what makes the device unsafe to serve (such as a directory others can write). */
  warnings?: string[];
  /** For activate of a device under instant restore: when its mounts get sessions (not while the restore serves it). */
  sessions?: string;
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
  /** Ids of the snapshots that hold this device. */
  snapshots: string[];
  /** The snapshot images of this device that bdsnap mounted. */
  imageMounts: ImageMountStatus[];
  /** The as-of views of this device open now (each holds the device still until its last client lets go). */
  asOfViews: AsOfViewStatus[];
}

/** An open `<device>@asof:<mount time>` view: it lives as long as its NBD clients (a bdsnap mount of it is one). */
export interface AsOfViewStatus {
  exportName: string;
  /** The session start it shows. */
  mountTime: string;
  connections: number;
  /** Where bdsnap mounted it, if it did. */
  mountpoint: string | null;
}

export interface ImageMountStatus {
  snapshot: string;
  exportName: string;
  mountpoint: string;
  loopDevice: string | null;
}

export interface StatusResult {
  runDir: string;
  snapshotRoot: string;
  pid: number;
  devices: DeviceStatus[];
  /** Instant restores this daemon runs, or ran and still serves. */
  restores: InstantRestoreInfo[];
  /** The replicas this daemon sends, with their lag. */
  replicas?: ReplicaInfo[];
}

/** An instant restore (`backup restore --instant`), as status shows it. */
export interface InstantRestoreInfo {
  /** Where it restores to (the device, or the --output file); its export name. */
  target: string;
  backup: string;
  /** The device of the backup. */
  device: string;
  repo: string;
  /**
   * stopped: recorded as running, but it could not resume when the daemon started (or when asked
   * to); the target is refused to every client until it is resumed or given up (`error` says
   * why and how). abandoned: only in the answer to the request that gave it up.
   */
  state: 'running' | 'complete' | 'failed' | 'stopped' | 'abandoned';
  doneBytes: number;
  totalBytes: number;
  /** The background copy's own rate (what the daemon's --restore-rate bounds). */
  rateBytesPerSecond: number;
  /** What client reads filled besides, per second (a piece a client reads first is written then). */
  readFilledBytesPerSecond: number;
  /** At the copy's own rate (reads that fill pieces can only make it sooner). */
  secondsLeft: number | null;
  startedAt: string;
  finishedAt: string | null;
  /** Why the last attempt to read the backup failed (the copy retries), or why the restore failed. */
  error: string | null;
  /** NBD clients of the target through the restore, a mount's among them. */
  connections?: number;
  /** Where bdsnap mounted the target, and through which loop device (null until it is mounted). */
  mountpoint?: string | null;
  loopDevice?: string | null;
}

/** A session directory as `list` reports it (read from disk; see CowDevice's SessionSummary for a session's close). */
export interface SessionListEntry {
  dir: string;
  device: string;
  mountTime: string | null;
  endTime: string | null;
  state: string;
  /** Bytes of originals preserved. */
  preservedBytes: number;
  /** Bytes the session directory takes on disk. */
  sizeBytes: number;
  /** When a finished restore took the device back to (or before) this session's start; else null. */
  undoneAt: string | null;
}

export interface ListResult {
  sessions: SessionListEntry[];
}

export interface MountResult {
  device: string;
  mountpoint: string;
  loopDevice: string | null;
  /** The device is under a session for this mount (it was active). */
  inSession: boolean;
  /**
   * Why there is no session when it is not only that the device is not active: the mount goes
   * through the instant restore that writes the device (which keeps none), and when one comes.
   */
  noSession?: string;
}

export interface UmountResult {
  device: string;
  mountpoint: string;
  /** The session closed by this unmount, or null (inactive device, or nothing was written). */
  sessionDir: string | null;
  /** Set when that session failed (a write around bdsnap, a full store...): restore refuses it, and this says why. */
  sessionFailed?: string;
}

/** `register`: the device is known to the daemon (served over NBD), inactive unless it was activated. */
export interface RegisterResult {
  device: string;
  /** False when it was registered already. */
  added: boolean;
  active: boolean;
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
  register: RegisterResult;
  'snapshot-create': SnapshotInfo;
  'snapshot-list': { snapshots: SnapshotInfo[] };
  'snapshot-info': SnapshotInfo;
  'snapshot-extend': SnapshotInfo;
  'snapshot-destroy': { id: string };
  /** null: the image's change map cannot tell (another generation, or no map): read it all. */
  'snapshot-changes': { ranges: Array<{ offsetBytes: number; lengthBytes: number }> | null };
  events: EventsResult;
  'instant-restore': InstantRestoreInfo;
  'cbt-info': CbtInfo;
  'cbt-map': CbtInfo & { since: number; ranges: Array<{ offsetBytes: number; lengthBytes: number }> };
  'cbt-mark-dirty': CbtInfo;
  'cbt-reset': CbtInfo;
  'replica-add': ReplicaInfo;
  'replica-list': { replicas: ReplicaInfo[]; received: ReceivedReplicaInfo[] };
  'replica-action': ReplicaInfo | ReceivedReplicaInfo | { id: string; removed: true; standbyReleased?: boolean };
  'replica-receive': ReplicaReceiveReply;
}

/** A device's change map: tracking block size, block count, generation and current number. */
export interface CbtInfo {
  device: string;
  deviceSizeBytes: number;
  blockSize: number;
  blocks: number;
  generation: string;
  /** The current period: snapshots taken so far in this generation + 1. */
  number: number;
}

export const PROTOCOL_VERSION = 1;

// The responses, their check and the line framing live in ./control-lines.ts, without zod, so
// that client commands start without loading it.
export { LineDecoder, MAX_LINE_BYTES, parseResponse, type ErrorBody, type LineEvent, type Response } from './control-lines.js';

// --- snapshots and events -------------------------------------------------------------

export interface SnapshotImageInfo {
  device: string;
  exportName: string;
  uri: string;
  sizeBytes: number;
  /** Change-map generation and number of this image's point, when tracking is on. */
  cbt: { generation: string; number: number } | null;
  /** Where bdsnap mounted the image, or null. */
  mountpoint: string | null;
  loopDevice: string | null;
  /** NBD connections open on the image (a bdsnap mount's among them). */
  connections: number;
}

export interface SnapshotInfo {
  id: string;
  state: 'creating' | 'ok' | 'overflowed' | 'failed';
  reason: string | null;
  createdAt: string;
  chunkSize: number;
  storage: { dirs: string[]; limitBytes: number | null; usedBytes: number };
  images: SnapshotImageInfo[];
  frozen: string[];
  /** How long new writes were held by the barrier. */
  stallMs: number;
  /** The process the snapshot was taken for (backup create), destroyed when it ends; null for a user's snapshot. */
  owner: { pid: number } | null;
}

export type EventType =
  | 'session-started' | 'session-ended' | 'session-failed'
  | 'snapshot-created' | 'snapshot-low-space' | 'snapshot-overflowed' | 'snapshot-failed' | 'snapshot-destroyed'
  | 'snapshot-extended' | 'snapshot-restored' | 'snapshot-held-back'
  | 'cbt-reset'
  | 'restore-started' | 'restore-completed' | 'restore-failed' | 'restore-abandoned'
  | 'replica-synced' | 'replica-failed' | 'replica-rolled-back' | 'replica-lagging';

export interface DaemonEvent {
  seq: number;
  /** ISO 8601. */
  time: string;
  type: EventType;
  device?: string;
  snapshot?: string;
  details: Record<string, unknown>;
}

export interface EventsResult {
  events: DaemonEvent[];
  /** Pass as `after` to the next call to get only newer events. */
  lastSeq: number;
}

// --- replicas ---------------------------------------------------------------------------

/** What the last sync of a replica did. */
export interface ReplicaSyncSummary {
  full: boolean;
  /** Why full or incremental: 'first sync', 'change map reset (...)', 'changed blocks since ...'. */
  why: string;
  /** Data bytes sent (read from the image and written to the target). */
  bytesSent: number;
  /** Bytes made zero on the target without sending data (holes, zeroed ranges). */
  zeroBytes: number;
  durationMs: number;
  snapshot: string;
}

/** A replica as the sending daemon knows it. */
export interface ReplicaInfo {
  id: string;
  devices: string[];
  /** The target URI as given. */
  target: string;
  /** The export each device goes to, in the order of `devices`. */
  exports: string[];
  /** 'bdsnap': each sync applied inside sessions of a standby daemon; 'plain': any NBD server. */
  targetKind: 'bdsnap' | 'plain';
  everyMs: number | null;
  limitBytesPerSecond: number | null;
  state: 'idle' | 'syncing' | 'paused' | 'incomplete' | 'failed';
  /** The point in time the target last received whole (the source's snapshot time), or null. */
  lastComplete: string | null;
  /** Milliseconds from lastComplete to now; null before the first complete sync. */
  lagMs: number | null;
  /** Lag past which the replica is lagging (a `replica-lagging` event); null: no threshold. */
  laggingAfterMs: number | null;
  /** Lagging now: announced, and no sync completed since. */
  lagging: boolean;
  /** Data bytes sent over the replica's life. */
  bytesSent: number;
  lastSync: ReplicaSyncSummary | null;
  lastError: string | null;
  nextSyncAt: string | null;
}

/** A standby's answer to begin, commit and abort of a sync. */
export interface ReplicaReceiveReply {
  token: string;
  point: string | null;
  /**
   * begin: the devices (as the sender named them) that must be sent whole, and why: the standby
   * cannot vouch that they are as the last complete sync left them (none completed yet, or
   * written or replaced outside bdsnap since). Absent from older standbys.
   */
  sendWhole?: Array<{ device: string; reason: string }>;
}

/** A replica as the standby daemon that receives it knows it. */
export interface ReceivedReplicaInfo {
  id: string;
  devices: string[];
  /** The last point received whole, or null. */
  point: string | null;
  completeAt: string | null;
  /** A sync is being applied (or was cut short and is not rolled back yet). */
  receiving: boolean;
  failedOverAt: string | null;
  /** Why the devices are not at a complete point (a cut sync that could not be undone), or null. */
  broken: string | null;
}
