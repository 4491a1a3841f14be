/**
 * NbdClient: an NBD client that is itself a BlockDevice, so anything written against the
 * interface (the singlefilefs reader, tests, copy tools) can run over the wire.
 *
 * Handshake: fixed newstyle, NBD_OPT_STRUCTURED_REPLY (unless disabled), SET_META_CONTEXT
 * base:allocation plus the contexts asked for in `metaContexts`, then NBD_OPT_GO asking for
 * block sizes; a server without GO gets NBD_OPT_EXPORT_NAME. listMetaContexts() asks a server
 * what an export offers without entering transmission. Then any number of requests in flight, matched to replies by cookie;
 * a reply's errno becomes a BdsnapError with the matching code. A protocol error from the
 * server fails every pending request and closes the connection.
 */

import net from 'node:net';
import tls from 'node:tls';
import { readU64BE } from '../bytes.js';
import { formatDuration } from '../units.js';
import { withTimeout } from '../timeout.js';
import { BdsnapError, type ErrorCode } from '../errors.js';
import type { BlockDevice, BlockSizes, Extent, WriteOptions, ZeroOptions } from '../device/block-device.js';
import * as C from './constants.js';
import {
  encodeClientFlags, encodeInfoRequestData, encodeMetaContextData, encodeOption, encodeRequest,
} from './encoders.js';
import { ReplyDecoder, type ServerMessage, type OptionReplyMessage, type StructuredReplyMessage } from './reply-decoder.js';
import { NbdProtocolError } from './byte-queue.js';

export interface NbdClientOptions {
  socketPath?: string;
  host?: string;
  port?: number;
  /** Default '' (the server's default export). */
  exportName?: string;
  /** Negotiate structured replies (and base:allocation). Default true. */
  structuredReplies?: boolean;
  /**
   * Metadata contexts to select besides base:allocation (e.g. 'qemu:dirty-bitmap:...'); those
   * the server does not offer are simply not available (see contextAvailable()).
   */
  metaContexts?: string[];
  /**
   * Upgrade with NBD_OPT_STARTTLS right after the greeting, with these tls.connect options
   * (CA, client certificate, PSK callback, servername), and never go on in plaintext: a server
   * that refuses STARTTLS fails the connection.
   */
  tls?: tls.ConnectionOptions;
  /**
   * Fail the connection (ETIMEDOUT) when the server sends nothing for this long while an answer
   * is awaited, or does not accept it or let it close within this time. Default: wait forever.
   */
  timeoutMs?: number;
}

/** What a request returned: READ data, or BLOCK_STATUS extents (NBD_STATE_* flags). */
export interface NbdReply {
  data?: Buffer;
  /** BLOCK_STATUS: the base:allocation chunk (or the only chunk). */
  extents?: Extent[];
  /** BLOCK_STATUS: every chunk, by metadata context id. */
  contexts?: Map<number, Extent[]>;
  /** READ replies: how many chunks were holes (structured replies only). */
  holeChunks?: number;
}

interface Pending {
  type: number;
  offsetBytes: number;
  lengthBytes: number;
  data: Buffer | undefined;
  /** Bytes of a structured read covered by data and hole chunks so far. */
  coveredBytes: number;
  contexts: Map<number, Extent[]> | undefined;
  holeChunks: number;
  error: BdsnapError | undefined;
  resolve: (reply: NbdReply) => void;
  reject: (err: BdsnapError) => void;
}

const ERRNO_CODES: Record<number, ErrorCode> = {
  [C.NBD_EPERM]: 'EPERM',
  [C.NBD_EIO]: 'EIO',
  [C.NBD_ENOMEM]: 'EIO',
  [C.NBD_EINVAL]: 'EINVAL',
  [C.NBD_ENOSPC]: 'ENOSPC',
  [C.NBD_EOVERFLOW]: 'EINVAL',
  [C.NBD_ENOTSUP]: 'ENOTSUP',
  [C.NBD_ESHUTDOWN]: 'ESHUTDOWN',
};

/** Map an NBD errno to a BdsnapError code (unknown values are EIO). */
export function codeForErrno(errno: number): ErrorCode {
  return ERRNO_CODES[errno] ?? 'EIO';
}

