/**
 * Random and mutated NBD traffic, for feeding a live server through real sockets. Every
 * generator is driven by a seeded PRNG, so a failing case is replayed from its seed.
 *
 * A script is the byte stream of one client connection, built from frames (client flags,
 * options, requests with their payloads, random bytes), aimed at one protocol phase:
 * - 'handshake': garbage or mutated client flags right after the greeting;
 * - 'options': valid client flags, then options (known, unknown, malformed, oversized);
 * - 'transmission': a valid handshake into the export (structured replies negotiated or
 *   not, a metadata context or not), then requests of every type with random flags, ranges
 *   and payload lengths.
 * A script is then mutated as a whole (bit flips, cut, junk inserted) with some probability,
 * and the caller writes it split at random points.
 */

import * as C from '../../src/nbd/constants.js';

/** mulberry32: small, fast, deterministic. */
export class Rng {
  #state: number;

  constructor(seed: number) {
    this.#state = seed >>> 0;
  }

  /** Uniform in [0, 1). */
  next(): number {
    let t = (this.#state = (this.#state + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }

  /** Integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.next() * n);
  }

  chance(p: number): boolean {
    return this.next() < p;
  }

  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)] as T;
  }

  bytes(n: number): Buffer {
    const b = Buffer.allocUnsafe(n);
    for (let i = 0; i < n; i++) b[i] = this.int(256);
    return b;
  }

  /** A 32-bit value biased towards the edges where bugs live. */
  u32(): number {
    return this.pick([0, 1, 2, 511, 512, 4096, 65536, 0x7fffffff, 0x80000000, 0xffffffff, this.int(0x100000000)]);
  }
}

export type Phase = 'handshake' | 'options' | 'transmission';

export interface Script {
  phase: Phase;
  /** Structured replies asked for (transmission scripts). */
  structured: boolean;
  bytes: Buffer;
  /** Frames in the script (options, requests, junk blocks), for the campaign's count. */
  frames: number;
}

export interface TrafficTarget {
  /** The export the fuzzer may open and write. */
  exportName: string;
  sizeBytes: number;
}

function u16(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v & 0xffff);
  return b;
}

function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
}

function option(opt: number, data: Buffer, declaredLength = data.length): Buffer {
  const h = Buffer.alloc(16);
  h.writeBigUInt64BE(C.IHAVEOPT, 0);
  h.writeUInt32BE(opt >>> 0, 8);
  h.writeUInt32BE(declaredLength >>> 0, 12);
  return Buffer.concat([h, data]);
}

function nameData(name: string, infos: number[] = []): Buffer {
  const n = Buffer.from(name, 'utf8');
  return Buffer.concat([u32(n.length), n, u16(infos.length), ...infos.map(u16)]);
}

function metaContextData(name: string, queries: string[]): Buffer {
  const n = Buffer.from(name, 'utf8');
  const q = queries.map((s) => {
    const b = Buffer.from(s, 'utf8');
    return Buffer.concat([u32(b.length), b]);
  });
  return Buffer.concat([u32(n.length), n, u32(queries.length), ...q]);
}

function request(flags: number, type: number, cookie: bigint, offsetBytes: bigint, lengthBytes: number): Buffer {
  const b = Buffer.alloc(28);
  b.writeUInt32BE(C.NBD_REQUEST_MAGIC, 0);
  b.writeUInt16BE(flags & 0xffff, 4);
  b.writeUInt16BE(type & 0xffff, 6);
  b.writeBigUInt64BE(cookie, 8);
  b.writeBigUInt64BE(offsetBytes, 16);
  b.writeUInt32BE(lengthBytes >>> 0, 24);
  return b;
}

function clientFlags(rng: Rng): Buffer {
  return u32(rng.chance(0.9) ? C.NBD_FLAG_C_FIXED_NEWSTYLE | (rng.chance(0.5) ? C.NBD_FLAG_C_NO_ZEROES : 0) : rng.u32());
}

