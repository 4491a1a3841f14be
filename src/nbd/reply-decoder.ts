/**
 * Incremental decoder of what an NBD server sends: the greeting, option replies, the reply to
 * NBD_OPT_EXPORT_NAME, then simple replies and structured reply chunks. Pure, like
 * RequestDecoder: magic first, then lengths against the maximum before allocating.
 *
 * A simple reply does not say whether data follows; only the client knows which cookies are
 * READs awaiting data, so the decoder asks through `simpleReplyDataBytes`.
 */

import { readU64BE } from '../bytes.js';
import { ByteQueue, NbdProtocolError, fillPartial, type PartialPayload } from './byte-queue.js';
import {
  IHAVEOPT_HI, IHAVEOPT_LO, MAX_OPTION_PAYLOAD_BYTES, MAX_PAYLOAD_BYTES, NBDMAGIC_HI, NBDMAGIC_LO, NBD_REP_MAGIC_HI,
  NBD_REP_MAGIC_LO, NBD_REPLY_TYPE_OFFSET_DATA, NBD_SIMPLE_REPLY_MAGIC, NBD_STRUCTURED_REPLY_MAGIC, OPTION_REPLY_HEADER_BYTES,
  SIMPLE_REPLY_HEADER_BYTES, STRUCTURED_REPLY_HEADER_BYTES,
} from './constants.js';

export interface GreetingMessage {
  kind: 'greeting';
  handshakeFlags: number;
}

export interface OptionReplyMessage {
  kind: 'option-reply';
  option: number;
  type: number;
  data: Buffer;
}

export interface ExportInfoMessage {
  kind: 'export-info';
  sizeBytes: number;
  transmissionFlags: number;
}

export interface SimpleReplyMessage {
  kind: 'simple-reply';
  errno: number;
  cookieHi: number;
  cookieLo: number;
  /** READ data (present only for a successful READ). */
  data: Buffer | undefined;
}

export interface StructuredReplyMessage {
  kind: 'structured-reply';
  flags: number;
  type: number;
  cookieHi: number;
  cookieLo: number;
  payload: Buffer;
  /**
   * Set for an OFFSET_DATA chunk whose data went straight into the buffer `dataTarget` gave:
   * `payload` then holds the 8-byte offset only, and this many data bytes were placed.
   */
  placedBytes?: number;
}

export type ServerMessage = GreetingMessage | OptionReplyMessage | ExportInfoMessage | SimpleReplyMessage | StructuredReplyMessage;

export type ReplyDecoderPhase = 'greeting' | 'options' | 'export-name' | 'transmission';

export interface ReplyDecoderOptions {
  /** Length of the data following a successful simple reply with this cookie (0 if none). */
  simpleReplyDataBytes?: (cookieHi: number, cookieLo: number) => number;
  maxOptionReplyBytes?: number;
  /** Largest structured chunk payload (data plus its fixed fields). */
  maxChunkPayloadBytes?: number;
  /**
   * Where the data of a read reply should land: the data of a simple reply (`offsetBytes`
   * undefined) or of an OFFSET_DATA chunk at `offsetBytes`, `lengthBytes` long. A buffer of
   * exactly that length, or undefined to get the data in a buffer of the decoder's own (then
   * the receiver checks the chunk as usual). Saves a copy and an allocation per read.
   */
  dataTarget?: (cookieHi: number, cookieLo: number, offsetBytes: number | undefined, lengthBytes: number) => Buffer | undefined;
  /**
   * The appended chunks are reused by the receiver (a socket reading into one buffer): every
   * payload is copied out, and detach() copies what is unread before the next chunk comes.
   */
  transientChunks?: boolean;
}

/** The offset field that starts an OFFSET_DATA chunk. */
const OFFSET_BYTES = 8;
const EXPORT_NAME_REPLY_BYTES = 10;
const EXPORT_NAME_ZEROES = 124;

export class ReplyDecoder {
  #queue = new ByteQueue();
  #phase: ReplyDecoderPhase = 'greeting';
  #noZeroes = false;
  /** A payload still arriving; `placed`: it goes to the receiver's buffer, not the message. */
  #partial: (PartialPayload<SimpleReplyMessage | StructuredReplyMessage | OptionReplyMessage> & { placed: boolean }) | undefined;
  #dataBytes: (cookieHi: number, cookieLo: number) => number;
  #dataTarget: ReplyDecoderOptions['dataTarget'];
  #transient: boolean;
  #maxOptionBytes: number;
  #maxChunkBytes: number;