const DEFAULT_BLOCK_SIZES: BlockSizes = { minimum: 1, preferred: 4096, maximum: C.MAX_PAYLOAD_BYTES };
/** The socket's read buffer: four times the 64 KiB a socket read gives by default. */
const READ_BUFFER_BYTES = 256 * 1024;
const MAX_COOKIE = 0xffffffff;
/**
 * Most bytes of replies to one option held before its final one: far above what a real server
 * sends (a LIST of a thousand exports with long names, an INFO or two), far below what would
 * hurt the process a client lives in (the daemon, for a replica's standby).
 */
const MAX_OPTION_REPLIES_BYTES = 16 * 1024 * 1024;

export class NbdClient implements BlockDevice {
  #socket: net.Socket;
  #decoder: ReplyDecoder;
  #exportName = '';
  #size = 0;
  #transmissionFlags = 0;
  #blockSizes: BlockSizes = DEFAULT_BLOCK_SIZES;
  #structured = false;
  /** Id of base:allocation, when selected. */
  #metaContextId: number | undefined;
  /** Every selected context (base:allocation included): name -> id. */
  #contextIds = new Map<string, number>();
  #contextNames = new Map<number, string>();
  #pending = new Map<number, Pending>();
  #nextCookie = 1;
  #failure: BdsnapError | undefined;
  #closed = false;
  #closePromise: Promise<void>;
  // The handshake step waiting for the next server message.
  #handshakeWaiter: { resolve: (m: ServerMessage) => void; reject: (e: BdsnapError) => void } | undefined;
  #inTransmission = false;
  readonly #timeoutMs: number | undefined;
  /** When the server last sent something, or when an answer began to be awaited. */
  #heardAtMs = 0;
  #watchdog: NodeJS.Timeout | undefined;

