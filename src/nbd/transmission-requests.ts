/**
 * The transmission phase's requests against one opened export: which requests are refused
 * (and with what errno), how each one runs on the device, and the reply it gets.
 *
 * Invariants:
 * - Every request given to execute() or replyError() leaves with exactly one reply, handed to
 *   the connection's `send` together with the charge its request was admitted with.
 * - A READ reply is only built once its data is in hand, so a failed read always gets a clean
 *   error reply and never a half-sent one; the data is read straight into the reply buffer, a
 *   pool buffer that goes back to the pool once the socket is done with it.
 * - What the handshake settled (structured replies, the selected contexts) does not change
 *   once the export is being served, so it is fixed here at construction.
 */

import { FLUSH_ANSWERED_MARK, traceMark } from '../host/fs-trace.js';
import { BdsnapError } from '../errors.js';
import { EXTENT_HOLE, EXTENT_ZERO, type BlockDevice } from '../device/block-device.js';
import type { BufferPool } from '../device/buffer-pool.js';
import type { MetaContextSource } from './exports.js';
import type { RequestMessage } from './request-decoder.js';
import * as C from './constants.js';
import { isAllZero } from '../bytes.js';
import { clipExtents } from './block-status.js';
import {
  OFFSET_DATA_PREFIX_BYTES, encodeBlockStatus, encodeOffsetHole, encodeSimpleReply, encodeStructuredError,
  encodeStructuredNone, writeSimpleReplyHeader, writeStructuredHeader, writeU64,
} from './encoders.js';

/** Why a request is answered with an error without being run. */
export interface Refusal {
  errno: number;
  message: string;
}

/** A selected context of the export in use: base:allocation, another source, or one gone since. */
export interface ActiveContext {
  id: number;
  name: string;
  source: 'base' | MetaContextSource | undefined;
}

/**
 * Queue a reply on the connection; it carries `charge` until the socket has taken it, and a
 * `pooled` buffer goes back to the pool then.
 */
export type SendReply = (buf: Buffer, pooled: boolean, charge: number) => void;

export class TransmissionRequests {
  readonly device: BlockDevice;
  readonly sizeBytes: number;
  readonly minimumBlockBytes: number;
  /** The largest READ or WRITE payload this export accepts. */
  readonly maximumPayloadBytes: number;
  #structured: boolean;
  /** Empty: no context was selected, so no BLOCK_STATUS. */
  #activeContexts: ActiveContext[];
  #pool: BufferPool;
  #send: SendReply;
  readonly #queued: (() => boolean) | undefined;

  /**
   * `queued`: whether more requests of the client wait behind the one being run (passed with
   * each WRITE, see WriteOptions.queued).
   */
  constructor(device: BlockDevice, structured: boolean, activeContexts: ActiveContext[], pool: BufferPool, send: SendReply, queued?: () => boolean) {
    this.device = device;
    this.sizeBytes = device.size;
    this.minimumBlockBytes = Math.max(1, device.blockSizes.minimum);
    this.maximumPayloadBytes = Math.min(device.blockSizes.maximum, C.MAX_PAYLOAD_BYTES);
    this.#structured = structured;
    this.#activeContexts = activeContexts;
    this.#pool = pool;
    this.#send = send;
    this.#queued = queued;
  }