  constructor(options: ReplyDecoderOptions = {}) {
    this.#dataBytes = options.simpleReplyDataBytes ?? (() => 0);
    this.#dataTarget = options.dataTarget;
    this.#transient = options.transientChunks ?? false;
    this.#maxOptionBytes = options.maxOptionReplyBytes ?? MAX_OPTION_PAYLOAD_BYTES;
    this.#maxChunkBytes = options.maxChunkPayloadBytes ?? MAX_PAYLOAD_BYTES + 1024;
  }

  get phase(): ReplyDecoderPhase {
    return this.#phase;
  }

  /** Bytes received and not decoded yet. */
  get bufferedBytes(): number {
    return this.#queue.length;
  }

  /** `noZeroes`: NBD_FLAG_C_NO_ZEROES was negotiated (matters for 'export-name'). */
  setPhase(phase: ReplyDecoderPhase, noZeroes = false): void {
    this.#phase = phase;
    this.#noZeroes = noZeroes;
  }

  append(chunk: Buffer): void {
    this.#queue.append(chunk);
  }

  /** With transient chunks: copy what is still unread before the chunk is reused (else a no-op). */
  detach(): void {
    if (this.#transient) this.#queue.detach();
  }

  push(chunk: Buffer): ServerMessage[] {
    this.append(chunk);
    const out: ServerMessage[] = [];
    for (let m = this.next(); m; m = this.next()) out.push(m);
    return out;
  }

  next(): ServerMessage | undefined {
    const q = this.#queue;
    if (this.#partial) {
      if (!fillPartial(q, this.#partial)) return undefined;
      const { message, buffer, placed } = this.#partial;
      this.#partial = undefined;
      if (!placed) setPayload(message, buffer);
      return message;
    }
    switch (this.#phase) {
      case 'greeting': {
        if (q.length < 18) return undefined;
        const at = q.view(18);
        const b = q.viewBuffer;
        if (b.readUInt32BE(at) !== NBDMAGIC_HI || b.readUInt32BE(at + 4) !== NBDMAGIC_LO) {
          throw new NbdProtocolError('bad greeting magic (expected NBDMAGIC)', q.position);
        }
        if (b.readUInt32BE(at + 8) !== IHAVEOPT_HI || b.readUInt32BE(at + 12) !== IHAVEOPT_LO) {
          throw new NbdProtocolError('server does not speak newstyle negotiation (expected IHAVEOPT)', q.position + 8);
        }
        const handshakeFlags = b.readUInt16BE(at + 16);
        q.skip(18);
        this.#phase = 'options';
        return { kind: 'greeting', handshakeFlags };
      }
      case 'options': {
        if (q.length < OPTION_REPLY_HEADER_BYTES) return undefined;
        const at = q.view(OPTION_REPLY_HEADER_BYTES);
        const b = q.viewBuffer;
        if (b.readUInt32BE(at) !== NBD_REP_MAGIC_HI || b.readUInt32BE(at + 4) !== NBD_REP_MAGIC_LO) {
          throw new NbdProtocolError('bad option reply magic', q.position);
        }
        const length = b.readUInt32BE(at + 16);
        if (length > this.#maxOptionBytes) {
          throw new NbdProtocolError(`option reply of ${length} bytes exceeds the maximum of ${this.#maxOptionBytes}`, q.position + 16);
        }
        const message: OptionReplyMessage = { kind: 'option-reply', option: b.readUInt32BE(at + 8), type: b.readUInt32BE(at + 12), data: EMPTY };
        q.skip(OPTION_REPLY_HEADER_BYTES);
        return this.#payload(message, length);
      }
      case 'export-name': {
        const n = EXPORT_NAME_REPLY_BYTES + (this.#noZeroes ? 0 : EXPORT_NAME_ZEROES);
        if (q.length < n) return undefined;
        const at = q.view(EXPORT_NAME_REPLY_BYTES);
        const b = q.viewBuffer;
        const message: ExportInfoMessage = {
          kind: 'export-info',
          sizeBytes: readU64BE(b, at),
          transmissionFlags: b.readUInt16BE(at + 8),
        };
        q.skip(n);
        this.#phase = 'transmission';
        return message;
      }
      case 'transmission':
        return this.#nextReply();
    }
  }

  #nextReply(): ServerMessage | undefined {
    const q = this.#queue;
    if (q.length < 4) return undefined;
    let at = q.view(4);
    const magic = q.viewBuffer.readUInt32BE(at);
    if (magic === NBD_SIMPLE_REPLY_MAGIC) {
      if (q.length < SIMPLE_REPLY_HEADER_BYTES) return undefined;
      at = q.view(SIMPLE_REPLY_HEADER_BYTES);
      const b = q.viewBuffer;
      const message: SimpleReplyMessage = {
        kind: 'simple-reply',
        errno: b.readUInt32BE(at + 4),
        cookieHi: b.readUInt32BE(at + 8),
        cookieLo: b.readUInt32BE(at + 12),
        data: undefined,
      };
      q.skip(SIMPLE_REPLY_HEADER_BYTES);
      if (message.errno !== 0) return message;
      const n = this.#dataBytes(message.cookieHi, message.cookieLo);
      if (n === 0) return message;
      return this.#payload(message, n, this.#dataTarget?.(message.cookieHi, message.cookieLo, undefined, n));
    }
    if (magic === NBD_STRUCTURED_REPLY_MAGIC) {
      if (q.length < STRUCTURED_REPLY_HEADER_BYTES) return undefined;
      at = q.view(STRUCTURED_REPLY_HEADER_BYTES);
      const b = q.viewBuffer;
      const length = b.readUInt32BE(at + 16);
      if (length > this.#maxChunkBytes) {
        throw new NbdProtocolError(`reply chunk of ${length} bytes exceeds the maximum of ${this.#maxChunkBytes}`, q.position + 16);
      }
      const message: StructuredReplyMessage = {
        kind: 'structured-reply',
        flags: b.readUInt16BE(at + 4),
        type: b.readUInt16BE(at + 6),
        cookieHi: b.readUInt32BE(at + 8),
        cookieLo: b.readUInt32BE(at + 12),
        payload: EMPTY,
      };
      q.skip(STRUCTURED_REPLY_HEADER_BYTES);
      if (message.type === NBD_REPLY_TYPE_OFFSET_DATA && length > OFFSET_BYTES && this.#dataTarget && q.length >= OFFSET_BYTES) {
        const o = q.view(OFFSET_BYTES);
        const offsetBytes = readU64BE(q.viewBuffer, o);
        const target = this.#dataTarget(message.cookieHi, message.cookieLo, offsetBytes, length - OFFSET_BYTES);
        if (target) {
          message.payload = q.take(OFFSET_BYTES, true);
          message.placedBytes = target.length;
          return this.#payload(message, target.length, target, true);
        }
      }
      return this.#payload(message, length);
    }
    throw new NbdProtocolError(`bad reply magic 0x${magic.toString(16)}`, q.position);
  }

  /** `target`: where the bytes go (else a slice or a buffer of our own); `placed`: not the message's payload. */
  #payload(message: SimpleReplyMessage | StructuredReplyMessage | OptionReplyMessage, n: number, target?: Buffer, placed = false): ServerMessage | undefined {
    const q = this.#queue;
    if (target && target.length !== n) throw new RangeError(`a data target of ${target.length} bytes for ${n}`);
    if (q.length >= n) {
      if (target) {
        q.copyTo(target, 0, n);
        if (!placed) setPayload(message, target);
      } else setPayload(message, q.take(n, this.#transient));
      return message;
    }
    this.#partial = { message, buffer: target ?? Buffer.allocUnsafe(n), filledBytes: 0, placed };
    return this.next();
  }
}

function setPayload(message: SimpleReplyMessage | StructuredReplyMessage | OptionReplyMessage, buffer: Buffer): void {
  if (message.kind === 'simple-reply') message.data = buffer;
  else if (message.kind === 'structured-reply') message.payload = buffer;
  else message.data = buffer;
}

const EMPTY = Buffer.alloc(0);