  private constructor(socket: net.Socket, timeoutMs: number | undefined) {
    this.#socket = socket;
    this.#timeoutMs = timeoutMs;
    this.#decoder = new ReplyDecoder({
      transientChunks: true,
      simpleReplyDataBytes: (hi, lo) => {
        const p = hi === 0 ? this.#pending.get(lo) : undefined;
        return p && p.type === C.NBD_CMD_READ ? p.lengthBytes : 0;
      },
      // Read data lands in the request's buffer (the caller's, for read()); a range outside
      // the request gets a buffer of the decoder's, and #applyChunk refuses it.
      dataTarget: (hi, lo, offsetBytes, lengthBytes) => {
        const p = hi === 0 ? this.#pending.get(lo) : undefined;
        if (!p?.data || p.type !== C.NBD_CMD_READ) return undefined;
        const at = offsetBytes === undefined ? 0 : offsetBytes - p.offsetBytes;
        if (at < 0 || at + lengthBytes > p.data.length) return undefined;
        return p.data.subarray(at, at + lengthBytes);
      },
    });
    socket.on('error', (err) => this.#fail(new BdsnapError('EIO', `NBD connection failed: ${err.message}`, { cause: err })));
    this.#closePromise = new Promise((resolve) => socket.once('close', () => {
      clearInterval(this.#watchdog);
      this.#fail(new BdsnapError('ESHUTDOWN', 'the NBD connection was closed'));
      resolve();
    }));
  }

  /** Connect and negotiate. Errors: ENOENT (no socket or unknown export), EPROTO, EIO. */
  static async connect(options: NbdClientOptions): Promise<NbdClient> {
    const client = await NbdClient.#open(options);
    try {
      await client.#handshake(options.exportName ?? '', options.structuredReplies ?? true, options.metaContexts ?? [], options.tls);
    } catch (err) {
      client.#socket.destroy();
      throw err;
    }
    return client;
  }

  static async #open(options: NbdClientOptions): Promise<NbdClient> {
    // The socket reads into one reused buffer: fresh 64 KiB buffers per read would cost an
    // allocation of external memory each, and the garbage collections they bring.
    // The client exists before the first read can arrive (reads come from the event loop,
    // after this function has run to its first await).
    const readBuffer = Buffer.allocUnsafe(READ_BUFFER_BYTES);
    const onread = {
      buffer: readBuffer,
      callback: (n: number): boolean => {
        client.#onData(readBuffer.subarray(0, n));
        return true;
      },
    };
    let socket: net.Socket;
    if (options.socketPath !== undefined) socket = net.connect({ path: options.socketPath, onread });
    else if (options.port !== undefined) socket = net.connect({ host: options.host ?? '127.0.0.1', port: options.port, noDelay: true, onread });
    else throw new BdsnapError('EINVAL', 'NbdClient.connect needs socketPath or port');
    const client = new NbdClient(socket, options.timeoutMs);
    const connected = new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', (err: NodeJS.ErrnoException) => {
        const code = err.code === 'ENOENT' || err.code === 'ECONNREFUSED' ? 'ENOENT' : 'EIO';
        reject(new BdsnapError(code, `cannot connect to the NBD server: ${err.message}`, { cause: err }));
      });
    });
    await withTimeout(connected, options.timeoutMs, () => {
      socket.destroy();
      return new BdsnapError('ETIMEDOUT', `the NBD server did not accept a connection within ${formatDuration(options.timeoutMs!)}`);
    });
    return client;
  }

  /**
   * The metadata contexts the server offers for `options.exportName` (NBD_OPT_LIST_META_CONTEXT),
   * without entering transmission: connect, ask, NBD_OPT_ABORT. No query lists everything;
   * bdsnap also takes a prefix ending in ':' ('qemu:dirty-bitmap:'). Errors as connect(), and
   * ENOTSUP when the server has no structured replies or metadata contexts.
   */
  static async listMetaContexts(options: NbdClientOptions, queries: readonly string[] = []): Promise<string[]> {
    const client = await NbdClient.#open(options);
    try {
      await client.#greet();
      if ((await client.#option(C.NBD_OPT_STRUCTURED_REPLY)).type !== C.NBD_REP_ACK) {
        throw new BdsnapError('ENOTSUP', 'the server does not support structured replies, so it has no metadata contexts');
      }
      const exportName = options.exportName ?? '';
      const replies = await client.#optionList(C.NBD_OPT_LIST_META_CONTEXT, encodeMetaContextData(exportName, queries));
      const last = replies[replies.length - 1]!;
      if (last.type === C.NBD_REP_ERR_UNSUP) throw new BdsnapError('ENOTSUP', 'the server does not support metadata contexts');
      if (last.type !== C.NBD_REP_ACK) throw optionError(C.NBD_OPT_LIST_META_CONTEXT, last, exportName);
      const names: string[] = [];
      for (const r of replies) if (r.type === C.NBD_REP_META_CONTEXT && r.data.length >= 4) names.push(r.data.toString('utf8', 4));
      await client.#option(C.NBD_OPT_ABORT).catch(() => undefined);
      return names;
    } finally {
      client.#socket.destroy();
      await client.#closePromise;
    }
  }

  get exportName(): string {
    return this.#exportName;
  }
  get size(): number {
    return this.#size;
  }
  get transmissionFlags(): number {
    return this.#transmissionFlags;
  }
  get readOnly(): boolean {
    return (this.#transmissionFlags & C.NBD_FLAG_READ_ONLY) !== 0;
  }
  get blockSizes(): BlockSizes {
    return this.#blockSizes;
  }
  get canTrim(): boolean {
    return (this.#transmissionFlags & C.NBD_FLAG_SEND_TRIM) !== 0;
  }
  get canFastZero(): boolean {
    return (this.#transmissionFlags & C.NBD_FLAG_SEND_FAST_ZERO) !== 0;
  }
  get canMultiConn(): boolean {
    return (this.#transmissionFlags & C.NBD_FLAG_CAN_MULTI_CONN) !== 0;
  }
  /** Structured replies were negotiated. */
  get structuredReplies(): boolean {
    return this.#structured;
  }
  /** base:allocation was selected (BLOCK_STATUS is available). */
  get blockStatusAvailable(): boolean {
    return this.#metaContextId !== undefined;
  }
  /** Names of the metadata contexts selected for this connection. */
  get metaContexts(): string[] {
    return [...this.#contextIds.keys()];
  }
  /** The server offered and selected this context: blockStatusContext() can read it. */
  contextAvailable(name: string): boolean {
    return this.#contextIds.has(name);
  }
  get requestsInFlight(): number {
    return this.#pending.size;
  }

  // ---- handshake ----

  /** Greeting and client flags; returns whether NO_ZEROES was agreed. */
  async #greet(): Promise<boolean> {
    const greeting = await this.#nextMessage();
    if (greeting.kind !== 'greeting') throw new BdsnapError('EPROTO', 'expected the server greeting');
    if ((greeting.handshakeFlags & C.NBD_FLAG_FIXED_NEWSTYLE) === 0) {
      throw new BdsnapError('EPROTO', 'the server does not support fixed newstyle negotiation');
    }
    const noZeroes = (greeting.handshakeFlags & C.NBD_FLAG_NO_ZEROES) !== 0;
    this.#socket.write(encodeClientFlags(C.NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? C.NBD_FLAG_C_NO_ZEROES : 0)));
    return noZeroes;
  }

  async #handshake(exportName: string, wantStructured: boolean, extraContexts: readonly string[], tlsOptions: tls.ConnectionOptions | undefined): Promise<void> {
    const noZeroes = await this.#greet();
    if (tlsOptions) await this.#startTls(tlsOptions);
    if (wantStructured) {
      const reply = await this.#option(C.NBD_OPT_STRUCTURED_REPLY);
      this.#structured = reply.type === C.NBD_REP_ACK;
    }
    if (this.#structured) {
      const queries = [C.BASE_ALLOCATION, ...extraContexts.filter((n) => n !== C.BASE_ALLOCATION)];
      const replies = await this.#optionList(C.NBD_OPT_SET_META_CONTEXT, encodeMetaContextData(exportName, queries));
      // An error reply selects nothing (the server may not know metadata contexts at all).
      if (replies[replies.length - 1]!.type === C.NBD_REP_ACK) {
        for (const r of replies) {
          if (r.type !== C.NBD_REP_META_CONTEXT || r.data.length < 4) continue;
          const id = r.data.readUInt32BE(0);
          const name = r.data.toString('utf8', 4);
          if (!queries.includes(name) || this.#contextNames.has(id)) throw new BdsnapError('EPROTO', `the server selected an unexpected metadata context "${name}" (id ${id})`);
          this.#contextIds.set(name, id);
          this.#contextNames.set(id, name);
          if (name === C.BASE_ALLOCATION) this.#metaContextId = id;
        }
      }
    }

    const replies = await this.#optionList(C.NBD_OPT_GO, encodeInfoRequestData(exportName, [C.NBD_INFO_BLOCK_SIZE, C.NBD_INFO_NAME]));
    const last = replies[replies.length - 1]!;
    if (last.type === C.NBD_REP_ERR_UNSUP) {
      this.#socket.write(encodeOption(C.NBD_OPT_EXPORT_NAME, Buffer.from(exportName, 'utf8')));
      this.#decoder.setPhase('export-name', noZeroes);
      const info = await this.#nextMessage();
      if (info.kind !== 'export-info') throw new BdsnapError('EPROTO', 'expected the reply to NBD_OPT_EXPORT_NAME');
      this.#size = info.sizeBytes;
      this.#transmissionFlags = info.transmissionFlags;
      this.#exportName = exportName;
      // BLOCK_STATUS needs GO in the spec's reading of "the export selected": drop them.
      this.#metaContextId = undefined;
      this.#contextIds.clear();
      this.#contextNames.clear();
    } else {
      if (last.type !== C.NBD_REP_ACK) throw optionError(C.NBD_OPT_GO, last, exportName);
      this.#exportName = exportName;
      for (const r of replies) {
        if (r.type !== C.NBD_REP_INFO || r.data.length < 2) continue;
        const infoType = r.data.readUInt16BE(0);
        if (infoType === C.NBD_INFO_EXPORT && r.data.length >= 12) {
          this.#size = readU64BE(r.data, 2);
          this.#transmissionFlags = r.data.readUInt16BE(10);
        } else if (infoType === C.NBD_INFO_BLOCK_SIZE && r.data.length >= 14) {
          this.#blockSizes = { minimum: r.data.readUInt32BE(2), preferred: r.data.readUInt32BE(6), maximum: r.data.readUInt32BE(10) };
        } else if (infoType === C.NBD_INFO_NAME) {
          this.#exportName = r.data.toString('utf8', 2);
        }
      }
      this.#decoder.setPhase('transmission');
    }
    this.#inTransmission = true;
    this.#drain();
  }

  /**
   * NBD_OPT_STARTTLS, then TLS on the same socket. Bytes the server sent after its ACK in
   * plaintext would be taken as part of the protected negotiation: refused.
   */
  async #startTls(options: tls.ConnectionOptions): Promise<void> {
    const reply = await this.#option(C.NBD_OPT_STARTTLS);
    if (reply.type !== C.NBD_REP_ACK) {
      throw new BdsnapError('EPERM', `the server refused TLS (reply type 0x${reply.type.toString(16)}): it serves no TLS, or not on this connection`);
    }
    if (this.#decoder.bufferedBytes !== 0) throw new BdsnapError('EPROTO', 'the server sent plaintext after acknowledging NBD_OPT_STARTTLS');
    const raw = this.#socket;
    const secure = tls.connect({ ...options, socket: raw });
    const handshake = new Promise<void>((resolve, reject) => {
      secure.once('secureConnect', resolve);
      secure.once('error', (err) => reject(new BdsnapError('EPERM', `TLS with the NBD server failed: ${err.message}`, { cause: err })));
    });
    await withTimeout(handshake, this.#timeoutMs, () => new BdsnapError('ETIMEDOUT', `the NBD server did not finish the TLS handshake within ${formatDuration(this.#timeoutMs!)}`));
    secure.on('data', (chunk: Buffer) => this.#onData(chunk));
    secure.on('error', (err) => this.#fail(new BdsnapError('EIO', `NBD connection failed: ${err.message}`, { cause: err })));
    secure.once('close', () => this.#fail(new BdsnapError('ESHUTDOWN', 'the NBD connection was closed')));
    this.#socket = secure;
  }

  async #option(option: number, data?: Buffer): Promise<OptionReplyMessage> {
    const replies = await this.#optionList(option, data);
    return replies[replies.length - 1]!;
  }

  /**
   * Send an option and collect its replies up to the final one (ACK or an error). A server that
   * never sends the final one cannot make this hold more than MAX_OPTION_REPLIES_BYTES.
   */
  async #optionList(option: number, data?: Buffer): Promise<OptionReplyMessage[]> {
    this.#socket.write(encodeOption(option, data));
    const replies: OptionReplyMessage[] = [];
    let heldBytes = 0;
    for (;;) {
      const m = await this.#nextMessage();
      if (m.kind !== 'option-reply' || m.option !== option) throw new BdsnapError('EPROTO', `unexpected reply to option ${option}`);
      replies.push(m);
      if (m.type === C.NBD_REP_ACK || (m.type & C.NBD_REP_FLAG_ERROR) !== 0) return replies;
      heldBytes += C.OPTION_REPLY_HEADER_BYTES + m.data.length;
      if (heldBytes > MAX_OPTION_REPLIES_BYTES) {
        throw new BdsnapError('EPROTO', `the NBD server sent more than ${MAX_OPTION_REPLIES_BYTES} bytes of replies to option ${option} without a final one (${replies.length} replies)`);
      }
    }
  }

  #nextMessage(): Promise<ServerMessage> {
    if (this.#failure) return Promise.reject(this.#failure);
    this.#awaitAnswer();
    const p = new Promise<ServerMessage>((resolve, reject) => (this.#handshakeWaiter = { resolve, reject }));
    this.#drain();
    return p;
  }

  // ---- receiving ----

  #onData(chunk: Buffer): void {
    if (this.#timeoutMs !== undefined) this.#heardAtMs = performance.now();
    this.#decoder.append(chunk);
    this.#drain();
    // The chunk is the socket's read buffer, reused by the next read.
    this.#decoder.detach();
  }

  /**
   * Decode what is buffered. During the handshake only one message is decoded per waiting
   * handshake step, because that step may switch the decoder's phase before the next one.
   */
  #drain(): void {
    for (;;) {
      if (!this.#inTransmission && !this.#handshakeWaiter) return;
      let m: ServerMessage | undefined;
      try {
        m = this.#decoder.next();
      } catch (err) {
        this.#fail(err as BdsnapError);
        this.#socket.destroy();
        return;
      }
      if (!m) return;
      if (m.kind === 'simple-reply' || m.kind === 'structured-reply') {
        this.#onReply(m);
        continue;
      }
      const w = this.#handshakeWaiter;
      if (!w) {
        this.#protocolFailure(`unexpected ${m.kind} message`);
        return;
      }
      this.#handshakeWaiter = undefined;
      w.resolve(m);
      return;
    }
  }

  #onReply(m: ServerMessage): void {
    if (m.kind !== 'simple-reply' && m.kind !== 'structured-reply') return;
    const p = m.cookieHi === 0 ? this.#pending.get(m.cookieLo) : undefined;
    if (!p) {
      this.#protocolFailure(`reply for unknown cookie ${m.cookieHi}:${m.cookieLo}`);
      return;
    }
    if (m.kind === 'simple-reply') {
      this.#pending.delete(m.cookieLo);
      if (m.errno !== 0) p.reject(new BdsnapError(codeForErrno(m.errno), `NBD server returned error ${m.errno} for command ${p.type}`));
      else p.resolve({ data: p.type === C.NBD_CMD_READ ? (m.data ?? Buffer.alloc(0)) : undefined });
      return;
    }
    if (!this.#structured) {
      this.#protocolFailure('structured reply without negotiation');
      return;
    }
    const problem = this.#applyChunk(p, m);
    if (problem) {
      this.#protocolFailure(problem);
      return;
    }
    if ((m.flags & C.NBD_REPLY_FLAG_DONE) === 0) return;
    // Chunks never overlap (the protocol says so), so a read is whole when they add up.
    if (p.type === C.NBD_CMD_READ && !p.error && p.coveredBytes !== p.lengthBytes) {
      this.#protocolFailure(`the read reply covers ${p.coveredBytes} of ${p.lengthBytes} bytes`);
      return;
    }
    this.#pending.delete(m.cookieLo);
    if (p.error) p.reject(p.error);
    else if (p.type === C.NBD_CMD_BLOCK_STATUS) p.resolve(this.#blockStatusReply(p));
    else p.resolve({ data: p.data, holeChunks: p.type === C.NBD_CMD_READ ? p.holeChunks : undefined });
  }

  /** Fold one structured chunk into the pending request; returns a problem description or undefined. */
  #applyChunk(p: Pending, m: StructuredReplyMessage): string | undefined {
    const b = m.payload;
    if ((m.type & C.NBD_REPLY_TYPE_ERROR_BIT) !== 0) {
      if (b.length < 6) return 'error chunk too short';
      const errno = b.readUInt32BE(0);
      const messageBytes = b.readUInt16BE(4);
      if (messageBytes > b.length - 6) return 'error chunk message overflows the chunk';
      const text = b.toString('utf8', 6, 6 + messageBytes);
      p.error ??= new BdsnapError(codeForErrno(errno), text || `NBD server returned error ${errno} for command ${p.type}`);
      return undefined;
    }
    switch (m.type) {
      case C.NBD_REPLY_TYPE_NONE:
        return b.length === 0 ? undefined : 'NONE chunk with a payload';
      case C.NBD_REPLY_TYPE_OFFSET_DATA: {
        // Data the decoder placed already (m.placedBytes) follows the offset; else it is in b.
        const dataBytes = m.placedBytes ?? b.length - 8;
        if (p.type !== C.NBD_CMD_READ || b.length < 8 || dataBytes < 1) return 'unexpected OFFSET_DATA chunk';
        const at = readU64BE(b, 0) - p.offsetBytes;
        if (at < 0 || at + dataBytes > p.lengthBytes) return 'OFFSET_DATA chunk outside the request';
        if (m.placedBytes === undefined) b.copy(p.data!, at, 8);
        p.coveredBytes += dataBytes;
        return undefined;
      }
      case C.NBD_REPLY_TYPE_OFFSET_HOLE: {
        if (p.type !== C.NBD_CMD_READ || b.length !== 12) return 'unexpected OFFSET_HOLE chunk';
        const at = readU64BE(b, 0) - p.offsetBytes;
        const n = b.readUInt32BE(8);
        if (n === 0 || at < 0 || at + n > p.lengthBytes) return 'OFFSET_HOLE chunk outside the request';
        p.data!.fill(0, at, at + n);
        p.coveredBytes += n;
        p.holeChunks++;
        return undefined;
      }
      case C.NBD_REPLY_TYPE_BLOCK_STATUS: {
        if (p.type !== C.NBD_CMD_BLOCK_STATUS || b.length < 12 || (b.length - 4) % 8 !== 0) return 'unexpected BLOCK_STATUS chunk';
        const id = b.readUInt32BE(0);
        if (!this.#contextNames.has(id)) return `BLOCK_STATUS chunk for context id ${id}, which was not selected`;
        p.contexts ??= new Map();
        if (p.contexts.has(id)) return `two BLOCK_STATUS chunks for context id ${id}`;
        const extents: Extent[] = [];
        for (let at = 4; at < b.length; at += 8) extents.push({ length: b.readUInt32BE(at), flags: b.readUInt32BE(at + 4) });
        p.contexts.set(id, extents);
        return undefined;
      }
      default:
        return `unknown reply chunk type ${m.type}`;
    }
  }

  #blockStatusReply(p: Pending): NbdReply {
    const contexts = p.contexts ?? new Map<number, Extent[]>();
    const base = this.#metaContextId === undefined ? undefined : contexts.get(this.#metaContextId);
    return { contexts, extents: base ?? (contexts.size === 1 ? [...contexts.values()][0] : undefined) };
  }

  #protocolFailure(message: string): void {
    this.#fail(new NbdProtocolError(message, -1));
    this.#socket.destroy();
  }

  /**
   * An answer is about to be awaited: time the server's silence from now unless another was
   * already awaited (then from what it last sent); time spent with nothing awaited is no silence.
   */
  #awaitAnswer(): void {
    if (this.#timeoutMs === undefined) return;
    if (this.#pending.size === 0 && this.#handshakeWaiter === undefined) this.#heardAtMs = performance.now();
    if (this.#watchdog !== undefined) return;
    const timeoutMs = this.#timeoutMs;
    this.#watchdog = setInterval(() => {
      if (this.#pending.size === 0 && this.#handshakeWaiter === undefined) {
        clearInterval(this.#watchdog);
        this.#watchdog = undefined;
      } else if (performance.now() - this.#heardAtMs > timeoutMs) {
        clearInterval(this.#watchdog);
        this.#watchdog = undefined;
        this.#fail(new BdsnapError('ETIMEDOUT', `the NBD server sent nothing for ${formatDuration(timeoutMs)} while answers were awaited: it is stopped or hung`));
        this.#socket.destroy();
      }
    }, Math.max(10, timeoutMs / 4));
    this.#watchdog.unref();
  }

  #fail(err: BdsnapError): void {
    this.#failure ??= err;
    const w = this.#handshakeWaiter;
    this.#handshakeWaiter = undefined;
    w?.reject(this.#failure);
    const pending = [...this.#pending.values()];
    this.#pending.clear();
    for (const p of pending) p.reject(this.#failure);
  }

  // ---- requests ----

  /**
   * Send one request and wait for its reply. Low level: no range or flag checks, so tests can
   * send what a broken client would. `payload` is sent after the header for NBD_CMD_WRITE.
   * A read's data lands in `target` when given (of `lengthBytes`), else in a new buffer.
   */
  request(type: number, flags: number, offsetBytes: number, lengthBytes: number, payload?: Buffer, target?: Buffer): Promise<NbdReply> {
    if (this.#failure) return Promise.reject(this.#failure);
    if (this.#closed) return Promise.reject(new BdsnapError('ESHUTDOWN', 'the NBD client is closed'));
    const cookie = this.#nextCookie;
    this.#nextCookie = cookie === MAX_COOKIE ? 1 : cookie + 1;
    this.#awaitAnswer();
    return new Promise<NbdReply>((resolve, reject) => {
      const expectsData = type === C.NBD_CMD_READ && this.#structured;
      this.#pending.set(cookie, {
        type, offsetBytes, lengthBytes,
        data: expectsData ? (target ?? Buffer.allocUnsafe(lengthBytes)) : type === C.NBD_CMD_READ ? target : undefined,
        coveredBytes: 0, contexts: undefined, holeChunks: 0, error: undefined, resolve, reject,
      });
      const s = this.#socket;
      const header = encodeRequest(flags, type, 0, cookie, offsetBytes, lengthBytes);
      if (payload && payload.length > 0) {
        s.cork();
        s.write(header);
        s.write(payload);
        s.uncork();
      } else {
        s.write(header);
      }
    });
  }

  async read(target: Buffer, offsetBytes: number): Promise<void> {
    const reply = await this.request(C.NBD_CMD_READ, 0, offsetBytes, target.length, undefined, target);
    if (reply.data !== target) reply.data!.copy(target);
  }

  async write(data: Buffer, offsetBytes: number, options?: WriteOptions): Promise<void> {
    await this.request(C.NBD_CMD_WRITE, options?.fua ? C.NBD_CMD_FLAG_FUA : 0, offsetBytes, data.length, data);
  }

  async flush(): Promise<void> {
    await this.request(C.NBD_CMD_FLUSH, 0, 0, 0);
  }

  async trim(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    await this.request(C.NBD_CMD_TRIM, options?.fua ? C.NBD_CMD_FLAG_FUA : 0, offsetBytes, lengthBytes);
  }

  async zero(offsetBytes: number, lengthBytes: number, options?: ZeroOptions): Promise<void> {
    const flags = (options?.fua ? C.NBD_CMD_FLAG_FUA : 0) | (options?.noHole ? C.NBD_CMD_FLAG_NO_HOLE : 0)
      | (options?.fastZero ? C.NBD_CMD_FLAG_FAST_ZERO : 0);
    await this.request(C.NBD_CMD_WRITE_ZEROES, flags, offsetBytes, lengthBytes);
  }

  async cache(offsetBytes: number, lengthBytes: number): Promise<void> {
    await this.request(C.NBD_CMD_CACHE, 0, offsetBytes, lengthBytes);
  }

  /** Extents from BLOCK_STATUS (base:allocation); all data when the server offers no context. */
  async extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    if (this.#metaContextId === undefined) return [{ length: lengthBytes, flags: 0 }];
    const reply = await this.request(C.NBD_CMD_BLOCK_STATUS, 0, offsetBytes, lengthBytes);
    return reply.extents ?? [];
  }

  /**
   * Extents of one selected metadata context (e.g. a qemu:dirty-bitmap), contiguous from
   * `offsetBytes`; the server may cover less than asked, so callers loop. `reqOne`: ask for a
   * single extent. Errors: ENOTSUP when the context was not selected, EPROTO when the server's
   * reply has no chunk for it.
   */
  async blockStatusContext(name: string, offsetBytes: number, lengthBytes: number, options: { reqOne?: boolean } = {}): Promise<Extent[]> {
    const id = this.#contextIds.get(name);
    if (id === undefined) throw new BdsnapError('ENOTSUP', `metadata context "${name}" is not available on this connection`);
    const reply = await this.request(C.NBD_CMD_BLOCK_STATUS, options.reqOne ? C.NBD_CMD_FLAG_REQ_ONE : 0, offsetBytes, lengthBytes);
    const extents = reply.contexts?.get(id);
    if (!extents) throw new BdsnapError('EPROTO', `the server's block status reply has no chunk for "${name}"`);
    return extents;
  }

  /** NBD_CMD_DISC after the requests in flight, then close. */
  async close(): Promise<void> {
    if (!this.#closed) {
      this.#closed = true;
      await Promise.allSettled([...this.#pending.values()].map((p) => new Promise<void>((resolve) => {
        const { resolve: res, reject: rej } = p;
        p.resolve = (r) => { res(r); resolve(); };
        p.reject = (e) => { rej(e); resolve(); };
      })));
      if (!this.#socket.destroyed && this.#socket.writable) {
        this.#socket.end(encodeRequest(0, C.NBD_CMD_DISC, 0, 0, 0, 0));
      }
    }
    // A server that stopped never closes its end: let go of ours after the timeout.
    const timer = this.#timeoutMs !== undefined ? setTimeout(() => this.#socket.destroy(), this.#timeoutMs) : undefined;
    await this.#closePromise.finally(() => clearTimeout(timer));
  }
}

function optionError(option: number, reply: OptionReplyMessage, exportName: string): BdsnapError {
  const text = reply.data.toString('utf8');
  // The server's text often repeats what we say; add it only when it tells something new.
  const detail = text && !text.includes(exportName) ? `: ${text}` : '';
  if (reply.type === C.NBD_REP_ERR_UNKNOWN) return new BdsnapError('ENOENT', `unknown export "${exportName}"${detail}`);
  if (reply.type === C.NBD_REP_ERR_POLICY) return new BdsnapError('EPERM', `export "${exportName}" refused${detail}`);
  return new BdsnapError('EPROTO', `option ${option} failed with reply type 0x${reply.type.toString(16)}${detail}`);
}
