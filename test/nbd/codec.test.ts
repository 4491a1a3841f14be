/** Codec units: fixtures split at every byte boundary, caps checked before allocation, random bytes. */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import * as C from '../../src/nbd/constants.js';
import { NbdProtocolError } from '../../src/nbd/byte-queue.js';
import { RequestDecoder, type ClientMessage, type RequestDecoderPhase } from '../../src/nbd/request-decoder.js';
import { ReplyDecoder, type ServerMessage, type ReplyDecoderPhase } from '../../src/nbd/reply-decoder.js';
import {
  encodeBlockStatus, encodeClientFlags, encodeExportNameReply, encodeGreeting, encodeInfoExport, encodeInfoRequestData,
  encodeMetaContextData, encodeOffsetHole, encodeOption, encodeOptionReply, encodeRequest, encodeSimpleReply,
  encodeStructuredError, encodeStructuredErrorOffset, encodeStructuredNone, writeStructuredHeader, writeU64,
} from '../../src/nbd/encoders.js';

function normalize<T>(messages: T[]): unknown[] {
  // Compare payloads by content, not by which chunk they were sliced from.
  // Whether a payload was sliced or copied depends on the split; that is not part of the message.
  return messages.map((m) => JSON.parse(JSON.stringify(m, (k, v: unknown) => k === 'payloadAllocated' ? undefined : (v && typeof v === 'object' && (v as { type?: string }).type === 'Buffer' ? Buffer.from((v as { data: number[] }).data).toString('hex') : v))));
}

function clientStream(): Buffer {
  const payload = Buffer.alloc(4096);
  for (let i = 0; i < payload.length; i++) payload[i] = (i * 7) & 0xff;
  return Buffer.concat([
    encodeClientFlags(C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES),
    encodeOption(C.NBD_OPT_STRUCTURED_REPLY),
    encodeOption(C.NBD_OPT_SET_META_CONTEXT, encodeMetaContextData('disk', [C.BASE_ALLOCATION])),
    encodeOption(C.NBD_OPT_GO, encodeInfoRequestData('disk', [C.NBD_INFO_BLOCK_SIZE])),
  ]);
}

function requestStream(): Buffer {
  const payload = Buffer.alloc(3000);
  for (let i = 0; i < payload.length; i++) payload[i] = (i * 13) & 0xff;
  return Buffer.concat([
    encodeRequest(0, C.NBD_CMD_READ, 0xdeadbeef, 1, 2 ** 40 + 512, 4096),
    encodeRequest(C.NBD_CMD_FLAG_FUA, C.NBD_CMD_WRITE, 0, 2, 8192, payload.length),
    payload,
    encodeRequest(0, C.NBD_CMD_WRITE, 0, 3, 0, 0),
    encodeRequest(0, C.NBD_CMD_FLUSH, 0, 4, 0, 0),
    encodeRequest(C.NBD_CMD_FLAG_REQ_ONE, C.NBD_CMD_BLOCK_STATUS, 0, 5, 0, 65536),
    encodeRequest(0, C.NBD_CMD_DISC, 0, 6, 0, 0),
  ]);
}

/** Feed a server-side decoder, switching to transmission when the handshake stream is used up. */
function decodeClient(chunks: Buffer[], phase: RequestDecoderPhase): ClientMessage[] {
  const d = new RequestDecoder();
  d.setPhase(phase);
  const out: ClientMessage[] = [];
  for (const c of chunks) out.push(...d.push(c));
  assert.equal(d.bufferedBytes, 0);
  return out;
}

function splitEverywhere(stream: Buffer, decode: (chunks: Buffer[]) => unknown[]): void {
  const whole = normalize(decode([stream]));
  assert.ok(whole.length > 0);
  for (let i = 1; i < stream.length; i++) {
    assert.deepEqual(normalize(decode([stream.subarray(0, i), stream.subarray(i)])), whole, `split at ${i}`);
  }
  // And one byte at a time.
  const bytes = [...stream].map((b) => Buffer.from([b]));
  assert.deepEqual(normalize(decode(bytes)), whole);
}

