/**
 * Exports whose state lives on one thread, served by connections on others. The daemon's
 * exports share state between connections (copy-before-write sessions, change maps,
 * snapshots): that state stays on the owner thread, which applies every request through its
 * own device stack, while worker threads do the byte work of the wire (decode requests,
 * encode and send replies). A worker sees an ExportProvider (RemoteExports) whose handles
 * forward each call over a MessagePort to the owner's ExportHost.
 *
 * Invariants:
 * - The owner applies a request exactly as it would for a connection of its own: the same
 *   provider, the same handle, the same device calls, so copy-before-write claims, change
 *   marks and the session's preserved set are decided on one thread as before.
 * - Payloads are moved, not copied: a WRITE payload that owns its memory is transferred to the
 *   owner and comes back with the reply (to the worker's pool); a READ reply buffer is
 *   transferred to the owner, which reads into it after the reply's header room, and comes
 *   back filled (readInto; the NBD server uses it instead of read).
 * - Errors cross as their code and message, so the client gets the same errno and the
 *   handshake the same NBD_REP_ERR reply as on the owner thread.
 * - Every handle a worker opened is released exactly once: by the worker, or by the owner when
 *   the worker's port closes (a worker that died leaves nothing held).
 */

import { MessageChannel, type MessagePort } from 'node:worker_threads';
import type { BlockDevice, BlockSizes, Extent, WriteOptions, ZeroOptions } from '../device/block-device.js';
import type { BufferPool } from '../device/buffer-pool.js';
import { BdsnapError, isErrorCode, toBdsnapError } from '../errors.js';
import type { ExportHandle, ExportProvider, LogFn, MetaContextSource } from './exports.js';

type DeviceOp =
  | { op: 'read'; handle: number; offsetBytes: number; buffer: ArrayBuffer; atBytes: number; lengthBytes: number }
  | { op: 'write'; handle: number; offsetBytes: number; buffer: ArrayBuffer; fua: boolean }
  | { op: 'flush'; handle: number }
  | { op: 'trim'; handle: number; offsetBytes: number; lengthBytes: number; fua: boolean }
  | { op: 'zero'; handle: number; offsetBytes: number; lengthBytes: number; options: ZeroOptions }
  | { op: 'cache'; handle: number; offsetBytes: number; lengthBytes: number }
  | { op: 'extents'; handle: number; offsetBytes: number; lengthBytes: number; context?: number };

type Call =
  | { op: 'list' }
  | { op: 'open'; name: string; purpose: 'info' | 'go' }
  | { op: 'release'; handle: number }
  | DeviceOp;

/** What a worker is told of a device at open, and answers from without asking the owner. */
type DeviceFacts = Pick<BlockDevice, 'size' | 'readOnly' | 'blockSizes' | 'canTrim' | 'canFastZero' | 'canMultiConn'>;

/** What the owner tells a worker about an opened handle. */
interface HandleInfo {
  handle: number;
  name: string;
  description?: string;
  device: DeviceFacts;
  metaContexts: string[];
}

/** The handles one worker holds, and whether its port has closed. */
interface WorkerHandles {
  handles: Map<number, ExportHandle>;
  gone: boolean;
}

type Reply =
  | { call: number; ok: true; value?: unknown; buffer?: ArrayBuffer }
  | { call: number; ok: false; code: string; message: string };

/** The owner's side: applies the calls of every worker port through `provider`. */
export class ExportHost {
  #provider: ExportProvider;
  #log: LogFn | undefined;
  #nextHandle = 1;

  constructor(provider: ExportProvider, log?: LogFn) {
    this.#provider = provider;
    this.#log = log;
  }

  /** A new port for one worker (to be transferred to it); its calls are served until it closes. */
  connect(): MessagePort {
    const { port1, port2 } = new MessageChannel();
    const worker: WorkerHandles = { handles: new Map(), gone: false };
    port1.on('message', (m: { call: number } & Call) => void this.#serve(port1, worker, m));
    port1.once('close', () => {
      // A worker that ended without releasing (it died) must not hold its devices for good.
      worker.gone = true;
      for (const id of [...worker.handles.keys()]) void this.#release(worker, id);
    });
    return port2;
  }

  #release(worker: WorkerHandles, id: number): Promise<void> {
    const h = worker.handles.get(id);
    worker.handles.delete(id);
    return h?.release().catch((err: unknown) => this.#log?.({ event: 'release-error', error: toBdsnapError(err).message })) ?? Promise.resolve();
  }

  async #serve(port: MessagePort, worker: WorkerHandles, m: { call: number } & Call): Promise<void> {
    let reply: Reply;
    const transfer: ArrayBuffer[] = [];
    try {
      const { value, buffer } = await this.#apply(worker, m);
      reply = { call: m.call, ok: true, value, buffer };
      if (buffer) transfer.push(buffer);
    } catch (err) {
      const e = toBdsnapError(err);
      reply = { call: m.call, ok: false, code: e.code, message: e.message };
      // The worker's buffer goes back to it, even on a failure.
      if ('buffer' in m) {
        reply = { call: m.call, ok: true, value: { failed: { code: e.code, message: e.message } }, buffer: m.buffer };
        transfer.push(m.buffer);
      }
    }
    port.postMessage(reply, transfer);
  }