function randomName(rng: Rng, target: TrafficTarget): string {
  return rng.pick([target.exportName, '', 'no-such-export', `${target.exportName}@x`, 'é'.repeat(rng.int(40)), 'x'.repeat(rng.pick([0, 1, 4095, 4096, 5000]))]);
}

/** One option frame: mostly well-formed, sometimes lying about its length or its contents. */
function randomOption(rng: Rng, target: TrafficTarget): Buffer {
  const name = randomName(rng, target);
  switch (rng.int(10)) {
    case 0: return option(C.NBD_OPT_LIST, rng.chance(0.8) ? Buffer.alloc(0) : rng.bytes(rng.int(16)));
    case 1: return option(C.NBD_OPT_INFO, nameData(name, Array.from({ length: rng.int(4) }, () => rng.int(6))));
    case 2: return option(C.NBD_OPT_STRUCTURED_REPLY, rng.chance(0.8) ? Buffer.alloc(0) : rng.bytes(rng.int(8)));
    case 3: return option(rng.pick([C.NBD_OPT_SET_META_CONTEXT, C.NBD_OPT_LIST_META_CONTEXT]),
      metaContextData(name, Array.from({ length: rng.int(4) }, () => rng.pick(['base:allocation', 'base:', 'qemu:dirty-bitmap:x', '', 'nope:y']))));
    case 4: return option(rng.pick([C.NBD_OPT_STARTTLS, C.NBD_OPT_EXTENDED_HEADERS, C.NBD_OPT_PEEK_EXPORT, 12345, rng.u32()]), rng.bytes(rng.int(32)));
    case 5: {
      // Declared length larger than what follows (the rest of the script is eaten as payload),
      // or far over the cap.
      const data = rng.bytes(rng.int(16));
      return option(rng.int(12), data, rng.pick([data.length + rng.int(64), 0xffffffff, 65 * 1024 * 1024]));
    }
    case 6: {
      // A name length that lies about the data.
      const d = nameData(name);
      d.writeUInt32BE(rng.u32(), 0);
      return option(rng.pick([C.NBD_OPT_INFO, C.NBD_OPT_GO]), d);
    }
    case 7: return option(C.NBD_OPT_INFO, rng.bytes(rng.int(12)));
    default: return option(C.NBD_OPT_INFO, nameData(name, [C.NBD_INFO_BLOCK_SIZE, C.NBD_INFO_NAME, C.NBD_INFO_DESCRIPTION]));
  }
}

const COMMANDS = [C.NBD_CMD_READ, C.NBD_CMD_WRITE, C.NBD_CMD_FLUSH, C.NBD_CMD_TRIM, C.NBD_CMD_CACHE, C.NBD_CMD_WRITE_ZEROES, C.NBD_CMD_BLOCK_STATUS];

/** One request frame (with a payload for writes, of the declared length or not). */
function randomRequest(rng: Rng, target: TrafficTarget, cookie: bigint): Buffer {
  const type = rng.chance(0.95) ? rng.pick(COMMANDS) : rng.pick([C.NBD_CMD_RESIZE, C.NBD_CMD_DISC, 9, 0xffff]);
  const flags = rng.chance(0.8) ? rng.pick([0, C.NBD_CMD_FLAG_FUA, C.NBD_CMD_FLAG_NO_HOLE, C.NBD_CMD_FLAG_REQ_ONE, C.NBD_CMD_FLAG_FAST_ZERO, C.NBD_CMD_FLAG_DF]) : rng.int(0x10000);
  const inRange = rng.chance(0.85);
  const lengthBytes = inRange ? rng.pick([0, 1, 512, 4096, 65536, 1 + rng.int(128 * 1024)]) : rng.u32();
  const offsetBytes = inRange
    ? BigInt(Math.max(0, Math.min(target.sizeBytes - Math.min(lengthBytes, target.sizeBytes), rng.int(target.sizeBytes))))
    : rng.pick([BigInt(target.sizeBytes), BigInt(target.sizeBytes - 1), 0xffffffffffffffffn, BigInt(rng.u32()) << 20n]);
  const header = request(flags, type, cookie, offsetBytes, lengthBytes);
  if (type !== C.NBD_CMD_WRITE) return header;
  // A write carries its payload; a lying one carries less (the rest of the script becomes payload).
  const payloadBytes = lengthBytes <= 256 * 1024 ? (rng.chance(0.9) ? lengthBytes : rng.int(lengthBytes + 1)) : rng.int(4096);
  return Buffer.concat([header, rng.bytes(payloadBytes)]);
}