test('handshake stream decodes the same split at every byte boundary', () => {
  const stream = clientStream();
  splitEverywhere(stream, (chunks) => decodeClient(chunks, 'client-flags'));
  const messages = decodeClient([stream], 'client-flags');
  assert.equal(messages.length, 4);
  assert.deepEqual(messages[0], { kind: 'client-flags', flags: 3 });
  const go = messages[3];
  assert.ok(go?.kind === 'option' && go.option === C.NBD_OPT_GO && go.data.length === 4 + 4 + 2 + 2);
});

test('request stream decodes the same split at every byte boundary, with 64-bit offsets and cookies', () => {
  const stream = requestStream();
  splitEverywhere(stream, (chunks) => decodeClient(chunks, 'transmission'));
  const messages = decodeClient([stream], 'transmission');
  assert.equal(messages.length, 6);
  const read = messages[0];
  assert.ok(read?.kind === 'request');
  assert.equal(read.cookieHi, 0xdeadbeef);
  assert.equal(read.offsetBytes, 2 ** 40 + 512);
  const write = messages[1];
  assert.ok(write?.kind === 'request' && write.payload?.length === 3000 && write.payload[1] === 13);
  const empty = messages[2];
  assert.ok(empty?.kind === 'request' && empty.payload?.length === 0);
});

test('an oversized WRITE payload is skipped without being stored, and decoding goes on', () => {
  const d = new RequestDecoder({ maxWritePayloadBytes: 1024 });
  d.setPhase('transmission');
  const big = 5000;
  const out: ClientMessage[] = [];
  out.push(...d.push(encodeRequest(0, C.NBD_CMD_WRITE, 0, 1, 0, big)));
  for (let i = 0; i < big; i += 700) out.push(...d.push(Buffer.alloc(Math.min(700, big - i), 0xee)));
  out.push(...d.push(encodeRequest(0, C.NBD_CMD_FLUSH, 0, 2, 0, 0)));
  assert.equal(out.length, 2);
  assert.ok(out[0]?.kind === 'request' && out[0].payloadSkipped && out[0].payload === undefined);
  assert.ok(out[1]?.kind === 'request' && out[1].type === C.NBD_CMD_FLUSH);
  // A 4 GiB claim costs nothing either: the decoder only counts.
  const d2 = new RequestDecoder();
  d2.setPhase('transmission');
  assert.deepEqual(d2.push(encodeRequest(0, C.NBD_CMD_WRITE, 0, 1, 0, 0xffffffff)), []);
});

test('an oversized option is flagged tooBig and skipped', () => {
  const d = new RequestDecoder({ maxOptionPayloadBytes: 100 });
  d.setPhase('options');
  const out = d.push(Buffer.concat([encodeOption(C.NBD_OPT_LIST, Buffer.alloc(101)), encodeOption(C.NBD_OPT_ABORT)]));
  assert.equal(out.length, 2);
  assert.ok(out[0]?.kind === 'option' && out[0].tooBig && out[0].data.length === 0 && out[0].lengthBytes === 101);
  assert.ok(out[1]?.kind === 'option' && out[1].option === C.NBD_OPT_ABORT && !out[1].tooBig);
});

test('bad magic is a protocol error naming the byte position', () => {
  const d = new RequestDecoder();
  d.setPhase('transmission');
  d.push(encodeRequest(0, C.NBD_CMD_FLUSH, 0, 1, 0, 0));
  const bad = encodeRequest(0, C.NBD_CMD_FLUSH, 0, 2, 0, 0);
  bad.writeUInt32BE(0x12345678, 0);
  assert.throws(() => d.push(bad), (e: unknown) => e instanceof NbdProtocolError && e.code === 'EPROTO' && e.positionBytes === 28 && /at byte 28/.test(e.message));
  const o = new RequestDecoder();
  o.setPhase('options');
  assert.throws(() => o.push(Buffer.from('NOTANOPTIONMAGIC')), (e: unknown) => e instanceof NbdProtocolError && e.positionBytes === 0);
});