  async #apply(worker: WorkerHandles, m: Call): Promise<{ value?: unknown; buffer?: ArrayBuffer }> {
    const handles = worker.handles;
    switch (m.op) {
      case 'list':
        return { value: await this.#provider.list() };
      case 'open': {
        const h = await this.#provider.open(m.name, m.purpose);
        if (h === undefined) return { value: undefined };
        const id = this.#nextHandle++;
        handles.set(id, h);
        // Opened for a worker that has gone meanwhile: nobody would release it.
        if (worker.gone) {
          await this.#release(worker, id);
          throw new BdsnapError('ESHUTDOWN', 'the NBD worker thread has ended');
        }
        const d = h.device;
        const info: HandleInfo = {
          handle: id, name: h.name, ...(h.description !== undefined ? { description: h.description } : {}),
          device: { size: d.size, readOnly: d.readOnly, blockSizes: d.blockSizes, canTrim: d.canTrim, canFastZero: d.canFastZero, canMultiConn: d.canMultiConn },
          metaContexts: (h.metaContexts ?? []).map((c) => c.name),
        };
        return { value: info };
      }
      case 'release': {
        const h = handles.get(m.handle);
        handles.delete(m.handle);
        await h?.release();
        return {};
      }
    }
    const h = handles.get(m.handle);
    if (h === undefined) throw new BdsnapError('EIO', 'the export handle was released');
    const d = h.device;
    switch (m.op) {
      case 'read':
        await d.read(Buffer.from(m.buffer, m.atBytes, m.lengthBytes), m.offsetBytes);
        return { buffer: m.buffer };
      case 'write':
        await d.write(Buffer.from(m.buffer), m.offsetBytes, { fua: m.fua });
        return { buffer: m.buffer };
      case 'flush':
        await d.flush();
        return {};
      case 'trim':
        await d.trim(m.offsetBytes, m.lengthBytes, { fua: m.fua });
        return {};
      case 'zero':
        await d.zero(m.offsetBytes, m.lengthBytes, m.options);
        return {};
      case 'cache':
        await d.cache(m.offsetBytes, m.lengthBytes);
        return {};
      case 'extents': {
        if (m.context === undefined) return { value: await d.extents(m.offsetBytes, m.lengthBytes) };
        const source = h.metaContexts?.[m.context];
        if (source === undefined) throw new BdsnapError('EIO', 'no such metadata context');
        return { value: await source.extents(m.offsetBytes, m.lengthBytes) };
      }
    }
  }
}

/** The worker's side: an ExportProvider whose every call is applied by the owner's ExportHost. */
export class RemoteExports implements ExportProvider {
  #port: MessagePort;
  #pool: BufferPool;
  #nextCall = 1;
  #pending = new Map<number, { resolve: (r: Reply & { ok: true }) => void; reject: (err: Error) => void }>();

