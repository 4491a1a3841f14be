/**
 * One NBD client connection on the server side: the socket, reading and writing frames, the
 * budget, deadlines and the connection's lifetime. What the options and the requests mean is
 * elsewhere: option haggling in option-haggling.ts, the requests against the export in
 * transmission-requests.ts; this class ties them to the socket.
 *
 * Invariants:
 * - Options are handled one at a time (the client must wait for each final reply anyway);
 *   decoding stops while an option is in progress, so a phase switch never races the decoder.
 * - Requests run concurrently and each reply is written as soon as it is complete (out of
 *   order); header and data always leave in one buffer, and replies finishing in the same
 *   event-loop turn, or answered while decoding what one read brought, are corked into one
 *   writev.
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
 *   option is read over TLS before the handshake is complete and the peer verified.
 * - READ reply buffers and WRITE payload buffers come from a pool and return to it when the
 *   socket (or the device's write) is done with them: a device must not keep a reference to
 *   the data of a write after that write has settled.
 */

import type net from 'node:net';
import type tls from 'node:tls';
import type { NbdTls } from './tls.js';
import { WIRE_ERRNO, toBdsnapError, BdsnapError } from '../errors.js';
import type { ExportHandle, ExportProvider } from './exports.js';
import type { BufferPool } from '../device/buffer-pool.js';
import type { InFlightBudget } from './in-flight-budget.js';
import { RequestDecoder, type ClientMessage, type RequestMessage } from './request-decoder.js';
import * as C from './constants.js';
import { encodeGreeting, encodeOptionReply } from './encoders.js';
import { OptionHaggling } from './option-haggling.js';
import { TransmissionRequests, type ActiveContext } from './transmission-requests.js';
import { adoptWithReadBuffer, readTlsInto, READ_BUFFER_BYTES, type ReadSink } from './adopted-socket.js';
import type { LogFn } from './exports.js';
import { loadLibc, type Libc } from '../host/libc.js';

/** How long a client may keep its side open after we closed ours. */
const END_TIMEOUT_MS = 5000;
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

export class ServerConnection {
  readonly id: number;
  #socket: net.Socket;
  #log: LogFn | undefined;
  #maxInFlightBytes: number;
  #pool: BufferPool;
  #budget: InFlightBudget;
  #sendStallTimeoutMs: number;
  #decoder: RequestDecoder;
  #state: State = 'handshake';
  #highWaterMarkBytes: number;
  #onTransmission: ((id: number) => void) | undefined;
  #options: OptionHaggling;
  #handle: ExportHandle | undefined;
  /** The export being served, from the end of the handshake. */
  #requests: TransmissionRequests | undefined;
  /** The buffer the caller reads the socket into (see the constructor), kept for TLS to read into too. */
  #readBuffer: Buffer | undefined;
  /** The start of `#readBuffer`, one request header long (see RequestDecoder.headerNext). */
  #headerBuffer: Buffer | undefined;
  /** readTarget() gave `#headerBuffer`: what is placed next is bytes to decode, not payload. */
  #headerTarget = false;

  #optionBusy = false;
  #eof = false;
  #pumping = false;
  #paused = false;
  #writeBlocked = false;
  #corked = false;
  /** The socket was corked by a reply sent while decoding: #pump uncorks it when it stops. */
  #pumpCorked = false;
  #inFlightCount = 0;
  /** The socket's descriptor and the libc to ask it how much waits unread (#queuedBehind), where both are known. */
  #socketFd: number | undefined;
  #libc: Libc | undefined;
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
   * `readBuffer`: the caller feeds received bytes through receive() from this reused buffer
   * (socket `onread`, see readSink), and so will TLS after STARTTLS where it can; otherwise the
   * socket's 'data' events are used.
   */
  constructor(id: number, socket: net.Socket, context: ConnectionContext, readBuffer?: Buffer, tls?: NbdTls) {
    this.id = id;
    const pool = context.pool;
    this.#pool = pool;
    this.#budget = context.budget;
    this.#decoder = new RequestDecoder({ allocatePayload: (n) => pool.get(n), transientChunks: readBuffer !== undefined, admit: (r) => this.#admit(r) });
    this.#socket = socket;
    this.#socketFd = (socket as { _handle?: { fd?: unknown } | null })._handle?.fd as number | undefined;
    if (typeof this.#socketFd !== 'number' || this.#socketFd < 0) this.#socketFd = undefined;
    this.#libc = this.#socketFd === undefined ? undefined : loadLibc();
    this.#readBuffer = readBuffer;
    this.#headerBuffer = readBuffer?.subarray(0, C.REQUEST_HEADER_BYTES);
    this.#highWaterMarkBytes = context.socketHighWaterMarkBytes;
    this.#options = new OptionHaggling({
      send: (buf) => this.#send(buf),
      finish: () => this.#finish(),
      startTls: (config) => this.#startTls(config),
      handshaking: () => this.#state === 'handshake',
      enterTransmission: (handle, structured, activeContexts) => this.#enterTransmission(handle, structured, activeContexts),
    }, context.exports, tls);
    this.#maxInFlightBytes = context.maxInFlightBytes;
    this.#sendStallTimeoutMs = context.sendStallTimeoutMs;
    this.#log = context.log;
    this.#onTransmission = context.onTransmission;
    this.#closedPromise = new Promise((resolve) => (this.#resolveClosed = resolve));
    this.#handshakeTimer = setTimeout(() => this.#handshakeExpired(context.handshakeTimeoutMs), context.handshakeTimeoutMs);
    this.#handshakeTimer.unref();