function serverStream(): { handshake: Buffer; transmission: Buffer } {
  const handshake = Buffer.concat([
    encodeGreeting(C.NBD_FLAG_FIXED_NEWSTYLE | C.NBD_FLAG_NO_ZEROES),
    encodeOptionReply(C.NBD_OPT_STRUCTURED_REPLY, C.NBD_REP_ACK),
    encodeOptionReply(C.NBD_OPT_GO, C.NBD_REP_INFO, encodeInfoExport(1 << 30, 0x1ff)),
    encodeOptionReply(C.NBD_OPT_GO, C.NBD_REP_ERR_UNKNOWN, Buffer.from('no such export')),
  ]);
  const data = Buffer.alloc(2048, 0x5a);
  const chunk = Buffer.alloc(C.STRUCTURED_REPLY_HEADER_BYTES + 8 + data.length);
  writeStructuredHeader(chunk, 0, 0, C.NBD_REPLY_TYPE_OFFSET_DATA, 0, 9, 8 + data.length);
  writeU64(chunk, 20, 4096);
  data.copy(chunk, 28);
  const simpleRead = Buffer.concat([encodeSimpleReply(0, 0, 7), Buffer.alloc(512, 0x11)]);
  const transmission = Buffer.concat([
    simpleRead,
    encodeSimpleReply(22, 0, 8),
    chunk,
    encodeOffsetHole(0, 9, 6144, 2048, 0),
    encodeStructuredError(0, 10, 28, 'no space'),
    encodeStructuredErrorOffset(0, 11, 5, 'bad sector', 4096),
    encodeBlockStatus(0, 12, 1, [{ length: 4096, flags: 3 }, { length: 512, flags: 0 }]),
    encodeStructuredNone(0, 9),
  ]);
  return { handshake, transmission };
}

function decodeServer(chunks: Buffer[], phase: ReplyDecoderPhase): ServerMessage[] {
  const d = new ReplyDecoder({ simpleReplyDataBytes: (_hi, lo) => (lo === 7 ? 512 : 0) });
  d.setPhase(phase);
  const out: ServerMessage[] = [];
  for (const c of chunks) out.push(...d.push(c));
  return out;
}

test('server streams decode the same split at every byte boundary', () => {
  const { handshake, transmission } = serverStream();
  splitEverywhere(handshake, (chunks) => decodeServer(chunks, 'greeting'));
  splitEverywhere(transmission, (chunks) => decodeServer(chunks, 'transmission'));
  const t = decodeServer([transmission], 'transmission');
  assert.equal(t.length, 8);
  assert.ok(t[0]?.kind === 'simple-reply' && t[0].data?.length === 512);
  assert.ok(t[1]?.kind === 'simple-reply' && t[1].errno === 22 && t[1].data === undefined);
  assert.ok(t[4]?.kind === 'structured-reply' && t[4].type === C.NBD_REPLY_TYPE_ERROR);
  const exportName = decodeServer([encodeExportNameReply(12345, 3, false), encodeSimpleReply(0, 0, 1)], 'export-name');
  assert.deepEqual(exportName[0], { kind: 'export-info', sizeBytes: 12345, transmissionFlags: 3 });
  assert.equal(exportName.length, 2);
});

test('read data lands in the receiver\'s buffer at every split; ranges it does not give come in a buffer of their own', () => {
  const { transmission } = serverStream();
  const decodeInto = (chunks: Buffer[]): { messages: ServerMessage[]; simple: Buffer; structured: Buffer } => {
    const simple = Buffer.alloc(512);
    const structured = Buffer.alloc(8192);
    const d = new ReplyDecoder({
      simpleReplyDataBytes: (_hi, lo) => (lo === 7 ? 512 : 0),
      // Cookie 7: a simple read of 512 bytes; cookie 9: a structured read of 8 KiB from 2048.
      dataTarget: (_hi, lo, offsetBytes, lengthBytes) => {
        if (lo === 7 && offsetBytes === undefined) return simple.subarray(0, lengthBytes);
        if (lo === 9 && offsetBytes !== undefined) return structured.subarray(offsetBytes - 2048, offsetBytes - 2048 + lengthBytes);
        return undefined;
      },
    });
    d.setPhase('transmission');
    const messages: ServerMessage[] = [];
    for (const c of chunks) messages.push(...d.push(c));
    return { messages, simple, structured };
  };
  const check = (chunks: Buffer[], why: string): void => {
    const { messages, simple, structured } = decodeInto(chunks);
    assert.equal(messages.length, 8, why);
    assert.ok(simple.every((b) => b === 0x11), `${why}: the simple read's data is in place`);
    const m = messages[2]!;
    assert.ok(m.kind === 'structured-reply' && m.type === C.NBD_REPLY_TYPE_OFFSET_DATA, why);
    if (m.placedBytes !== undefined) {
      // Placed: the payload is the offset alone, the data is where the receiver asked.
      assert.equal(m.placedBytes, 2048, why);
      assert.equal(m.payload.length, 8, why);
      assert.ok(structured.subarray(2048, 4096).every((b) => b === 0x5a), `${why}: placed data`);
    } else {
      // The offset straddled two chunks: the data comes in the payload, as without a target.
      assert.equal(m.payload.length, 8 + 2048, why);
      assert.ok(m.payload.subarray(8).every((b) => b === 0x5a), why);
    }
  };
  check([transmission], 'whole');
  for (let i = 1; i < transmission.length; i++) check([transmission.subarray(0, i), transmission.subarray(i)], `split at ${i}`);
  // A target the receiver does not give (cookie 9 outside what it asked) leaves the data in the payload.
  const d = new ReplyDecoder({ dataTarget: () => undefined });
  d.setPhase('transmission');
  const chunk = serverStream().transmission.subarray(512 + 16 + 16);
  const m = d.push(chunk)[0]!;
  assert.ok(m.kind === 'structured-reply' && m.placedBytes === undefined && m.payload.length === 8 + 2048);
});

