/**
 * Incremental decoder of what an NBD client sends: its handshake flags, fixed-newstyle options,
 * then transmission requests. Pure: bytes in, messages out, no I/O.
 *
 * Order of checks for every frame: magic, then length against the maximum (before anything
 * is allocated), and only then the payload. A payload longer than the maximum is skipped
 * byte for byte without being stored and the message is flagged, so the server can refuse
 * it and the connection lives on. Bad magic is fatal: the stream cannot be resynchronised.
 *
 * A request goes no further than its header until the caller admits it (`admit`): nothing is
 * allocated for a WRITE payload, and nothing more is decoded, while the caller has no room for
 * it; next() asks again each time it is called.
 *
 * The phase is switched by the caller (the server knows when an option moved the connection
 * to transmission); messages are decoded one at a time by next(), so a caller that switches
 * phase between two calls never sees bytes decoded under the wrong phase.
 */

import { readU64BE } from '../bytes.js';
import { ByteQueue, NbdProtocolError, fillPartial, type PartialPayload } from './byte-queue.js';
import {
  IHAVEOPT_HI, IHAVEOPT_LO, MAX_OPTION_PAYLOAD_BYTES, MAX_PAYLOAD_BYTES, NBD_CMD_WRITE, NBD_REQUEST_MAGIC,
  OPTION_HEADER_BYTES, REQUEST_HEADER_BYTES,
} from './constants.js';

/**
 * A WRITE payload at least this long is read best on its own (see headerNext): copying it out
 * of a shared read buffer costs more than the read call that reading the header alone adds.
 */
const LARGE_PAYLOAD_BYTES = 128 * 1024;

export interface ClientFlagsMessage {
  kind: 'client-flags';
  flags: number;
}

export interface OptionMessage {
  kind: 'option';
  option: number;
  /** The option data; empty when `tooBig`. */
  data: Buffer;
  /** Declared length of the data. */
  lengthBytes: number;
  /** The data exceeded the option payload cap and was skipped. */
  tooBig: boolean;
}

export interface RequestMessage {
  kind: 'request';
  flags: number;
  type: number;
  /** The 64-bit cookie as two unsigned 32-bit halves, echoed as they came. */
  cookieHi: number;
  cookieLo: number;
  /** May exceed 2^53 (then imprecise, but certainly past the end of any device). */
  offsetBytes: number;
  lengthBytes: number;
  /** The WRITE payload; undefined for other commands and for a skipped payload. */
  payload: Buffer | undefined;
  /** A WRITE payload over the maximum was read and thrown away. */
  payloadSkipped: boolean;
  /** The payload came from `allocatePayload` (and may go back to its pool once used). */
  payloadAllocated: boolean;
}

export type ClientMessage = ClientFlagsMessage | OptionMessage | RequestMessage;

export type RequestDecoderPhase = 'client-flags' | 'options' | 'transmission';

export interface RequestDecoderOptions {
  maxOptionPayloadBytes?: number;
  maxWritePayloadBytes?: number;
  /** Where WRITE payloads that span chunks are allocated (a pool, say). */
  allocatePayload?: (sizeBytes: number) => Buffer;
  /**
   * Asked once per request header (and again on each next() until it says yes) before its
   * payload is taken; false holds the request back. Default: always admitted.
   */
  admit?: (request: RequestMessage) => boolean;
  /**
   * The caller reuses each chunk once next() has returned undefined (a socket reading into one
   * buffer): payloads are then always copied out, and detach() keeps the unread rest.
   */
  transientChunks?: boolean;
}


export class RequestDecoder {
  #queue = new ByteQueue();
  #phase: RequestDecoderPhase = 'client-flags';
  #partial: PartialPayload<RequestMessage | OptionMessage> | undefined;
  #skipBytes = 0;
  #skipped: ClientMessage | undefined;
  /** A request header waiting to be admitted. */
  #held: RequestMessage | undefined;
  #admit: (request: RequestMessage) => boolean;
  #maxOptionBytes: number;
  #maxWriteBytes: number;
  #allocate: (sizeBytes: number) => Buffer;
  #transient: boolean;
  /** The WRITE payload length of the last request header (0 for other commands). */
  #lastPayloadBytes = 0;

