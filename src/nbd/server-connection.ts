/**
 * One NBD client connection on the server side: fixed-newstyle option haggling, then the
 * transmission phase.
 *
 * Invariants:
 * - Options are handled one at a time (the client must wait for each final reply anyway);
 *   decoding stops while an option is in progress, so a phase switch never races the decoder.
 * - Requests run concurrently and each reply is written as soon as it is complete (out of
 *   order); header and data always leave in one buffer, and replies finishing in the same
 *   event-loop turn are corked into one writev.
 * - A READ reply is only built once its data is in hand, so a failed read always gets a clean
 *   error reply and never a half-sent one.
 * - Memory is bounded: every request is charged its payload (READ or WRITE length) plus a
 *   fixed overhead from the server's shared InFlightBudget before anything is allocated for it;
 *   its reply carries that charge (topped up to the reply's length) until the socket has taken it. Decoding pauses (and the socket
 *   with it) while a request waits for the budget, while this connection holds more than its
 *   own cap, or while the socket's write buffer is full; it resumes when bytes are given back
 *   or on 'drain'. So a client that does not read its replies stops being read itself, and
 *   what it asked for stays charged until it is sent or the connection is gone.
 * - The handshake has a deadline: a client that has not reached transmission by then is cut
 *   off, so connections that never finish it cannot hold the server's slots and descriptors.
 *   Once in transmission a connection may stay idle for as long as it likes: the kernel (via
 *   nbdfuse or nbd-client) and qemu keep a connection open with nothing to do for hours while
 *   a filesystem or a disk is mounted, and cutting it would break the mount. A client that
 *   asked for replies but takes none of their bytes for the send-stall timeout is cut off too:
 *   it holds budget the others wait for, and no real client stops reading for that long.
 * - A framing error or a vanished client ends only this connection; the export handle is
 *   released exactly once, after every request in flight has finished.
 * - TLS (NBD_OPT_STARTTLS): the client sends nothing after STARTTLS until our ACK, so nothing
 *   may be queued in the decoder then (a client that did is cut off); the ACK is written and the
 *   socket handed to TLS in the same turn, before any more bytes can be read as plaintext. No
 *   option is read over TLS before the handshake is complete and the peer verified. With
 *   `require`, every option but STARTTLS (and ABORT) is refused with NBD_REP_ERR_TLS_REQD until
 *   then, and NBD_OPT_EXPORT_NAME, which cannot be refused, closes the connection.
 * - READ reply buffers and WRITE payload buffers come from a pool and return to it when the
 *   socket (or the device's write) is done with them: a device must not keep a reference to
 *   the data of a write after that write has settled.
 */

import type net from 'node:net';
import type tls from 'node:tls';
import type { NbdTls } from './tls.js';
import { WIRE_ERRNO, toBdsnapError, BdsnapError } from '../errors.js';
import { FLUSH_ANSWERED_MARK, traceMark } from '../host/fs-trace.js';
import { EXTENT_HOLE, EXTENT_ZERO, type BlockDevice } from '../device/block-device.js';
import type { ExportHandle, ExportProvider, MetaContextSource } from './exports.js';
import type { BufferPool } from '../device/buffer-pool.js';
import type { InFlightBudget } from './in-flight-budget.js';
import { RequestDecoder, type ClientMessage, type OptionMessage, type RequestMessage } from './request-decoder.js';
import * as C from './constants.js';
import { isAllZero } from '../bytes.js';
import { clipExtents } from './block-status.js';
import { contextMatches, parseInfoRequest, parseMetaContextData } from './option-data.js';
import {
  OFFSET_DATA_PREFIX_BYTES, encodeBlockStatus, encodeExportNameReply, encodeGreeting, encodeInfoBlockSize,
  encodeInfoDescription, encodeInfoExport, encodeInfoName, encodeOffsetHole, encodeOptionError, encodeOptionReply,
  encodeRepMetaContext, encodeRepServer, encodeSimpleReply, encodeStructuredError, encodeStructuredNone,
  writeSimpleReplyHeader, writeStructuredHeader, writeU64,
} from './encoders.js';

export type LogFn = (event: Record<string, unknown>) => void;

/** The id given to base:allocation by NBD_OPT_SET_META_CONTEXT; other contexts get 2, 3, ... */
const BASE_ALLOCATION_ID = 1;
/** How long a client may keep its side open after we closed ours. */
const END_TIMEOUT_MS = 5000;
const KNOWN_CLIENT_FLAGS = C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES;
/**
 * What every request is charged on top of its payload: its objects, promise and reply. It also
 * bounds how many requests with no payload (FLUSH, TRIM, BLOCK_STATUS) can be in flight.
 */
export const REQUEST_OVERHEAD_BYTES = 4096;

/** What a connection shares with its server, and its limits. */
export interface ConnectionContext {
  exports: ExportProvider;
  pool: BufferPool;
  budget: InFlightBudget;
  /** Bytes this connection may hold before it stops reading (requests and unsent replies). */
  maxInFlightBytes: number;
  /** Time allowed from accept to the end of option haggling. */
  handshakeTimeoutMs: number;
  /** Time a reply may wait without any of it being taken by the client. */
  sendStallTimeoutMs: number;
  /** The write buffer size at which replies wait for 'drain' (also given to a TLS socket). */
  socketHighWaterMarkBytes: number;
  log?: LogFn;
  /** The connection `id` finished its handshake and serves an export. */
  onTransmission?: (id: number) => void;
}

type State = 'handshake' | 'transmission' | 'closing' | 'closed';

interface Refusal {
  errno: number;
  message: string;
}