test('reply type constants are the spec values (bit 15 errors, not 1 << 16)', () => {
  assert.equal(C.NBD_REPLY_TYPE_ERROR, 32769);
  assert.equal(C.NBD_REPLY_TYPE_ERROR_OFFSET, 32770);
  assert.equal(C.NBD_REP_ERR_UNSUP, 2147483649);
  assert.equal(C.NBD_REP_ERR_TOO_BIG, 2147483657);
  assert.equal(C.NBDMAGIC, 0x4e42444d41474943n);
});

/** A protocol error names a byte the decoder was given: a whole number below `pushedBytes`. */
function checkProtocolError(e: unknown, pushedBytes: number): void {
  if (!(e instanceof NbdProtocolError)) throw e;
  assert.ok(Number.isSafeInteger(e.positionBytes) && e.positionBytes >= 0 && e.positionBytes < pushedBytes, `${e.message}: position ${e.positionBytes} of ${pushedBytes} bytes pushed`);
  assert.match(e.message, new RegExp(` at byte ${e.positionBytes}$`));
}

const FUZZ_MAX_WRITE_BYTES = 4096;
const FUZZ_MAX_OPTION_BYTES = 1024;
const FUZZ_SIMPLE_REPLY_DATA_BYTES = 64;
const FUZZ_MAX_CHUNK_BYTES = 4096;

/** What RequestDecoder promises of a message: payloads within their caps, the over-cap ones skipped. */
function checkClientMessage(m: ClientMessage): void {
  if (m.kind === 'option') {
    assert.equal(m.tooBig, m.lengthBytes > FUZZ_MAX_OPTION_BYTES, `option of ${m.lengthBytes} bytes: tooBig ${m.tooBig}`);
    assert.equal(m.data.length, m.tooBig ? 0 : m.lengthBytes);
  } else if (m.kind === 'request') {
    const isWrite = m.type === C.NBD_CMD_WRITE;
    assert.equal(m.payloadSkipped, isWrite && m.lengthBytes > FUZZ_MAX_WRITE_BYTES, `request type ${m.type} of ${m.lengthBytes} bytes: skipped ${m.payloadSkipped}`);
    if (isWrite && !m.payloadSkipped) assert.equal(m.payload?.length, m.lengthBytes);
    else assert.equal(m.payload, undefined, `request type ${m.type} of ${m.lengthBytes} bytes has no payload`);
  }
}

/** What ReplyDecoder promises of a message: data and payloads within their caps. */
function checkServerMessage(m: ServerMessage): void {
  if (m.kind === 'option-reply') assert.ok(m.data.length <= FUZZ_MAX_OPTION_BYTES, `option reply of ${m.data.length} bytes`);
  else if (m.kind === 'simple-reply') assert.ok(m.data === undefined || m.data.length === FUZZ_SIMPLE_REPLY_DATA_BYTES, `simple reply data of ${m.data?.length} bytes`);
  else if (m.kind === 'structured-reply') assert.ok(m.payload.length <= FUZZ_MAX_CHUNK_BYTES, `reply chunk of ${m.payload.length} bytes`);
}