  validate(r: RequestMessage): Refusal | undefined {
    const { type, flags, offsetBytes, lengthBytes } = r;
    const flagsRefusal = this.#checkFlags(type, flags);
    if (flagsRefusal) return flagsRefusal;
    if (type === C.NBD_CMD_FLUSH) {
      return offsetBytes === 0 && lengthBytes === 0 ? undefined : { errno: C.NBD_EINVAL, message: 'flush takes no offset or length' };
    }
    const writing = type === C.NBD_CMD_WRITE || type === C.NBD_CMD_TRIM || type === C.NBD_CMD_WRITE_ZEROES;
    if (writing && this.device.readOnly) return { errno: C.NBD_EPERM, message: 'the export is read-only' };
    if (r.payloadSkipped || ((type === C.NBD_CMD_READ || type === C.NBD_CMD_WRITE) && lengthBytes > this.maximumPayloadBytes)) {
      return { errno: C.NBD_EINVAL, message: `length ${lengthBytes} exceeds the maximum payload of ${this.maximumPayloadBytes} bytes` };
    }
    if (type === C.NBD_CMD_BLOCK_STATUS && this.#activeContexts.length === 0) {
      return { errno: C.NBD_EINVAL, message: 'no metadata context was selected for this export' };
    }
    const endBytes = offsetBytes + lengthBytes;
    if (endBytes > this.sizeBytes) {
      const grows = type === C.NBD_CMD_WRITE || type === C.NBD_CMD_WRITE_ZEROES;
      return {
        errno: grows ? C.NBD_ENOSPC : C.NBD_EINVAL,
        message: `range ${offsetBytes}+${lengthBytes} is past the end of the export (${this.sizeBytes} bytes)`,
      };
    }
    const min = this.minimumBlockBytes;
    // The tail of an export whose size is not a multiple of the block size stays reachable.
    if (offsetBytes % min !== 0 || (lengthBytes % min !== 0 && endBytes !== this.sizeBytes)) {
      return { errno: C.NBD_EINVAL, message: `range ${offsetBytes}+${lengthBytes} is not aligned to ${min} bytes` };
    }
    if (type === C.NBD_CMD_BLOCK_STATUS && lengthBytes === 0) return { errno: C.NBD_EINVAL, message: 'block status of an empty range' };
    return undefined;
  }

  /** An unknown command, or a flag its command does not take. */
  #checkFlags(type: number, flags: number): Refusal | undefined {
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
    return undefined;
  }

  /**
   * Run `r` and answer it before returning, where that needs no waiting: a WRITE without FUA
   * that the device writes on this thread anyway (BlockDevice.writeNow), answered without a
   * promise. False when nothing was done: execute() runs it. Throws what execute() would reject
   * with (then nothing was answered).
   */
  executeNow(r: RequestMessage, charge: number): boolean {
    if (r.type !== C.NBD_CMD_WRITE || r.lengthBytes === 0 || (r.flags & C.NBD_CMD_FLAG_FUA) !== 0) return false;
    if (this.device.writeNow === undefined || !this.device.writeNow(r.payload!, r.offsetBytes, this.#queued)) return false;
    this.#send(encodeSimpleReply(0, r.cookieHi, r.cookieLo), false, charge);
    return true;
  }

  /** `charge`: what the request was admitted with, for its reply to carry (not on a throw). */
  async execute(r: RequestMessage, charge: number): Promise<void> {
    const device = this.device;
    const { type, flags, offsetBytes, lengthBytes, cookieHi, cookieLo } = r;
    const fua = (flags & C.NBD_CMD_FLAG_FUA) !== 0;
    switch (type) {
      case C.NBD_CMD_READ:
        return this.#read(device, r, charge);
      case C.NBD_CMD_WRITE:
        if (lengthBytes > 0) await device.write(r.payload!, offsetBytes, { fua, queued: this.#queued });
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
    let buf = this.#pool.get(prefix + lengthBytes);
    try {
      // A device on another thread fills the reply buffer there, moved rather than copied.
      if (lengthBytes > 0 && device.readInto !== undefined) buf = await device.readInto(buf, prefix, offsetBytes);
      else if (lengthBytes > 0) await device.read(buf.subarray(prefix), offsetBytes);
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

  replyError(r: RequestMessage, errno: number, message: string, charge: number): void {
    // Structured replies let the message reach the user; READ must use them once negotiated.
    if (this.#structured) this.#send(encodeStructuredError(r.cookieHi, r.cookieLo, errno, message), false, charge);
    else this.#send(encodeSimpleReply(errno, r.cookieHi, r.cookieLo), false, charge);
  }
}