  constructor(options: RequestDecoderOptions = {}) {
    this.#allocate = options.allocatePayload ?? Buffer.allocUnsafe;
    this.#admit = options.admit ?? (() => true);
    this.#transient = options.transientChunks ?? false;
    this.#maxOptionBytes = options.maxOptionPayloadBytes ?? MAX_OPTION_PAYLOAD_BYTES;
    this.#maxWriteBytes = options.maxWritePayloadBytes ?? MAX_PAYLOAD_BYTES;
  }

  setPhase(phase: RequestDecoderPhase): void {
    this.#phase = phase;
  }

  /** Bytes received and not yet decoded. */
  get bufferedBytes(): number {
    return this.#queue.length;
  }

  append(chunk: Buffer): void {
    this.#queue.append(chunk);
  }

  /** Drop what was received and not decoded, a half-received payload with it: the connection has closed. */
  clear(): void {
    this.#queue = new ByteQueue();
    this.#partial = undefined;
    this.#held = undefined;
    this.#skipped = undefined;
    this.#skipBytes = 0;
  }

  /** With transient chunks: copy what is still unread before the chunk is reused (else a no-op). */
  detach(): void {
    if (this.#transient) this.#queue.detach();
  }

  /**
   * Where the next received bytes may go directly: the unfilled rest of a WRITE payload being
   * received (nothing is queued then: filling the payload took all of it). Undefined otherwise,
   * and once the payload is full but not yet taken by next(): a socket handed an empty buffer
   * fails its read, or (TLS) never gets past it.
   * A socket that reads into it calls placed() with the count, and saves copying the payload
   * out of its read buffer.
   */
  payloadTarget(): Buffer | undefined {
    const p = this.#partial;
    if (p === undefined || p.message.kind !== 'request' || this.#queue.length > 0 || p.filledBytes === p.buffer.length) return undefined;
    return p.buffer.subarray(p.filledBytes);
  }

  /**
   * Whether the next read should take one request header and no more: nothing is buffered or
   * half-received, and the last request carried a large WRITE payload, so the next one likely
   * does too. A header read into a large buffer brings most of its payload with it, to be
   * copied out; read alone, the payload after it goes straight into its buffer (payloadTarget).
   */
  headerNext(): boolean {
    return this.#lastPayloadBytes >= LARGE_PAYLOAD_BYTES && this.#phase === 'transmission' && this.#queue.length === 0
      && this.#partial === undefined && this.#skipBytes === 0 && this.#held === undefined;
  }

  /** `n` bytes were received straight into the last payloadTarget(). */
  placed(n: number): void {
    const p = this.#partial;
    if (p === undefined || this.#queue.length > 0 || !(n >= 0 && n <= p.buffer.length - p.filledBytes)) {
      throw new Error(`placed(${n}) does not fit the payload being received`);
    }
    p.filledBytes += n;
  }

  /** Append `chunk` and decode every complete message. */
  push(chunk: Buffer): ClientMessage[] {
    this.append(chunk);
    const out: ClientMessage[] = [];
    for (let m = this.next(); m; m = this.next()) out.push(m);
    return out;
  }

  /** The next complete message, or undefined when more bytes are needed. Throws NbdProtocolError. */
  next(): ClientMessage | undefined {
    const q = this.#queue;
    const held = this.#held;
    if (held) {
      if (!this.#admit(held)) return undefined;
      this.#held = undefined;
      return this.#takePayload(held);
    }
    if (this.#skipBytes > 0) {
      const n = Math.min(this.#skipBytes, q.length);
      q.skip(n);
      this.#skipBytes -= n;
      if (this.#skipBytes > 0) return undefined;
      const m = this.#skipped!;
      this.#skipped = undefined;
      return m;
    }
    if (this.#partial) {
      if (!fillPartial(q, this.#partial)) return undefined;
      const { message, buffer } = this.#partial;
      this.#partial = undefined;
      if (message.kind === 'request') message.payload = buffer;
      else message.data = buffer;
      return message;
    }
    switch (this.#phase) {
      case 'client-flags': {
        if (q.length < 4) return undefined;
        const at = q.view(4);
        const flags = q.viewBuffer.readUInt32BE(at);
        q.skip(4);
        this.#phase = 'options';
        return { kind: 'client-flags', flags };
      }
      case 'options':
        return this.#nextOption();
      case 'transmission':
        return this.#nextRequest();
    }
  }

  #nextOption(): OptionMessage | undefined {
    const q = this.#queue;
    if (q.length < OPTION_HEADER_BYTES) return undefined;
    const at = q.view(OPTION_HEADER_BYTES);
    const b = q.viewBuffer;
    if (b.readUInt32BE(at) !== IHAVEOPT_HI || b.readUInt32BE(at + 4) !== IHAVEOPT_LO) {
      throw new NbdProtocolError('bad option magic (expected IHAVEOPT)', q.position);
    }
    const option = b.readUInt32BE(at + 8);
    const lengthBytes = b.readUInt32BE(at + 12);
    q.skip(OPTION_HEADER_BYTES);
    const message: OptionMessage = { kind: 'option', option, data: EMPTY, lengthBytes, tooBig: false };
    if (lengthBytes > this.#maxOptionBytes) {
      message.tooBig = true;
      return this.#startSkip(message, lengthBytes) as OptionMessage | undefined;
    }
    return this.#startPayload(message, lengthBytes) as OptionMessage | undefined;
  }

  #nextRequest(): RequestMessage | undefined {
    const q = this.#queue;
    if (q.length < REQUEST_HEADER_BYTES) return undefined;
    const at = q.view(REQUEST_HEADER_BYTES);
    const b = q.viewBuffer;
    if (b.readUInt32BE(at) !== NBD_REQUEST_MAGIC) {
      throw new NbdProtocolError(`bad request magic 0x${b.readUInt32BE(at).toString(16)}`, q.position);
    }
    const message: RequestMessage = {
      kind: 'request',
      flags: b.readUInt16BE(at + 4),
      type: b.readUInt16BE(at + 6),
      cookieHi: b.readUInt32BE(at + 8),
      cookieLo: b.readUInt32BE(at + 12),
      offsetBytes: readU64BE(b, at + 16),
      lengthBytes: b.readUInt32BE(at + 24),
      payload: undefined,
      payloadSkipped: false,
      payloadAllocated: false,
    };
    q.skip(REQUEST_HEADER_BYTES);
    if (message.type === NBD_CMD_WRITE && message.lengthBytes > this.#maxWriteBytes) message.payloadSkipped = true;
    this.#lastPayloadBytes = message.type === NBD_CMD_WRITE && !message.payloadSkipped ? message.lengthBytes : 0;
    if (!this.#admit(message)) {
      this.#held = message;
      return undefined;
    }
    return this.#takePayload(message);
  }

  /** An admitted request: its WRITE payload is stored (or skipped, when over the maximum). */
  #takePayload(message: RequestMessage): RequestMessage | undefined {
    if (message.type !== NBD_CMD_WRITE) return message;
    if (message.payloadSkipped) return this.#startSkip(message, message.lengthBytes) as RequestMessage | undefined;
    return this.#startPayload(message, message.lengthBytes) as RequestMessage | undefined;
  }

  #startSkip(message: ClientMessage, n: number): ClientMessage | undefined {
    this.#skipBytes = n;
    this.#skipped = message;
    return this.next();
  }

  #startPayload(message: RequestMessage | OptionMessage, n: number): ClientMessage | undefined {
    const q = this.#queue;
    if (q.length >= n) {
      if (message.kind === 'request') {
        const copy = this.#transient || !q.contiguous(n);
        message.payload = q.take(n, copy, this.#allocate);
        message.payloadAllocated = copy;
      } else {
        message.data = q.take(n, this.#transient);
      }
      return message;
    }
    // The length was checked against the cap above, so this allocation is bounded.
    let buffer: Buffer;
    if (message.kind === 'request') {
      buffer = this.#allocate(n);
      message.payloadAllocated = true;
    } else {
      buffer = Buffer.allocUnsafe(n);
    }
    this.#partial = { message, buffer, filledBytes: 0 };
    return this.next();
  }
}

const EMPTY = Buffer.alloc(0);