test('random bytes give messages within the caps or a protocol error at a byte given, never another throw or a hang', () => {
  const phases: RequestDecoderPhase[] = ['client-flags', 'options', 'transmission'];
  const replyPhases: ReplyDecoderPhase[] = ['greeting', 'options', 'export-name', 'transmission'];
  fc.assert(fc.property(
    fc.array(fc.uint8Array({ maxLength: 300 }), { maxLength: 8 }),
    fc.nat({ max: 2 }),
    fc.nat({ max: 3 }),
    fc.boolean(),
    (chunks, p, rp, withMagic) => {
      const bufs = chunks.map((c) => Buffer.from(c));
      // Half the cases start with a valid request magic, so decoding gets past the first check.
      if (withMagic && bufs.length > 0) bufs[0] = Buffer.concat([encodeRequest(0, 0, 0, 0, 0, 0).subarray(0, 4), bufs[0]!]);
      const d = new RequestDecoder({ maxWritePayloadBytes: FUZZ_MAX_WRITE_BYTES, maxOptionPayloadBytes: FUZZ_MAX_OPTION_BYTES });
      d.setPhase(phases[p]!);
      let pushed = 0;
      try {
        for (const b of bufs) {
          pushed += b.length;
          for (const m of d.push(b)) checkClientMessage(m);
        }
      } catch (e) {
        checkProtocolError(e, pushed);
      }
      const r = new ReplyDecoder({ simpleReplyDataBytes: () => FUZZ_SIMPLE_REPLY_DATA_BYTES, maxChunkPayloadBytes: FUZZ_MAX_CHUNK_BYTES, maxOptionReplyBytes: FUZZ_MAX_OPTION_BYTES });
      r.setPhase(replyPhases[rp]!, true);
      pushed = 0;
      try {
        for (const b of bufs) {
          pushed += b.length;
          for (const m of r.push(b)) checkServerMessage(m);
        }
      } catch (e) {
        checkProtocolError(e, pushed);
      }
    },
  ), { numRuns: 3000 });
});

test('with transient chunks, decoded payloads survive the chunk being overwritten', () => {
  const stream = Buffer.concat([clientStream(), requestStream()]);
  const expected = normalize(decodeClient([clientStream()], 'client-flags').concat(decodeClient([requestStream()], 'transmission')));
  for (const size of [1, 7, 28, 100, 4096]) {
    const d = new RequestDecoder({ transientChunks: true });
    const shared = Buffer.alloc(size);
    const out: ClientMessage[] = [];
    for (let at = 0; at < stream.length; at += size) {
      const n = stream.copy(shared, 0, at, Math.min(at + size, stream.length));
      d.append(shared.subarray(0, n));
      for (let m = d.next(); m; m = d.next()) {
        out.push(m);
        if (m.kind === 'option' && m.option === C.NBD_OPT_GO) d.setPhase('transmission');
      }
      d.detach();
      shared.fill(0xcc);
    }
    assert.deepEqual(normalize(out), expected, `chunks of ${size}`);
  }
});

test('a socket may read a WRITE payload straight into it (payloadTarget, placed), at any split', () => {
  const stream = requestStream();
  const expected = normalize(decodeClient([stream], 'transmission'));
  for (const size of [1, 5, 28, 100, 4096]) {
    const d = new RequestDecoder({ transientChunks: true });
    d.setPhase('transmission');
    const shared = Buffer.alloc(size);
    const out: ClientMessage[] = [];
    let placedBytes = 0;
    for (let at = 0; at < stream.length;) {
      // As a socket with onread asks before each read: into the payload if it may, else the shared buffer.
      const target = d.payloadTarget();
      if (target !== undefined) {
        assert.equal(d.bufferedBytes, 0);
        const n = stream.copy(target, 0, at, Math.min(at + size, at + target.length, stream.length));
        d.placed(n);
        placedBytes += n;
        at += n;
      } else {
        const n = stream.copy(shared, 0, at, Math.min(at + size, stream.length));
        d.append(shared.subarray(0, n));
        at += n;
      }
      for (let m = d.next(); m; m = d.next()) out.push(m);
      d.detach();
      shared.fill(0xcc);
    }
    assert.deepEqual(normalize(out), expected, `reads of ${size}`);
    if (size < 100) assert.ok(placedBytes > 0, `reads of ${size}: no payload byte was placed directly`);
  }
  // Nothing to place into outside a payload, and a count past the payload's end is refused.
  const idle = new RequestDecoder();
  idle.setPhase('transmission');
  assert.equal(idle.payloadTarget(), undefined);
  assert.throws(() => idle.placed(1), /does not fit/);
  const d = new RequestDecoder();
  d.setPhase('transmission');
  d.append(encodeRequest(0, C.NBD_CMD_WRITE, 0, 9, 0, 16));
  assert.equal(d.next(), undefined);
  assert.equal(d.payloadTarget()?.length, 16);
  assert.throws(() => d.placed(17), /does not fit/);
});