/** A context chosen by NBD_OPT_SET_META_CONTEXT, by name until the export is opened. */
interface SelectedContext {
  id: number;
  name: string;
}

/** A selected context of the export in use: base:allocation, another source, or one gone since. */
interface ActiveContext {
  id: number;
  name: string;
  source: 'base' | MetaContextSource | undefined;
}

export class ServerConnection {
  readonly id: number;
  #socket: net.Socket;
  #exports: ExportProvider;
  #log: LogFn | undefined;
  #maxInFlightBytes: number;
  #pool: BufferPool;
  #budget: InFlightBudget;
  #sendStallTimeoutMs: number;
  #decoder: RequestDecoder;
  #state: State = 'handshake';
  #tls: NbdTls | undefined;
  #highWaterMarkBytes: number;
  #onTransmission: ((id: number) => void) | undefined;
  /** TLS has been started (STARTTLS acknowledged) on this connection. */
  #tlsStarted = false;

  #noZeroes = false;
  #structured = false;
  /** Export name and contexts of the last successful NBD_OPT_SET_META_CONTEXT, if any. */
  #metaContextExport: string | undefined;
  #selectedContexts: SelectedContext[] = [];
  /** The selected contexts, resolved against the export at GO; empty = no BLOCK_STATUS. */
  #activeContexts: ActiveContext[] = [];

  #handle: ExportHandle | undefined;
  #device: BlockDevice | undefined;
  #sizeBytes = 0;
  #minimumBlockBytes = 1;
  #maximumPayloadBytes: number = C.MAX_PAYLOAD_BYTES;

  #optionBusy = false;
  #eof = false;
  #pumping = false;
  #paused = false;
  #writeBlocked = false;
  #corked = false;
  #inFlightCount = 0;
  /** Bytes taken from the budget: admitted requests and replies the socket has not taken yet. */
  #inFlightBytes = 0;
  /** Charge of the request admitted last, until the decoder hands it over. */
  #admittedBytes = 0;
  /** A request header waiting for the budget ('waiting') or given its bytes ('granted'). */
  #admission: 'none' | 'waiting' | 'granted' = 'none';
  #admissionBytes = 0;
  /** Set at teardown: whatever is still charged was given back, late releases are ignored. */
  #accountingClosed = false;
  /**
   * Replies handed to the socket and not yet taken, oldest first from `#sentHead`: what each
   * carries from the budget and its pool buffer. One write callback (`#written`) serves them all.
   */
  #unsentCharges: number[] = [];
  #unsentBuffers: Array<Buffer | undefined> = [];
  #sentHead = 0;
  /** Bytes ever handed to the socket; less its writableLength, the bytes it has taken. */
  #queuedBytes = 0;
  /** Bytes the socket had taken when the stall timer was armed. */
  #stallMark = 0;
  #handshakeTimer: NodeJS.Timeout | undefined;
  #stallTimer: NodeJS.Timeout | undefined;
  #idleWaiters: Array<() => void> = [];
  #closedPromise: Promise<void>;
  #resolveClosed!: () => void;

  /**
   * `ownReads`: the caller feeds received bytes through receive() from one reused buffer
   * (socket `onread`); otherwise the socket's 'data' events are used.
   */
  constructor(id: number, socket: net.Socket, context: ConnectionContext, ownReads = false, tls?: NbdTls) {
    this.id = id;
    const pool = context.pool;
    this.#pool = pool;
    this.#budget = context.budget;
    this.#decoder = new RequestDecoder({ allocatePayload: (n) => pool.get(n), transientChunks: ownReads, admit: (r) => this.#admit(r) });
    this.#socket = socket;
    this.#tls = tls;
    this.#highWaterMarkBytes = context.socketHighWaterMarkBytes;
    this.#exports = context.exports;
    this.#maxInFlightBytes = context.maxInFlightBytes;
    this.#sendStallTimeoutMs = context.sendStallTimeoutMs;
    this.#log = context.log;
    this.#onTransmission = context.onTransmission;
    this.#closedPromise = new Promise((resolve) => (this.#resolveClosed = resolve));
    this.#handshakeTimer = setTimeout(() => this.#handshakeExpired(context.handshakeTimeoutMs), context.handshakeTimeoutMs);
    this.#handshakeTimer.unref();

    this.#listen(socket, !ownReads);
    socket.write(encodeGreeting(C.NBD_FLAG_FIXED_NEWSTYLE | C.NBD_FLAG_NO_ZEROES));
  }