  constructor(port: MessagePort, pool: BufferPool) {
    this.#port = port;
    this.#pool = pool;
    port.on('message', (r: Reply) => {
      const p = this.#pending.get(r.call);
      if (p === undefined) return;
      this.#pending.delete(r.call);
      if (r.ok) p.resolve(r);
      else p.reject(new BdsnapError(isErrorCode(r.code) ? r.code : 'EIO', r.message));
    });
    port.once('close', () => {
      for (const p of this.#pending.values()) p.reject(new BdsnapError('ESHUTDOWN', 'the NBD server is closing'));
      this.#pending.clear();
    });
  }

  /** Stop listening (the worker is ending). */
  close(): void {
    this.#port.close();
  }

  call(m: Call, transfer: ArrayBuffer[] = []): Promise<Reply & { ok: true }> {
    const call = this.#nextCall++;
    return new Promise((resolve, reject) => {
      this.#pending.set(call, { resolve, reject });
      this.#port.postMessage({ call, ...m }, transfer);
    });
  }

  /** A buffer of `lengthBytes` that owns its memory, from the pool. */
  take(lengthBytes: number): Buffer {
    return this.#pool.get(lengthBytes);
  }

  /**
   * A buffer came back from the owner: `use` sees it if its call succeeded, then it goes to
   * the pool; the failure it carries is thrown.
   */
  giveBack(r: Reply & { ok: true }, use?: (b: Buffer) => void): void {
    const failed = (r.value as { failed?: { code: string; message: string } } | undefined)?.failed;
    const b = r.buffer ? Buffer.from(r.buffer) : undefined;
    if (b && !failed) use?.(b);
    if (b) this.#pool.put(b);
    if (failed) throw new BdsnapError(isErrorCode(failed.code) ? failed.code : 'EIO', failed.message);
  }

  async list(): Promise<string[]> {
    return (await this.call({ op: 'list' })).value as string[];
  }

  async open(name: string, purpose: 'info' | 'go'): Promise<ExportHandle | undefined> {
    const info = (await this.call({ op: 'open', name, purpose })).value as HandleInfo | undefined;
    if (info === undefined) return undefined;
    let released = false;
    const metaContexts: MetaContextSource[] = info.metaContexts.map((contextName, context) => ({
      name: contextName,
      extents: async (offsetBytes, lengthBytes) => (await this.call({ op: 'extents', handle: info.handle, offsetBytes, lengthBytes, context })).value as Extent[],
    }));
    return {
      name: info.name,
      ...(info.description !== undefined ? { description: info.description } : {}),
      device: new RemoteDevice(this, info),
      ...(metaContexts.length > 0 ? { metaContexts } : {}),
      release: async () => {
        if (released) return;
        released = true;
        await this.call({ op: 'release', handle: info.handle });
      },
    };
  }
}

/**
 * A device on the owner thread. A WRITE payload that owns its memory is moved to the owner:
 * the caller (the NBD server, which only returns it to its pool) must not use it afterwards.
 */
export class RemoteDevice implements BlockDevice {
  readonly #remote: RemoteExports;
  readonly #handle: number;
  readonly #facts: DeviceFacts;

  constructor(remote: RemoteExports, info: HandleInfo) {
    this.#remote = remote;
    this.#handle = info.handle;
    this.#facts = info.device;
  }

  get size(): number { return this.#facts.size; }
  get readOnly(): boolean { return this.#facts.readOnly; }
  get blockSizes(): BlockSizes { return this.#facts.blockSizes; }
  get canTrim(): boolean { return this.#facts.canTrim; }
  get canFastZero(): boolean { return this.#facts.canFastZero; }
  get canMultiConn(): boolean { return this.#facts.canMultiConn; }

  async read(target: Buffer, offsetBytes: number): Promise<void> {
    const scratch = this.#remote.take(target.length);
    this.#remote.giveBack(await this.#moveRead(scratch, 0, target.length, offsetBytes), (b) => b.copy(target));
  }

  /** `buf` is moved to the owner, which reads into it; on a failure it is left to the collector. */
  async readInto(buf: Buffer, atBytes: number, offsetBytes: number): Promise<Buffer> {
    const r = await this.#moveRead(buf, atBytes, buf.length - atBytes, offsetBytes);
    // Throws the owner's failure, if any.
    this.#remote.giveBack({ ...r, buffer: undefined });
    if (r.buffer === undefined) throw new BdsnapError('EIO', 'the read buffer did not come back');
    return Buffer.from(r.buffer);
  }

  #moveRead(buf: Buffer, atBytes: number, lengthBytes: number, offsetBytes: number): Promise<Reply & { ok: true }> {
    const buffer = buf.buffer as ArrayBuffer;
    return this.#remote.call({ op: 'read', handle: this.#handle, offsetBytes, buffer, atBytes, lengthBytes }, [buffer]);
  }

  async write(data: Buffer, offsetBytes: number, options?: WriteOptions): Promise<void> {
    const owns = data.byteOffset === 0 && data.buffer.byteLength === data.length && data.buffer instanceof ArrayBuffer;
    const moved = owns ? data : this.#remote.take(data.length);
    if (!owns) data.copy(moved);
    const buffer = moved.buffer as ArrayBuffer;
    this.#remote.giveBack(await this.#remote.call({ op: 'write', handle: this.#handle, offsetBytes, buffer, fua: options?.fua ?? false }, [buffer]));
  }

  async flush(): Promise<void> {
    await this.#remote.call({ op: 'flush', handle: this.#handle });
  }

  async trim(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    await this.#remote.call({ op: 'trim', handle: this.#handle, offsetBytes, lengthBytes, fua: options?.fua ?? false });
  }

  async zero(offsetBytes: number, lengthBytes: number, options?: ZeroOptions): Promise<void> {
    await this.#remote.call({ op: 'zero', handle: this.#handle, offsetBytes, lengthBytes, options: { ...options } });
  }

  async cache(offsetBytes: number, lengthBytes: number): Promise<void> {
    await this.#remote.call({ op: 'cache', handle: this.#handle, offsetBytes, lengthBytes });
  }

  async extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    return (await this.#remote.call({ op: 'extents', handle: this.#handle, offsetBytes, lengthBytes })).value as Extent[];
  }

  /** The owner's handle closes its device; the worker's copy has nothing of its own. */
  async close(): Promise<void> {}
}