test('a WRITE payload filled by placed() but not yet taken (the caller is paused) is no read target: never an empty buffer', () => {
  const d = new RequestDecoder({ transientChunks: true });
  d.setPhase('transmission');
  d.append(encodeRequest(0, C.NBD_CMD_WRITE, 0, 9, 0, 16));
  assert.equal(d.next(), undefined);
  d.placed(d.payloadTarget()!.length);
  // A socket handed an empty buffer fails its read (ENOBUFS), or under TLS never gets past it.
  assert.equal(d.payloadTarget(), undefined);
  const m = d.next();
  assert.ok(m?.kind === 'request' && m.payload?.length === 16);
  assert.equal(d.payloadTarget(), undefined);
});

test('clear() drops a half-received WRITE payload and undecoded bytes: a closed connection kept afterwards holds neither', () => {
  const d = new RequestDecoder({ transientChunks: true });
  d.setPhase('transmission');
  const header = encodeRequest(0, C.NBD_CMD_WRITE, 0, 9, 0, 1 << 20);
  d.append(Buffer.concat([header, Buffer.alloc(4096, 7)]));
  assert.equal(d.next(), undefined);
  const half = d.payloadTarget();
  assert.equal(half?.length, (1 << 20) - 4096, 'the rest of the payload is awaited');
  d.append(Buffer.alloc(10, 1));
  d.clear();
  assert.equal(d.payloadTarget(), undefined, 'no payload is held');
  assert.equal(d.bufferedBytes, 0);
  assert.equal(d.next(), undefined);
});

test('after a large WRITE the next header is read alone, so each large payload is read straight into its buffer', () => {
  const large = 256 * 1024;
  const payloads = [0, 1, 2, 3].map((i) => Buffer.alloc(large, i + 1));
  const small = Buffer.alloc(4096, 9);
  const stream = Buffer.concat([
    ...payloads.flatMap((p, i) => [encodeRequest(0, C.NBD_CMD_WRITE, 0, i, i * large, large), p]),
    encodeRequest(0, C.NBD_CMD_FLUSH, 0, 10, 0, 0),
    encodeRequest(0, C.NBD_CMD_WRITE, 0, 11, 0, small.length), small,
    encodeRequest(0, C.NBD_CMD_WRITE, 0, 12, 0, small.length), small,
  ]);
  const expected = normalize(decodeClient([stream], 'transmission'));
  // As the server's socket reads: into the payload, else one header's worth or the whole shared buffer.
  const d = new RequestDecoder({ transientChunks: true });
  d.setPhase('transmission');
  const shared = Buffer.alloc(large);
  const out: ClientMessage[] = [];
  const sharedReads: number[] = [];
  for (let at = 0; at < stream.length;) {
    const target = d.payloadTarget();
    if (target !== undefined) {
      const n = stream.copy(target, 0, at, Math.min(at + target.length, stream.length));
      d.placed(n);
      at += n;
    } else {
      const room = d.headerNext() ? C.REQUEST_HEADER_BYTES : shared.length;
      const n = stream.copy(shared, 0, at, Math.min(at + room, stream.length));
      d.append(shared.subarray(0, n));
      sharedReads.push(n);
      at += n;
    }
    for (let m = d.next(); m; m = d.next()) out.push(m);
    d.detach();
    shared.fill(0xcc);
  }
  assert.deepEqual(normalize(out), expected);
  // The first read takes a header and most of its payload; after each large WRITE, one header alone
  // (the FLUSH's included); after the FLUSH, the shared buffer again, which takes both small WRITEs.
  assert.deepEqual(sharedReads, [large, 28, 28, 28, 28, 2 * (28 + small.length)]);
  assert.equal(d.headerNext(), false);
});