  #onData = (chunk: Buffer): void => this.receive(chunk);
  #onDrain = (): void => {
    this.#writeBlocked = false;
    this.#pump();
  };
  /** The client shut its sending side: answer what it asked, then close ours. */
  #onEnd = (): void => {
    this.#eof = true;
    this.#pump();
  };
  #onError = (err: Error): void => this.#log?.({ event: 'connection-error', connection: this.id, error: err.message });
  #onClose = (): void => void this.#teardown();

  #listen(socket: net.Socket, data: boolean): void {
    if (data) socket.on('data', this.#onData);
    socket.on('drain', this.#onDrain);
    socket.on('end', this.#onEnd);
    socket.on('error', this.#onError);
    socket.on('close', this.#onClose);
  }

  /** Bytes from the client. With `ownReads`, `chunk` is reused after this returns. */
  receive(chunk: Buffer): void {
    // After we decided to close, what the client still sends is dropped unread.
    if (this.#state !== 'handshake' && this.#state !== 'transmission') return;
    this.#decoder.append(chunk);
    this.#pump();
    this.#decoder.detach();
  }

  /**
   * Where the socket may read next instead of its shared buffer: the rest of a WRITE payload
   * being received (see RequestDecoder.payloadTarget), or undefined.
   */
  readTarget(): Buffer | undefined {
    if (this.#state !== 'handshake' && this.#state !== 'transmission') return undefined;
    return this.#decoder.payloadTarget();
  }

  /** `n` bytes were read straight into the last readTarget(). */
  receivePlaced(n: number): void {
    if (this.#state !== 'handshake' && this.#state !== 'transmission') return;
    this.#decoder.placed(n);
    this.#pump();
  }

  /** Resolves once the socket is closed and the export handle released. */
  get closed(): Promise<void> {
    return this.#closedPromise;
  }

  /** Still haggling options (not yet serving an export, not closing). */
  get inHandshake(): boolean {
    return this.#state === 'handshake';
  }

  /** Handshaking or serving: the connection holds one of the server's slots. */
  get open(): boolean {
    return this.#state === 'handshake' || this.#state === 'transmission';
  }

  /** Cut the connection off at once (the server needs its slot). */
  abort(reason: string): void {
    if (!this.open) return;
    this.#log?.({ event: 'connection-aborted', connection: this.id, reason });
    this.#state = 'closing';
    this.#socket.destroy();
  }

  /**
   * Server shutdown: stop reading, let requests in flight finish and reply, flush the device,
   * then close. A connection still haggling options is simply dropped.
   */
  async shutdown(): Promise<void> {
    if (this.#state === 'handshake') {
      this.#socket.destroy();
    } else if (this.#state === 'transmission') {
      this.#state = 'closing';
      this.#socket.pause();
      await this.#idle();
      try {
        await this.#device?.flush();
      } catch (err) {
        this.#log?.({ event: 'flush-error', connection: this.id, error: toBdsnapError(err).message });
      }
      this.#endSocket();
    }
    await this.#closedPromise;
  }

  // ---- reading ----

  #pump(): void {
    if (this.#pumping) return;
    this.#pumping = true;
    try {
      while ((this.#state === 'handshake' || this.#state === 'transmission') && !this.#blocked()) {
        let m: ClientMessage | undefined;
        try {
          m = this.#decoder.next();
        } catch (err) {
          this.#fatal(err);
          return;
        }
        if (!m) break;
        this.#dispatch(m);
      }
    } finally {
      this.#pumping = false;
    }
    const blocked = this.#blocked();
    if (this.#eof && !blocked) {
      this.#finish();
      return;
    }
    const pause = blocked && this.#state !== 'closed';
    if (pause !== this.#paused) {
      this.#paused = pause;
      if (pause) this.#socket.pause();
      else if (this.#state === 'handshake' || this.#state === 'transmission') this.#socket.resume();
    }
  }

  /**
   * Whether to stop decoding. The cap leaves out the request being received: it was admitted,
   * and it can only finish (and give its bytes back) once its payload has been read.
   */
  #blocked(): boolean {
    return this.#optionBusy || this.#writeBlocked || this.#admission === 'waiting'
      || this.#inFlightBytes - this.#admittedBytes >= this.#maxInFlightBytes;
  }

  // ---- the budget ----

  /** What a request holds from admission until it is done: its payload and the overhead. */
  #chargeOf(r: RequestMessage): number {
    if (r.type === C.NBD_CMD_WRITE && !r.payloadSkipped) return REQUEST_OVERHEAD_BYTES + r.lengthBytes;
    // A READ over the maximum is refused without a buffer: it costs no more than any request.
    if (r.type === C.NBD_CMD_READ && r.lengthBytes <= this.#maximumPayloadBytes) return REQUEST_OVERHEAD_BYTES + r.lengthBytes;
    return REQUEST_OVERHEAD_BYTES;
  }

  /** The decoder's question for each request header: may it go on (and its payload be stored)? */
  #admit(r: RequestMessage): boolean {
    // A client leaving holds nothing and frees what it held: it never waits behind others.
    if (r.type === C.NBD_CMD_DISC) return true;
    if (this.#admission === 'waiting') return false;
    if (this.#admission === 'granted') {
      this.#admission = 'none';
    } else {
      const bytes = this.#chargeOf(r);
      if (!this.#budget.acquire(bytes, this.#granted)) {
        this.#admission = 'waiting';
        this.#admissionBytes = bytes;
        return false;
      }
      this.#admissionBytes = bytes;
    }
    this.#admittedBytes = this.#admissionBytes;
    this.#inFlightBytes += this.#admissionBytes;
    return true;
  }

  /** The budget took the waiting request's bytes for us. */
  #granted = (): void => {
    this.#admission = 'granted';
    this.#pump();
  };

  #take(bytes: number): void {
    this.#inFlightBytes += bytes;
    this.#budget.charge(bytes);
  }

  #giveBack(bytes: number): void {
    if (this.#accountingClosed) return;
    this.#inFlightBytes -= bytes;
    this.#budget.release(bytes);
    if (this.#paused) this.#pump();
  }

  /** Teardown: give back what is still held (a half-received WRITE, unsent replies, a grant). */
  #closeAccounting(): void {
    if (this.#admission === 'waiting') this.#budget.cancel(this.#granted);
    else if (this.#admission === 'granted') this.#budget.release(this.#admissionBytes);
    this.#admission = 'none';
    this.#accountingClosed = true;
    const held = this.#inFlightBytes;
    this.#inFlightBytes = 0;
    this.#budget.release(held);
  }

  // ---- deadlines ----

  #handshakeExpired(timeoutMs: number): void {
    this.#handshakeTimer = undefined;
    if (this.#state !== 'handshake') return;
    this.#log?.({ event: 'handshake-timeout', connection: this.id, timeoutMs });
    this.#state = 'closing';
    this.#socket.destroy();
  }

  /**
   * The stall timer is armed once per period rather than moved on every reply: when it fires it
   * looks whether the socket took any bytes since it was armed, and sleeps again if so.
   */
  #armStallTimer(): void {
    this.#stallMark = this.#queuedBytes - this.#socket.writableLength;
    this.#stallTimer = setTimeout(this.#checkSendStall, this.#sendStallTimeoutMs).unref();
  }

  #checkSendStall = (): void => {
    this.#stallTimer = undefined;
    if (this.#sentHead === this.#unsentCharges.length || this.#state === 'closed') return;
    if (this.#queuedBytes - this.#socket.writableLength !== this.#stallMark) {
      this.#armStallTimer();
      return;
    }
    this.#log?.({ event: 'send-stalled', connection: this.id, timeoutMs: this.#sendStallTimeoutMs, heldBytes: this.#inFlightBytes });
    this.#state = 'closing';
    this.#socket.destroy();
  };

  #clearTimers(): void {
    clearTimeout(this.#handshakeTimer);
    clearTimeout(this.#stallTimer);
    this.#handshakeTimer = undefined;
    this.#stallTimer = undefined;
  }

  #dispatch(m: ClientMessage): void {
    switch (m.kind) {
      case 'client-flags':
        if ((m.flags & ~KNOWN_CLIENT_FLAGS) !== 0) {
          this.#fatal(new BdsnapError('EPROTO', `unknown client flags 0x${m.flags.toString(16)}`));
          return;
        }
        this.#noZeroes = (m.flags & C.NBD_FLAG_C_NO_ZEROES) !== 0;
        return;
      case 'option':
        this.#optionBusy = true;
        this.#handleOption(m).then(
          () => {
            this.#optionBusy = false;
            this.#pump();
          },
          (err: unknown) => this.#fatal(err),
        );
        return;
      case 'request':
        this.#handleRequest(m);
        return;
    }
  }

  #fatal(err: unknown): void {
    const e = toBdsnapError(err);
    this.#log?.({ event: 'protocol-error', connection: this.id, code: e.code, error: e.message });
    this.#state = 'closing';
    this.#socket.destroy();
  }

  /** Graceful end (NBD_CMD_DISC or end of the client's stream). */
  #finish(): void {
    if (this.#state === 'closing' || this.#state === 'closed') return;
    this.#state = 'closing';
    this.#socket.pause();
    void this.#idle().then(() => this.#endSocket());
  }

  /**
   * Half-close our side and keep reading (and dropping) until the client closes too: a paused
   * socket would never see the client's end. A client that never closes is cut off.
   */
  #endSocket(): void {
    const s = this.#socket;
    s.end();
    s.resume();
    const timer = setTimeout(() => s.destroy(), END_TIMEOUT_MS);
    timer.unref();
    s.once('close', () => clearTimeout(timer));
  }

  async #teardown(): Promise<void> {
    if (this.#state === 'closed') return;
    this.#state = 'closed';
    this.#clearTimers();
    await this.#idle();
    this.#closeAccounting();
    // Runs once (guarded by the state), so the handle is released exactly once.
    if (this.#handle) {
      try {
        await this.#handle.release();
      } catch (err) {
        this.#log?.({ event: 'release-error', connection: this.id, error: toBdsnapError(err).message });
      }
    }
    this.#log?.({ event: 'connection-closed', connection: this.id });
    this.#resolveClosed();
  }

  #idle(): Promise<void> {
    if (this.#inFlightCount === 0) return Promise.resolve();
    return new Promise((resolve) => this.#idleWaiters.push(resolve));
  }

  // ---- writing ----

  /**
   * Queue a reply. It carries `charge` (what its request was admitted with) until the socket has
   * taken it, topped up from the budget when the reply is larger; a `pooled` buffer goes back to
   * the pool then.
   */
  #send(buf: Buffer, pooled = false, charge = 0): void {
    const s = this.#socket;
    if (s.destroyed || !s.writable) {
      if (pooled) this.#pool.put(buf);
      this.#giveBack(charge);
      return;
    }
    const bytes = buf.length;
    if (bytes > charge) {
      this.#take(bytes - charge);
      charge = bytes;
    }
    this.#unsentCharges.push(charge);
    this.#unsentBuffers.push(pooled ? buf : undefined);
    if (this.#stallTimer === undefined) this.#armStallTimer();
    this.#queuedBytes += bytes;
    if (!this.#corked && this.#inFlightCount > 1) {
      // Replies completing in this turn of the event loop leave in one writev; a lone
      // request's reply goes at once.
      this.#corked = true;
      s.cork();
      setImmediate(this.#uncork);
    }
    if (!s.write(buf, this.#written)) this.#writeBlocked = true;
  }

  #uncork = (): void => {
    this.#corked = false;
    this.#socket.uncork();
  };

  /**
   * The socket took the oldest unsent reply. Called once per write, in order, on error too (the
   * socket was destroyed): the bytes are free either way.
   */
  #written = (): void => {
    const at = this.#sentHead++;
    const buf = this.#unsentBuffers[at];
    const charge = this.#unsentCharges[at]!;
    if (this.#sentHead === this.#unsentCharges.length) {
      this.#sentHead = 0;
      this.#unsentCharges.length = 0;
      this.#unsentBuffers.length = 0;
    } else {
      this.#unsentBuffers[at] = undefined;
    }
    if (buf) this.#pool.put(buf);
    this.#giveBack(charge);
  };

  // ---- options ----

  async #handleOption(m: OptionMessage): Promise<void> {
    const { option, data } = m;
    if (option === C.NBD_OPT_STARTTLS) return this.#startTls(m);
    if (this.#tls?.mode === 'require' && !this.#tlsStarted && option !== C.NBD_OPT_ABORT) {
      if (option === C.NBD_OPT_EXPORT_NAME) throw new BdsnapError('EPERM', 'NBD_OPT_EXPORT_NAME without TLS, which this server requires');
      this.#send(encodeOptionError(option, C.NBD_REP_ERR_TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first'));
      return;
    }
    if (option === C.NBD_OPT_EXPORT_NAME) {
      // No way to report an error to EXPORT_NAME: refusing means closing.
      if (m.tooBig) throw new BdsnapError('EPROTO', 'export name too long');
      await this.#exportName(data.toString('utf8'));
      return;
    }
    if (m.tooBig) {
      this.#send(encodeOptionError(option, C.NBD_REP_ERR_TOO_BIG, `option data of ${m.lengthBytes} bytes is too large`));
      return;
    }
    switch (option) {
      case C.NBD_OPT_ABORT:
        this.#send(encodeOptionReply(option, C.NBD_REP_ACK));
        this.#finish();
        return;
      case C.NBD_OPT_LIST: {
        if (data.length !== 0) return this.#optionInvalid(option, 'NBD_OPT_LIST takes no data');
        for (const name of await this.#exports.list()) this.#send(encodeOptionReply(option, C.NBD_REP_SERVER, encodeRepServer(name)));
        this.#send(encodeOptionReply(option, C.NBD_REP_ACK));
        return;
      }
      case C.NBD_OPT_STRUCTURED_REPLY:
        if (data.length !== 0) return this.#optionInvalid(option, 'NBD_OPT_STRUCTURED_REPLY takes no data');
        this.#structured = true;
        this.#send(encodeOptionReply(option, C.NBD_REP_ACK));
        return;
      case C.NBD_OPT_LIST_META_CONTEXT:
      case C.NBD_OPT_SET_META_CONTEXT:
        await this.#metaContext(option, data);
        return;
      case C.NBD_OPT_INFO:
      case C.NBD_OPT_GO:
        await this.#infoOrGo(option, data);
        return;
      default:
        this.#send(encodeOptionError(option, C.NBD_REP_ERR_UNSUP, `option ${option} is not supported`));
    }
  }

  /**
   * NBD_OPT_STARTTLS: acknowledge in plaintext, then hand the socket to TLS in the same turn,
   * and resolve once the handshake is done (so no option is decoded before it is).
   */
  async #startTls(m: OptionMessage): Promise<void> {
    const option = C.NBD_OPT_STARTTLS;
    const config = this.#tls;
    if (config === undefined) {
      this.#send(encodeOptionError(option, C.NBD_REP_ERR_POLICY, 'TLS is not enabled on this server'));
      return;
    }
    if (this.#tlsStarted) return this.#optionInvalid(option, 'TLS is already started');
    if (m.tooBig || m.data.length !== 0) return this.#optionInvalid(option, 'NBD_OPT_STARTTLS takes no data');
    // Bytes after STARTTLS were sent before our ACK: plaintext that could pose as TLS-protected.
    if (this.#decoder.bufferedBytes !== 0) throw new BdsnapError('EPROTO', 'the client sent data after NBD_OPT_STARTTLS before its reply');
    this.#send(encodeOptionReply(option, C.NBD_REP_ACK));
    const plain = this.#socket;
    plain.off('data', this.#onData);
    plain.off('drain', this.#onDrain);
    plain.off('end', this.#onEnd);
    // 'error' and 'close' stay: the plain socket ends with the TLS one, and teardown runs once.
    let secure: tls.TLSSocket;
    try {
      secure = config.wrap(plain, this.#highWaterMarkBytes);
    } catch (err) {
      throw new BdsnapError('EPROTO', `cannot start TLS: ${toBdsnapError(err).message}`, { cause: err });
    }
    this.#tlsStarted = true;
    this.#socket = secure;
    this.#paused = false;
    this.#writeBlocked = false;
    this.#listen(secure, true);
    await new Promise<void>((resolve) => {
      const done = (): void => {
        secure.off('secure', onSecure);
        secure.off('close', done);
        resolve();
      };
      const onSecure = (): void => {
        this.#log?.({ event: 'tls-established', connection: this.id, protocol: secure.getProtocol(), cipher: secure.getCipher().name });
        done();
      };
      // A failed handshake or an unverified peer closes the socket: teardown ends the connection.
      secure.once('secure', onSecure);
      secure.once('close', done);
    });
  }

  #optionInvalid(option: number, message: string): void {
    this.#send(encodeOptionError(option, C.NBD_REP_ERR_INVALID, message));
  }

  async #exportName(name: string): Promise<void> {
    let handle: ExportHandle | undefined;
    try {
      handle = await this.#exports.open(name, 'go');
    } catch (err) {
      throw new BdsnapError('ENOENT', `export "${name}" refused: ${toBdsnapError(err).message}`, { cause: err });
    }
    if (!handle) throw new BdsnapError('ENOENT', `unknown export "${name}"`);
    if (await this.#releaseIfGone(handle)) return;
    this.#enterTransmission(handle, name);
    this.#send(encodeExportNameReply(this.#sizeBytes, this.#transmissionFlags(handle.device), this.#noZeroes));
  }

  /**
   * LIST_META_CONTEXT and SET_META_CONTEXT. An export offers base:allocation and the contexts
   * of its handle. LIST: no query lists everything; a query is an exact name or, when it ends
   * with a colon, a prefix ('base:', 'qemu:', 'qemu:dirty-bitmap:'). SET: exact names only
   * (a prefix selects nothing, as the spec asks); each selected context gets its own id.
   */
  async #metaContext(option: number, data: Buffer): Promise<void> {
    const setting = option === C.NBD_OPT_SET_META_CONTEXT;
    // SET replaces the previous selection even when it fails.
    if (setting) {
      this.#metaContextExport = undefined;
      this.#selectedContexts = [];
    }
    if (!this.#structured) return this.#optionInvalid(option, 'negotiate structured replies first');
    const parsed = parseMetaContextData(data);
    if (typeof parsed === 'string') return this.#optionInvalid(option, parsed);
    const { exportName, queries } = parsed;
    const offered = await this.#offeredContexts(exportName, queries);
    let names: string[];
    if (setting) {
      const wanted = new Set(queries);
      names = offered.filter((name) => wanted.has(name));
      if (names.length > C.MAX_SELECTED_META_CONTEXTS) {
        this.#send(encodeOptionError(option, C.NBD_REP_ERR_TOO_BIG, `at most ${C.MAX_SELECTED_META_CONTEXTS} metadata contexts can be selected`));
        return;
      }
      let nextId = BASE_ALLOCATION_ID + 1;
      this.#selectedContexts = names.map((name) => ({ id: name === C.BASE_ALLOCATION ? BASE_ALLOCATION_ID : nextId++, name }));
      this.#metaContextExport = exportName;
      for (const c of this.#selectedContexts) this.#send(encodeOptionReply(option, C.NBD_REP_META_CONTEXT, encodeRepMetaContext(c.id, c.name)));
    } else {
      names = queries.length === 0 ? offered : offered.filter((name) => queries.some((q) => contextMatches(q, name)));
      // The id in a LIST reply is reserved: zero.
      for (const name of names) this.#send(encodeOptionReply(option, C.NBD_REP_META_CONTEXT, encodeRepMetaContext(0, name)));
    }
    this.#send(encodeOptionReply(option, C.NBD_REP_ACK));
  }

  /**
   * Names of the contexts `exportName` offers. The export is opened (for 'info') only when a
   * query can concern more than base:allocation; an unknown or refused export offers only
   * base:allocation here, and NBD_OPT_GO then says what is wrong with it.
   */
  async #offeredContexts(exportName: string, queries: string[]): Promise<string[]> {
    const names = [C.BASE_ALLOCATION];
    if (queries.length > 0 && queries.every((q) => q.startsWith('base:'))) return names;
    let handle: ExportHandle | undefined;
    try {
      handle = await this.#exports.open(exportName, 'info');
    } catch {
      return names;
    }
    if (!handle) return names;
    try {
      for (const source of handle.metaContexts ?? []) {
        if (source.name !== C.BASE_ALLOCATION && !names.includes(source.name)) names.push(source.name);
      }
    } finally {
      await handle.release();
    }
    return names;
  }

  async #infoOrGo(option: number, data: Buffer): Promise<void> {
    const parsed = parseInfoRequest(data);
    if (typeof parsed === 'string') return this.#optionInvalid(option, parsed);
    const { name, infos } = parsed;

    let handle: ExportHandle | undefined;
    try {
      handle = await this.#exports.open(name, option === C.NBD_OPT_GO ? 'go' : 'info');
    } catch (err) {
      const e = toBdsnapError(err);
      const type = e.code === 'ENOENT' ? C.NBD_REP_ERR_UNKNOWN : C.NBD_REP_ERR_POLICY;
      this.#send(encodeOptionError(option, type, e.message));
      return;
    }
    if (!handle) {
      this.#send(encodeOptionError(option, C.NBD_REP_ERR_UNKNOWN, `unknown export "${name}"`));
      return;
    }
    const device = handle.device;
    const sizes = device.blockSizes;
    this.#send(encodeOptionReply(option, C.NBD_REP_INFO, encodeInfoExport(device.size, this.#transmissionFlags(device))));
    if (infos.has(C.NBD_INFO_NAME)) this.#send(encodeOptionReply(option, C.NBD_REP_INFO, encodeInfoName(handle.name)));
    if (infos.has(C.NBD_INFO_DESCRIPTION) && handle.description !== undefined) {
      this.#send(encodeOptionReply(option, C.NBD_REP_INFO, encodeInfoDescription(handle.description)));
    }
    // Sent even unrequested: clients ignore what they did not ask for, and those that
    // obey it avoid requests we would refuse.
    this.#send(encodeOptionReply(option, C.NBD_REP_INFO,
      encodeInfoBlockSize(sizes.minimum, sizes.preferred, Math.min(sizes.maximum, C.MAX_PAYLOAD_BYTES))));
    this.#send(encodeOptionReply(option, C.NBD_REP_ACK));
    if (option === C.NBD_OPT_INFO) {
      await handle.release();
      return;
    }
    if (await this.#releaseIfGone(handle)) return;
    this.#enterTransmission(handle, name);
  }

  /** The connection ended while the export was being opened: give the handle back at once. */
  async #releaseIfGone(handle: ExportHandle): Promise<boolean> {
    if (this.#state === 'handshake') return false;
    await handle.release();
    return true;
  }

  #transmissionFlags(device: BlockDevice): number {
    let flags = C.NBD_FLAG_HAS_FLAGS | C.NBD_FLAG_SEND_FLUSH | C.NBD_FLAG_SEND_FUA | C.NBD_FLAG_SEND_TRIM
      | C.NBD_FLAG_SEND_WRITE_ZEROES | C.NBD_FLAG_SEND_FAST_ZERO | C.NBD_FLAG_SEND_CACHE;
    if (this.#structured) flags |= C.NBD_FLAG_SEND_DF;
    if (device.readOnly) flags |= C.NBD_FLAG_READ_ONLY;
    if (device.canMultiConn) flags |= C.NBD_FLAG_CAN_MULTI_CONN;
    return flags;
  }

  #enterTransmission(handle: ExportHandle, requestedName: string): void {
    clearTimeout(this.#handshakeTimer);
    this.#handshakeTimer = undefined;
    this.#handle = handle;
    this.#device = handle.device;
    this.#sizeBytes = handle.device.size;
    this.#minimumBlockBytes = Math.max(1, handle.device.blockSizes.minimum);
    this.#maximumPayloadBytes = Math.min(handle.device.blockSizes.maximum, C.MAX_PAYLOAD_BYTES);
    const selected = this.#structured && this.#metaContextExport === requestedName ? this.#selectedContexts : [];
    this.#activeContexts = selected.map((c) => ({
      id: c.id,
      name: c.name,
      // A context that vanished between SET and GO keeps its id and answers EIO.
      source: c.name === C.BASE_ALLOCATION ? 'base' : handle.metaContexts?.find((m) => m.name === c.name),
    }));
    this.#decoder.setPhase('transmission');
    this.#state = 'transmission';
    this.#log?.({ event: 'export-opened', connection: this.id, export: handle.name, structured: this.#structured });
    this.#onTransmission?.(this.id);
  }

  // ---- requests ----

  #handleRequest(r: RequestMessage): void {
    if (r.type === C.NBD_CMD_DISC) {
      this.#finish();
      return;
    }
    const bytes = this.#admittedBytes;
    this.#admittedBytes = 0;
    this.#inFlightCount++;
    // Every request ends in exactly one reply, which carries its charge until the socket took it.
    const refusal = this.#validate(r);
    if (refusal) {
      this.#replyError(r, refusal.errno, refusal.message, bytes);
      this.#done(r);
      return;
    }
    this.#execute(r, bytes).then(
      () => this.#done(r),
      (err: unknown) => {
        const e = toBdsnapError(err);
        if (e.code === 'EIO') this.#log?.({ event: 'request-error', connection: this.id, type: r.type, code: e.code, error: e.message });
        this.#replyError(r, WIRE_ERRNO[e.code], e.message, bytes);
        this.#done(r);
      },
    );
  }

  #done(r: RequestMessage): void {
    // The device is done with the payload once its write has settled.
    if (r.payloadAllocated && r.payload) this.#pool.put(r.payload);
    this.#inFlightCount--;
    if (this.#inFlightCount === 0) {
      const waiters = this.#idleWaiters;
      this.#idleWaiters = [];
      for (const w of waiters) w();
    }
  }

  #validate(r: RequestMessage): Refusal | undefined {
    const { type, flags, offsetBytes, lengthBytes } = r;
    let allowed = C.NBD_CMD_FLAG_FUA;
    switch (type) {
      case C.NBD_CMD_READ:
        if (this.#structured) allowed |= C.NBD_CMD_FLAG_DF;
        break;
      case C.NBD_CMD_WRITE_ZEROES:
        allowed |= C.NBD_CMD_FLAG_NO_HOLE | C.NBD_CMD_FLAG_FAST_ZERO;
        break;
      case C.NBD_CMD_BLOCK_STATUS:
        allowed |= C.NBD_CMD_FLAG_REQ_ONE;
        break;
      case C.NBD_CMD_WRITE:
      case C.NBD_CMD_FLUSH:
      case C.NBD_CMD_TRIM:
      case C.NBD_CMD_CACHE:
        break;
      default:
        return { errno: C.NBD_EINVAL, message: `unknown command ${type}` };
    }
    if ((flags & ~allowed) !== 0) return { errno: C.NBD_EINVAL, message: `flags 0x${flags.toString(16)} are not valid for command ${type}` };
    if (type === C.NBD_CMD_FLUSH) {
      return offsetBytes === 0 && lengthBytes === 0 ? undefined : { errno: C.NBD_EINVAL, message: 'flush takes no offset or length' };
    }
    const writing = type === C.NBD_CMD_WRITE || type === C.NBD_CMD_TRIM || type === C.NBD_CMD_WRITE_ZEROES;
    if (writing && this.#device!.readOnly) return { errno: C.NBD_EPERM, message: 'the export is read-only' };
    if (r.payloadSkipped || ((type === C.NBD_CMD_READ || type === C.NBD_CMD_WRITE) && lengthBytes > this.#maximumPayloadBytes)) {
      return { errno: C.NBD_EINVAL, message: `length ${lengthBytes} exceeds the maximum payload of ${this.#maximumPayloadBytes} bytes` };
    }
    if (type === C.NBD_CMD_BLOCK_STATUS && this.#activeContexts.length === 0) {
      return { errno: C.NBD_EINVAL, message: 'no metadata context was selected for this export' };
    }
    const endBytes = offsetBytes + lengthBytes;
    if (endBytes > this.#sizeBytes) {
      const grows = type === C.NBD_CMD_WRITE || type === C.NBD_CMD_WRITE_ZEROES;
      return {
        errno: grows ? C.NBD_ENOSPC : C.NBD_EINVAL,
        message: `range ${offsetBytes}+${lengthBytes} is past the end of the export (${this.#sizeBytes} bytes)`,
      };
    }
    const min = this.#minimumBlockBytes;
    // The tail of an export whose size is not a multiple of the block size stays reachable.
    if (offsetBytes % min !== 0 || (lengthBytes % min !== 0 && endBytes !== this.#sizeBytes)) {
      return { errno: C.NBD_EINVAL, message: `range ${offsetBytes}+${lengthBytes} is not aligned to ${min} bytes` };
    }
    if (type === C.NBD_CMD_BLOCK_STATUS && lengthBytes === 0) return { errno: C.NBD_EINVAL, message: 'block status of an empty range' };
    return undefined;
  }

  /** `charge`: what the request was admitted with, for its reply to carry (not on a throw). */
  async #execute(r: RequestMessage, charge: number): Promise<void> {
    const device = this.#device!;
    const { type, flags, offsetBytes, lengthBytes, cookieHi, cookieLo } = r;
    const fua = (flags & C.NBD_CMD_FLAG_FUA) !== 0;
    switch (type) {
      case C.NBD_CMD_READ:
        return this.#read(device, r, charge);
      case C.NBD_CMD_WRITE:
        if (lengthBytes > 0) await device.write(r.payload!, offsetBytes, { fua });
        break;
      case C.NBD_CMD_FLUSH:
        await device.flush();
        // For the crash explorer: what was written before must be durable from here on.
        traceMark(FLUSH_ANSWERED_MARK);
        break;
      case C.NBD_CMD_TRIM:
        if (lengthBytes > 0) await device.trim(offsetBytes, lengthBytes, { fua });
        break;
      case C.NBD_CMD_WRITE_ZEROES: {
        const fastZero = (flags & C.NBD_CMD_FLAG_FAST_ZERO) !== 0;
        if (fastZero && !device.canFastZero) throw new BdsnapError('ENOTSUP', 'this export has no fast zero');
        if (lengthBytes > 0) await device.zero(offsetBytes, lengthBytes, { fua, fastZero, noHole: (flags & C.NBD_CMD_FLAG_NO_HOLE) !== 0 });
        break;
      }
      case C.NBD_CMD_CACHE:
        if (lengthBytes > 0) await device.cache(offsetBytes, lengthBytes);
        break;
      case C.NBD_CMD_BLOCK_STATUS:
        return this.#blockStatus(device, r, charge);
    }
    this.#send(encodeSimpleReply(0, cookieHi, cookieLo), false, charge);
  }

  async #read(device: BlockDevice, r: RequestMessage, charge: number): Promise<void> {
    const { offsetBytes, lengthBytes, cookieHi, cookieLo } = r;
    if (this.#structured && lengthBytes === 0) {
      this.#send(encodeStructuredNone(cookieHi, cookieLo), false, charge);
      return;
    }
    // The data is read straight after the header room of the reply buffer.
    const prefix = this.#structured ? OFFSET_DATA_PREFIX_BYTES : C.SIMPLE_REPLY_HEADER_BYTES;
    const buf = this.#pool.get(prefix + lengthBytes);
    try {
      if (lengthBytes > 0) await device.read(buf.subarray(prefix), offsetBytes);
    } catch (err) {
      this.#pool.put(buf);
      throw err;
    }
    if (!this.#structured) {
      writeSimpleReplyHeader(buf, 0, 0, cookieHi, cookieLo);
      this.#send(buf, true, charge);
      return;
    }
    if (isAllZero(buf, prefix)) {
      this.#pool.put(buf);
      this.#send(encodeOffsetHole(cookieHi, cookieLo, offsetBytes, lengthBytes), false, charge);
      return;
    }
    writeStructuredHeader(buf, 0, C.NBD_REPLY_FLAG_DONE, C.NBD_REPLY_TYPE_OFFSET_DATA, cookieHi, cookieLo, 8 + lengthBytes);
    writeU64(buf, C.STRUCTURED_REPLY_HEADER_BYTES, offsetBytes);
    this.#send(buf, true, charge);
  }

  /** One BLOCK_STATUS chunk per selected context, sent together once all are in hand. */
  async #blockStatus(device: BlockDevice, r: RequestMessage, charge: number): Promise<void> {
    const { offsetBytes, lengthBytes, cookieHi, cookieLo, flags } = r;
    const reqOne = (flags & C.NBD_CMD_FLAG_REQ_ONE) !== 0;
    const contextExtents = async (c: ActiveContext): Promise<Array<{ length: number; flags: number }>> => {
      if (c.source === undefined) throw new BdsnapError('EIO', `metadata context ${c.name} is no longer offered by this export`);
      if (c.source === 'base') {
        const extents = await device.extents(offsetBytes, lengthBytes);
        return clipExtents(extents, lengthBytes, reqOne, c.name,
          (f) => (f & EXTENT_HOLE ? C.NBD_STATE_HOLE : 0) | (f & EXTENT_ZERO ? C.NBD_STATE_ZERO : 0));
      }
      return clipExtents(await c.source.extents(offsetBytes, lengthBytes), lengthBytes, reqOne, c.name, (f) => f >>> 0);
    };
    const active = this.#activeContexts;
    // qemu asks with one context before nearly every read: no Promise.all for that case.
    const chunks = active.length === 1 ? [await contextExtents(active[0]!)] : await Promise.all(active.map(contextExtents));
    const last = chunks.length - 1;
    const replies = chunks.map((extents, i) =>
      encodeBlockStatus(cookieHi, cookieLo, active[i]!.id, extents, i === last ? C.NBD_REPLY_FLAG_DONE : 0));
    this.#send(replies.length === 1 ? replies[0]! : Buffer.concat(replies), false, charge);
  }

  #replyError(r: RequestMessage, errno: number, message: string, charge: number): void {
    // Structured replies let the message reach the user; READ must use them once negotiated.
    if (this.#structured) this.#send(encodeStructuredError(r.cookieHi, r.cookieLo, errno, message), false, charge);
    else this.#send(encodeSimpleReply(errno, r.cookieHi, r.cookieLo), false, charge);
  }
}
