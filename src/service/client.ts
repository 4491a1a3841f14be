/**
 * The client library for the daemon's control socket, used by the CLI. Each call sends one
 * request line and resolves with the typed result; a refusal from the daemon comes back as a
 * BdsnapError with the daemon's code and message.
 */

import net from 'node:net';
import path from 'node:path';
import { BdsnapError } from '../errors.js';
import { formatDuration } from '../units.js';
import { withTimeout } from '../timeout.js';
import { LineDecoder, parseResponse } from './control-lines.js';
import { controlSocketPath, resolveRunDir } from './paths.js';
import type {
  ActivationResult, CbtInfo, EventsResult, SnapshotInfo, ListResult, MountResult, PasswdResult, PingResult,
  RegisterResult, InstantRestoreInfo, RequestBody, RequestOp, ResultMap, StatusResult, UmountResult,
} from './control-protocol.js';

interface Pending {
  resolve(value: unknown): void;
  reject(err: BdsnapError): void;
}

export interface ClientTimeouts {
  /**
   * How long a connection may take to be accepted, and a request to be answered before the
   * daemon is asked, on a connection of its own, whether it is still there (a request such as
   * undoing a sync may rightly take long); a daemon that answers neither in this time is taken
   * for stopped or hung, and the request fails (ETIMEDOUT). Default: wait forever.
   */
  timeoutMs?: number;
  /** A daemon slow to answer a request is taken for gone at once, without asking again. */
  noProbe?: boolean;
}

export interface MountOptions {
  /** Filesystem type for mount -t. */
  type?: string;
  /** Options for mount -o. */
  options?: string;
}

export class BdsnapClient {
  readonly #socket: net.Socket;
  readonly #pending = new Map<number, Pending>();
  #nextId = 1;
  #closedError: BdsnapError | undefined;
  readonly #runDir: string;
  readonly #timeouts: ClientTimeouts;