    this.#listen(socket, readBuffer === undefined);
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

  /** Bytes from the client. With a `readBuffer`, `chunk` is reused after this returns. */
  receive(chunk: Buffer): void {
    // After we decided to close, what the client still sends is dropped unread.
    if (this.#state !== 'handshake' && this.#state !== 'transmission') return;
    this.#decoder.append(chunk);
    this.#pump();
    this.#decoder.detach();
  }

  /**
   * Where the socket may read next instead of its whole shared buffer: the rest of a WRITE
   * payload being received (see RequestDecoder.payloadTarget), the start of the shared buffer
   * when one request header should be read alone (RequestDecoder.headerNext), or undefined.
   */
  readTarget(): Buffer | undefined {
    this.#headerTarget = false;
    if (this.#state !== 'handshake' && this.#state !== 'transmission') return undefined;
    const payload = this.#decoder.payloadTarget();
    this.#headerTarget = payload === undefined && this.#headerBuffer !== undefined && this.#decoder.headerNext();
    return payload ?? (this.#headerTarget ? this.#headerBuffer : undefined);
  }

  /** `n` bytes were read straight into the last readTarget(). */
  receivePlaced(n: number): void {
    if (this.#state !== 'handshake' && this.#state !== 'transmission') return;
    if (this.#headerTarget) {
      this.#headerTarget = false;
      this.receive(this.#headerBuffer!.subarray(0, n));
      return;
    }
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
        await this.#requests?.device.flush();
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
      if (this.#pumpCorked) {
        this.#pumpCorked = false;
        this.#uncork();
      }
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
    const maximumPayloadBytes = this.#requests?.maximumPayloadBytes ?? C.MAX_PAYLOAD_BYTES;
    if (r.type === C.NBD_CMD_READ && r.lengthBytes <= maximumPayloadBytes) return REQUEST_OVERHEAD_BYTES + r.lengthBytes;
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
        try {
          this.#options.clientFlags(m.flags);
        } catch (err) {
          this.#fatal(err);
        }
        return;
      case 'option':
        this.#optionBusy = true;
        this.#options.handle(m).then(
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
    // A closed connection may be kept a while (see connectionOn): not what it half received,
    // nor the export it served (a session's whole state). Its replies' buffers went back to the
    // pool as the socket took or dropped each (#written).
    this.#decoder.clear();
    this.#handle = undefined;
    this.#requests = undefined;
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
    if (!this.#corked && this.#pumping && this.#decoder.bufferedBytes > 0) {
      // Answered while decoding, with more requests received behind it: their replies leave
      // together once the decoding stops (see #pump).
      this.#corked = true;
      this.#pumpCorked = true;
      s.cork();
    } else if (!this.#corked && this.#inFlightCount > 1) {
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


  // ---- the handshake's side of the connection ----

  /**
   * NBD_OPT_STARTTLS, once option haggling accepted it: acknowledge in plaintext, then hand the
   * socket to TLS in the same turn. Throws (before the ACK) if the client sent data after
   * STARTTLS, or if TLS cannot start; otherwise returns a promise that settles once the TLS
   * handshake is over, so no option is decoded before it is.
   */
  #startTls(config: NbdTls): Promise<void> {
    // Bytes after STARTTLS were sent before our ACK: plaintext that could pose as TLS-protected.
    if (this.#decoder.bufferedBytes !== 0) throw new BdsnapError('EPROTO', 'the client sent data after NBD_OPT_STARTTLS before its reply');
    this.#send(encodeOptionReply(C.NBD_OPT_STARTTLS, C.NBD_REP_ACK));
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
    this.#socket = secure;
    this.#paused = false;
    this.#writeBlocked = false;
    // Decrypted bytes go where plaintext ones went: into the read buffer or the WRITE payload.
    const readBuffer = this.#readBuffer;
    const ownReads = readBuffer !== undefined && readTlsInto(secure, readBuffer, readSink(readBuffer, () => this));
    this.#listen(secure, !ownReads);
    if (ownReads) secure.resume();
    return new Promise<void>((resolve) => {
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

  #enterTransmission(handle: ExportHandle, structured: boolean, activeContexts: ActiveContext[]): void {
    clearTimeout(this.#handshakeTimer);
    this.#handshakeTimer = undefined;
    this.#handle = handle;
    this.#requests = new TransmissionRequests(handle.device, structured, activeContexts, this.#pool,
      (buf, pooled, charge) => this.#send(buf, pooled, charge), () => this.#queuedBehind());
    this.#decoder.setPhase('transmission');
    this.#state = 'transmission';
    this.#log?.({ event: 'export-opened', connection: this.id, export: handle.name, structured });
    this.#onTransmission?.(this.id);
  }

  // ---- requests ----

  #handleRequest(r: RequestMessage): void {
    if (r.type === C.NBD_CMD_DISC) {
      this.#finish();
      return;
    }
    const requests = this.#requests!;
    const bytes = this.#admittedBytes;
    this.#admittedBytes = 0;
    this.#inFlightCount++;
    // Every request ends in exactly one reply, which carries its charge until the socket took it.
    const refusal = requests.validate(r);
    if (refusal) {
      requests.replyError(r, refusal.errno, refusal.message, bytes);
      this.#done(r);
      return;
    }
    let answered: boolean;
    try {
      answered = requests.executeNow(r, bytes);
    } catch (err) {
      this.#failed(requests, r, bytes, err);
      return;
    }
    if (answered) {
      this.#done(r);
      return;
    }
    requests.execute(r, bytes).then(
      () => this.#done(r),
      (err: unknown) => this.#failed(requests, r, bytes, err),
    );
  }

  /**
   * Whether the client has more requests waiting behind the one being run: others in flight,
   * bytes received and not yet decoded, or bytes in the socket not yet read (FIONREAD). A
   * client at depth one has none: it waits for each reply before it sends again. Asked by the
   * device (WriteOptions.queued), and only where the answer matters: a large write on a
   * server with one connection.
   */
  #queuedBehind(): boolean {
    if (this.#inFlightCount > 1 || this.#decoder.bufferedBytes > 0) return true;
    return this.#socketFd !== undefined && (this.#libc?.pendingBytes(this.#socketFd) ?? 0) > 0;
  }

  /** `r` failed with `err`: answer it with the error, its charge carried by the reply. */
  #failed(requests: TransmissionRequests, r: RequestMessage, bytes: number, err: unknown): void {
    const e = toBdsnapError(err);
    if (e.code === 'EIO') this.#log?.({ event: 'request-error', connection: this.id, type: r.type, code: e.code, error: e.message });
    requests.replyError(r, WIRE_ERRNO[e.code], e.message, bytes);
    this.#done(r);
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
}

/**
 * A connection on an accepted socket: read into one reused buffer where the socket can be
 * adopted that way (`reader` then set, and the socket is its), else through the socket's own
 * stream, left paused for the caller to resume.
 */
export function connectionOn(
  id: number, socket: net.Socket, context: ConnectionContext, tls?: NbdTls,
): { connection: ServerConnection; reader: net.Socket | undefined } {
  const readBuffer = Buffer.allocUnsafeSlow(READ_BUFFER_BYTES);
  // The reads name the connection, which needs the reader first.
  const made: { connection?: ServerConnection } = {};
  const reader = adoptWithReadBuffer(socket, readBuffer, readSink(readBuffer, () => made.connection));
  const connection = reader ? new ServerConnection(id, reader, context, readBuffer, tls) : new ServerConnection(id, socket, context, undefined, tls);
  made.connection = connection;
  void connection.closed.then(() => (kept.lastClosed = { connection, socket }));
  return { connection, reader };
}

/**
 * The last connection of this thread to close (with its sockets), kept until the next one
 * closes. V8's compiled code for the request path checks the shapes (maps) of a connection's
 * objects, and a full collection drops shapes no live object has, throwing away every piece of
 * code that checks them: without this, a thread whose clients had all gone (and whose idle
 * collection then ran, see connection-threads.ts, or V8's memory reducer) served its next
 * client as cold as a new thread. Measured on one `bdsnap serve`, 1 GiB fio passes 10 s apart:
 * 7-9 functions dropped per pause instead of 20-26 (`--trace-deopt`), and a pass after a pause
 * took 380 ms of the server's CPU instead of 465 (medians of eight, in turns with the code
 * before). Costs one closed connection per thread (mostly its read buffer, READ_BUFFER_BYTES).
 */
const kept: { lastClosed?: unknown } = {};

/** Where a socket reading into `readBuffer` (or the payload being received) hands what it read. */
function readSink(readBuffer: Buffer, connection: () => ServerConnection | undefined): ReadSink {
  return {
    target: () => connection()?.readTarget(),
    received: (n) => connection()?.receive(readBuffer.subarray(0, n)),
    placed: (n) => connection()?.receivePlaced(n),
  };
}