/** Bit flips, a cut, or junk inserted: applied to a whole script now and then. */
export function mutate(rng: Rng, bytes: Buffer): Buffer {
  if (bytes.length === 0) return rng.bytes(rng.int(64));
  switch (rng.int(4)) {
    case 0: {
      const out = Buffer.from(bytes);
      for (let i = 1 + rng.int(8); i > 0; i--) {
        const at = rng.int(out.length);
        out[at] = (out[at] as number) ^ (1 << rng.int(8));
      }
      return out;
    }
    case 1: return bytes.subarray(0, rng.int(bytes.length));
    case 2: {
      const at = rng.int(bytes.length);
      return Buffer.concat([bytes.subarray(0, at), rng.bytes(1 + rng.int(64)), bytes.subarray(at)]);
    }
    default: {
      // Overwrite a 4- or 8-byte field with an edge value.
      const out = Buffer.from(bytes);
      const at = rng.int(Math.max(1, out.length - 8));
      if (out.length >= at + 4) out.writeUInt32BE(rng.u32(), at);
      return out;
    }
  }
}

/** The bytes of one fuzz connection, with about `frames` frames in it. */
export function makeScript(rng: Rng, target: TrafficTarget, frames: number): Script {
  const phase: Phase = rng.pick(['handshake', 'options', 'options', 'transmission', 'transmission', 'transmission']);
  const parts: Buffer[] = [];
  let count = 0;
  let structured = false;
  if (phase === 'handshake') {
    parts.push(rng.chance(0.5) ? rng.bytes(rng.int(64)) : u32(rng.u32()));
    count++;
    for (; count < frames && rng.chance(0.5); count++) parts.push(rng.bytes(rng.int(256)));
  } else {
    parts.push(clientFlags(rng));
    count++;
    if (phase === 'options') {
      for (; count < frames; count++) parts.push(rng.chance(0.9) ? randomOption(rng, target) : rng.bytes(rng.int(64)));
      if (rng.chance(0.3)) parts.push(option(C.NBD_OPT_ABORT, Buffer.alloc(0)));
    } else {
      structured = rng.chance(0.5);
      if (structured) parts.push(option(C.NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0)));
      if (structured && rng.chance(0.7)) parts.push(option(C.NBD_OPT_SET_META_CONTEXT, metaContextData(target.exportName, ['base:allocation'])));
      parts.push(rng.chance(0.8)
        ? option(C.NBD_OPT_GO, nameData(target.exportName, rng.chance(0.5) ? [C.NBD_INFO_BLOCK_SIZE] : []))
        : option(C.NBD_OPT_EXPORT_NAME, Buffer.from(target.exportName)));
      count += 2;
      let cookie = BigInt(rng.int(1000));
      for (; count < frames; count++) {
        parts.push(rng.chance(0.95) ? randomRequest(rng, target, cookie++) : rng.bytes(rng.int(64)));
      }
      if (rng.chance(0.3)) parts.push(request(0, C.NBD_CMD_DISC, cookie, 0n, 0));
    }
  }
  let bytes: Buffer = Buffer.concat(parts);
  if (rng.chance(0.3)) bytes = mutate(rng, bytes);
  return { phase, structured, bytes, frames: count };
}

/** Cut `bytes` at random points into pieces (some of one byte). */
export function splitRandomly(rng: Rng, bytes: Buffer): Buffer[] {
  const pieces: Buffer[] = [];
  let at = 0;
  while (at < bytes.length) {
    const n = rng.chance(0.2) ? 1 : 1 + rng.int(rng.chance(0.5) ? 64 : 64 * 1024);
    pieces.push(bytes.subarray(at, at + n));
    at += n;
  }
  return pieces;
}