  private constructor(socket: net.Socket, runDir: string, timeouts: ClientTimeouts) {
    this.#socket = socket;
    this.#runDir = runDir;
    this.#timeouts = timeouts;
    const decoder = new LineDecoder(16 * 1024 * 1024);
    socket.on('data', (chunk: Buffer) => {
      for (const event of decoder.push(chunk)) {
        if (event.kind === 'oversized') {
          this.#failAll(new BdsnapError('EPROTO', 'the daemon sent an answer too long to read'));
          socket.destroy();
          return;
        }
        this.#onLine(event.text);
      }
    });
    socket.on('error', (err) => this.#failAll(new BdsnapError('EIO', `control connection failed: ${err.message}`, { cause: err })));
    socket.on('close', () => this.#failAll(new BdsnapError('ESHUTDOWN', 'the daemon closed the control connection')));
  }

  /** Connect to the daemon of `runDir` (default: see resolveRunDir). */
  static async connect(runDir?: string, timeouts: ClientTimeouts = {}): Promise<BdsnapClient> {
    const resolvedRunDir = resolveRunDir(runDir);
    const socketPath = controlSocketPath(resolvedRunDir);
    const socket = net.connect(socketPath);
    const connected = new Promise<void>((resolve, reject) => {
      socket.once('connect', () => resolve());
      socket.once('error', (err: NodeJS.ErrnoException) => {
        socket.destroy();
        if (err.code === 'EACCES' || err.code === 'EPERM') {
          reject(new BdsnapError('EPERM', `permission denied on ${socketPath}: bdsnap control operations need root`, { cause: err }));
        } else if (err.code === 'ENOENT') {
          reject(new BdsnapError('ENOENT', `the bdsnap daemon is not running (no control socket at ${socketPath})`, { cause: err }));
        } else if (err.code === 'ECONNREFUSED') {
          // The file is there but nobody listens: a daemon that was killed leaves it behind.
          reject(new BdsnapError('ENOENT', `the bdsnap daemon is not running (stale socket at ${socketPath}; start the daemon, which replaces it)`, { cause: err }));
        } else {
          reject(new BdsnapError('EIO', `cannot connect to ${socketPath}: ${err.message}`, { cause: err }));
        }
      });
    });
    await withTimeout(connected, timeouts.timeoutMs, () => {
      socket.destroy();
      return new BdsnapError('ETIMEDOUT', `the bdsnap daemon at ${socketPath} did not accept a connection within ${formatDuration(timeouts.timeoutMs!)}: it is stopped or hung`);
    });
    return new BdsnapClient(socket, resolvedRunDir, timeouts);
  }

  ping(): Promise<PingResult> {
    return this.request('ping', {});
  }

  /** Set the service password; `currentPassword` is required when one is already set. */
  setPassword(newPassword: string, currentPassword?: string): Promise<PasswdResult> {
    return this.request('passwd', { newPassword, ...(currentPassword !== undefined ? { currentPassword } : {}) });
  }

  activate(device: string, password: string): Promise<ActivationResult> {
    return this.request('activate', { device: path.resolve(device), password });
  }

  deactivate(device: string, password: string): Promise<ActivationResult> {
    return this.request('deactivate', { device: path.resolve(device), password });
  }

  status(): Promise<StatusResult> {
    return this.request('status', {});
  }

  list(device?: string): Promise<ListResult> {
    return this.request('list', { ...(device !== undefined ? { device: path.resolve(device) } : {}) });
  }

  mount(device: string, mountpoint: string, options: MountOptions = {}): Promise<MountResult> {
    return this.request('mount', {
      device: path.resolve(device), mountpoint: path.resolve(mountpoint),
      ...(options.type !== undefined ? { type: options.type } : {}),
      ...(options.options !== undefined ? { options: options.options } : {}),
    });
  }

  /**
   * Make the daemon serve the device over NBD (what `mount` does first): registered inactive,
   * so it is served without a session until it is activated.
   */
  register(device: string): Promise<RegisterResult> {
    return this.request('register', { device: path.resolve(device) });
  }

  umount(mountpoint: string): Promise<UmountResult> {
    return this.request('umount', { mountpoint: path.resolve(mountpoint) });
  }

  /**
   * One point in time across `devices`; each image is served as `<device>@<id>`. `owned`: the
   * snapshot is this process's own, and the daemon destroys it once this connection closes
   * (the process ended or was killed), so keep the client open while the snapshot is used.
   */
  createSnapshot(devices: string[], options: { storageDir?: string; limitBytes?: number; freeze?: boolean; owned?: boolean } = {}): Promise<SnapshotInfo> {
    return this.request('snapshot-create', {
      devices: devices.map((d) => path.resolve(d)),
      ...(options.storageDir !== undefined ? { storageDir: path.resolve(options.storageDir) } : {}),
      ...(options.limitBytes !== undefined ? { limitBytes: options.limitBytes } : {}),
      ...(options.freeze !== undefined ? { freeze: options.freeze } : {}),
      ...(options.owned === true ? { owned: true } : {}),
    });
  }

  async listSnapshots(): Promise<SnapshotInfo[]> {
    return (await this.request('snapshot-list', {})).snapshots;
  }

  snapshotInfo(id: string): Promise<SnapshotInfo> {
    return this.request('snapshot-info', { snapshot: id });
  }

  extendSnapshot(id: string, options: { limitBytes?: number; storageDir?: string }): Promise<SnapshotInfo> {
    return this.request('snapshot-extend', {
      snapshot: id,
      ...(options.limitBytes !== undefined ? { limitBytes: options.limitBytes } : {}),
      ...(options.storageDir !== undefined ? { storageDir: path.resolve(options.storageDir) } : {}),
    });
  }

  /** `force`: unmount the images first and cut off their other NBD clients, instead of EBUSY. */
  destroySnapshot(id: string, options: { force?: boolean } = {}): Promise<{ id: string }> {
    return this.request('snapshot-destroy', { snapshot: id, ...(options.force ? { force: true } : {}) });
  }

  /**
   * Byte ranges in which the image of `device` in snapshot `id` differs from the image of the
   * earlier snapshot number `since` of change-map generation `generation` (image writes
   * included); null when the map cannot tell, so the caller must read everything.
   */
  async snapshotChanges(id: string, device: string, generation: string, since: number): Promise<Array<{ offsetBytes: number; lengthBytes: number }> | null> {
    return (await this.request('snapshot-changes', { snapshot: id, device: path.resolve(device), generation, since })).ranges;
  }

  cbtInfo(device: string): Promise<CbtInfo> {
    return this.request('cbt-info', { device: path.resolve(device) });
  }

  /** Byte ranges of `device` changed since snapshot number `since` (0: everything this generation saw). */
  cbtMap(device: string, since: number): Promise<ResultMap['cbt-map']> {
    return this.request('cbt-map', { device: path.resolve(device), since });
  }

  cbtMarkDirty(device: string, ranges: Array<{ offsetBytes: number; lengthBytes: number }>): Promise<CbtInfo> {
    return this.request('cbt-mark-dirty', { device: path.resolve(device), ranges });
  }

  cbtReset(device: string): Promise<CbtInfo> {
    return this.request('cbt-reset', { device: path.resolve(device) });
  }

  /**
   * Serve `device` of backup `backup` at once (on the device itself, or a new `output` file) and
   * copy the rest behind; returns once it is served. The same request resumes that restore
   * when it is stopped, or (`abandon`) gives it up.
   */
  instantRestore(repo: string, backup: string, device: string, output?: string, password?: string, options: { abandon?: boolean } = {}): Promise<InstantRestoreInfo> {
    return this.request('instant-restore', {
      repo, backup, device: path.resolve(device), ...(output !== undefined ? { output: path.resolve(output) } : {}), ...(password !== undefined ? { password } : {}),
      ...(options.abandon === true ? { abandon: true } : {}),
    });
  }

  /** Events newer than `after` (a seq); waits up to `waitMs` for one when there is none yet. */
  events(after = 0, waitMs = 0): Promise<EventsResult> {
    return this.request('events', { after, waitMs });
  }

  /** Send any request body; exposed for tools and tests that speak the protocol directly. */
  request<Op extends RequestOp>(op: Op, body: Omit<RequestBody<Op>, 'op'>): Promise<ResultMap[Op]> {
    if (this.#closedError) return Promise.reject(this.#closedError);
    const id = this.#nextId++;
    const answered = new Promise<ResultMap[Op]>((resolve, reject) => {
      this.#pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.#socket.write(`${JSON.stringify({ ...body, op, id })}\n`);
    });
    const { timeoutMs } = this.#timeouts;
    if (timeoutMs === undefined) return answered;
    let timer: NodeJS.Timeout | undefined;
    const watch = (): void => {
      timer = setTimeout(() => {
        void this.#stillThere().then((there) => {
          if (!this.#pending.has(id)) return;
          if (there) {
            watch();
            return;
          }
          this.#failAll(new BdsnapError('ETIMEDOUT', `the bdsnap daemon at ${controlSocketPath(this.#runDir)} did not answer ${op} in ${formatDuration(timeoutMs)}${this.#timeouts.noProbe ? '' : ' nor a ping'}: it is stopped or hung`));
          this.#socket.destroy();
        });
      }, timeoutMs);
    };
    watch();
    return answered.finally(() => clearTimeout(timer));
  }

  /** Whether the daemon answers a ping on a connection of its own, in the timeout. */
  async #stillThere(): Promise<boolean> {
    if (this.#timeouts.noProbe) return false;
    try {
      await withClient(this.#runDir, (probe) => probe.ping(), { timeoutMs: this.#timeouts.timeoutMs, noProbe: true });
      return true;
    } catch {
      return false;
    }
  }

  close(): void {
    this.#closedError ??= new BdsnapError('ESHUTDOWN', 'the client is closed');
    this.#socket.end();
  }

  #onLine(text: string): void {
    let response;
    try {
      response = parseResponse(JSON.parse(text));
    } catch {
      response = undefined;
    }
    if (!response) {
      this.#failAll(new BdsnapError('EPROTO', 'the daemon sent an answer that does not parse'));
      this.#socket.destroy();
      return;
    }
    const pending = response.id === null ? this.#pending.values().next().value : this.#pending.get(response.id);
    if (!pending) return;
    const id = response.id ?? [...this.#pending.keys()][0];
    if (id !== undefined) this.#pending.delete(id);
    if (response.ok) pending.resolve(response.result);
    else pending.reject(new BdsnapError(response.error.code, response.error.message));
  }

  #failAll(err: BdsnapError): void {
    this.#closedError ??= err;
    for (const p of this.#pending.values()) p.reject(err);
    this.#pending.clear();
  }
}

/** Connect, run `fn`, close. */
export async function withClient<T>(runDir: string | undefined, fn: (client: BdsnapClient) => Promise<T>, timeouts: ClientTimeouts = {}): Promise<T> {
  const client = await BdsnapClient.connect(runDir, timeouts);
  try {
    return await fn(client);
  } finally {
    client.close();
  }
}
