/**
 * The floor of an NBD server in Node.js on this machine, without bdsnap: the least a Node
 * server can do to serve one image file. One event loop per process, every request read
 * straight into its payload buffer (the same adopted socket as bdsnap's), a synchronous
 * pread or pwrite, a simple reply: no request checks beyond the header, no queue, no memory
 * cap, no session, no export list, no log. With `--processes N`, N processes (node:cluster)
 * share the listening socket, each connection served whole by one of them. With `--threads N`,
 * one process accepts and hands each connection to one of N worker threads (the fewest
 * connections first), each with its own descriptor of the image, as `bdsnap serve` does.
 * `--async` does the file I/O on libuv's thread pool instead (each request its own buffer,
 * answered when its transfer is done, in whatever order), as bdsnap does for large transfers
 * when the page cache is slow.
 *
 * `--cow-store FILE` (synchronous I/O only) makes it the floor of copy-before-write: before a
 * write reaches the image, each chunk (`--chunk-size`, default 16 KiB as a session's) it
 * touches for the first time is read from the image, given its CRC-32 (`--no-checksum`: not),
 * and appended with a record header to FILE; a bitmap says which chunks are kept. Nothing
 * else: no index, no batching, no sync, no recovery. A session cannot do less for a first
 * write, so session / plain cannot be expected above node-floor-cow / node-floor.
 *
 * The nbdcopy rows run it beside bdsnap and nbdkit: what it reaches is the most a server on
 * this runtime can be expected to reach, whatever it does on top.
 *
 * Run: node dist/bench/nbd-floor.js [--processes N | --threads N] [--async | --cow-store FILE [--chunk-size N] [--no-checksum]] SOCKET IMAGE
 * Prints "nbd-floor: serving SOCKET" on stderr once it accepts connections; SIGTERM stops it.
 */

import cluster from 'node:cluster';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { crc32 } from 'node:zlib';
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';
import * as C from '../src/nbd/constants.js';
import { adoptWithReadBuffer } from '../src/nbd/server.js';
import { encodeExportNameReply, encodeGreeting, encodeInfoExport, encodeOptionReply, encodeSimpleReply } from '../src/nbd/encoders.js';
import { preadFully, preadFullySync, pwriteFully, pwriteFullySync } from '../src/host/fd-io.js';
import { loadLibc } from '../src/host/libc.js';
import { socketFd } from '../src/unix-socket.js';

const OPTION_HEADER_BYTES = 16;
const REQUEST_HEADER_BYTES = 28;
const READ_BUFFER_BYTES = 256 * 1024;
/** The largest request accepted: 32 MiB, the most NBD clients send in one request. */
const MAX_PAYLOAD_BYTES = 32 * 1024 * 1024;
/** The send buffer bdsnap asks for on its unix sockets (a large READ reply then leaves in one write). */
const SEND_BUFFER_BYTES = 4 * 1024 * 1024;
const TRANSMISSION_FLAGS = C.NBD_FLAG_HAS_FLAGS | C.NBD_FLAG_SEND_FLUSH | C.NBD_FLAG_CAN_MULTI_CONN;

function noHandle(): never {
  throw new Error('this Node.js has no socket handle to adopt');
}

/** Free buffers of each size, for requests served on the thread pool (each holds its own until answered). */
class FreeBuffers {
  #free = new Map<number, Buffer[]>();
  take(length: number): Buffer {
    return this.#free.get(length)?.pop() ?? Buffer.allocUnsafeSlow(length);
  }
  give(buffer: Buffer): void {
    const list = this.#free.get(buffer.length);
    if (list === undefined) this.#free.set(buffer.length, [buffer]);
    else if (list.length < 16) list.push(buffer);
  }
}

/** The copy-before-write floor's state: the store file, its end, and which chunks it keeps. */
interface CowFloor { storeFd: number; chunkBytes: number; checksum: boolean; kept: Uint8Array; endBytes: number; chunk: Buffer; header: Buffer }

/** What a session's record header holds at the least: the chunk, the length, the checksum. */
const COW_HEADER_BYTES = 32;

function cowFloor(storePath: string, chunkBytes: number, checksum: boolean, sizeBytes: number): CowFloor {
  const storeFd = fs.openSync(storePath, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_NOFOLLOW, 0o600);
  const chunk = Buffer.allocUnsafe(chunkBytes);
  return { storeFd, chunkBytes, checksum, kept: new Uint8Array(Math.ceil(sizeBytes / chunkBytes)), endBytes: 0, chunk, header: Buffer.alloc(COW_HEADER_BYTES) };
}

/** Keep the original of every chunk of [offset, offset + length) not kept yet, as a session must before the write. */
function keepOriginals(cow: CowFloor, fd: number, sizeBytes: number, offset: number, length: number): void {
  const last = Math.floor((offset + length - 1) / cow.chunkBytes);
  for (let c = Math.floor(offset / cow.chunkBytes); c <= last; c++) {
    if (cow.kept[c] === 1) continue;
    const at = c * cow.chunkBytes;
    const data = cow.chunk.subarray(0, Math.min(cow.chunkBytes, sizeBytes - at));
    preadFullySync(fd, data, at);
    cow.header.writeUInt32LE(c, 0);
    cow.header.writeUInt32LE(data.length, 4);
    cow.header.writeUInt32LE(cow.checksum ? crc32(data) : 0, 8);
    const written = fs.writevSync(cow.storeFd, [cow.header, data], cow.endBytes);
    if (written !== cow.header.length + data.length) throw new Error('short write to the store');
    cow.endBytes += written;
    cow.kept[c] = 1;
  }
}

/** One client: handshake, then requests, parsed from one reused buffer; with `async`, transfers on the thread pool. */
function serve(socket: net.Socket, fd: number, sizeBytes: number, async: boolean, cow?: CowFloor): void {
  const socketDescriptor = socketFd(socket);
  if (socketDescriptor !== undefined) loadLibc()?.setSendBuffer(socketDescriptor, SEND_BUFFER_BYTES);
  const free = new FreeBuffers();
  const input = Buffer.allocUnsafe(READ_BUFFER_BYTES);
  let have = 0;
  // The payload of the WRITE being received, its fill and where it goes.
  const payloadBuffer = Buffer.allocUnsafe(MAX_PAYLOAD_BYTES);
  let payload: Buffer | undefined;
  let filled = 0;
  let writeAt = 0;
  // The cookie of the request being answered, as the two halves the encoders take.
  let cookieHi = 0;
  let cookieLo = 0;
  let state: 'client-flags' | 'options' | 'requests' = 'client-flags';
  let noZeroes = false;

  // The callbacks run once bytes arrive, after everything below is defined. Reads land in the
  // rest of the WRITE payload being received, or after the input not yet parsed (a view of
  // `input`, never `input` itself), so every read comes back through `placed`.
  const adopted = adoptWithReadBuffer(socket, input, {
    target: () => (payload !== undefined ? payload.subarray(filled) : input.subarray(have)),
    received: () => undefined,
    placed: (n) => {
      if (payload !== undefined) {
        filled += n;
        if (filled < payload.length) return;
        writePayload();
      } else {
        have += n;
      }
      parse();
    },
  }) ?? noHandle();
  const reply = (errno: number, data?: Buffer, hi = cookieHi, lo = cookieLo): void => {
    adopted.write(encodeSimpleReply(errno, hi, lo));
    if (data !== undefined) adopted.write(data);
  };
  const consume = (n: number): void => {
    input.copy(input, 0, n, have);
    have -= n;
  };
  const writePayload = (): void => {
    const data = payload as Buffer;
    payload = undefined;
    if (!async) {
      if (cow !== undefined) keepOriginals(cow, fd, sizeBytes, writeAt, data.length);
      pwriteFullySync(fd, data, writeAt);
      reply(0);
      return;
    }
    const [hi, lo] = [cookieHi, cookieLo];
    void pwriteFully(fd, data, writeAt).then(() => {
      free.give(data);
      reply(0, undefined, hi, lo);
    }, () => adopted.destroy());
  };
  const option = (type: number): boolean => {
    if (type === C.NBD_OPT_GO || type === C.NBD_OPT_INFO) {
      adopted.write(encodeOptionReply(type, C.NBD_REP_INFO, encodeInfoExport(sizeBytes, TRANSMISSION_FLAGS)));
      adopted.write(encodeOptionReply(type, C.NBD_REP_ACK));
      return type === C.NBD_OPT_GO;
    }
    if (type === C.NBD_OPT_EXPORT_NAME) {
      adopted.write(encodeExportNameReply(sizeBytes, TRANSMISSION_FLAGS, noZeroes));
      return true;
    }
    if (type === C.NBD_OPT_ABORT) {
      adopted.end(encodeOptionReply(type, C.NBD_REP_ACK));
      return false;
    }
    adopted.write(encodeOptionReply(type, C.NBD_REP_ERR_UNSUP));
    return false;
  };
  const request = (): boolean => {
    const type = input.readUInt16BE(6);
    cookieHi = input.readUInt32BE(8);
    cookieLo = input.readUInt32BE(12);
    const offset = Number(input.readBigUInt64BE(16));
    const length = input.readUInt32BE(24);
    if (input.readUInt32BE(0) !== C.NBD_REQUEST_MAGIC || length > MAX_PAYLOAD_BYTES || offset + length > sizeBytes) {
      adopted.destroy();
      return false;
    }
    if (type === C.NBD_CMD_WRITE) {
      const inInput = Math.min(length, have - REQUEST_HEADER_BYTES);
      payload = async ? free.take(length) : payloadBuffer.subarray(0, length);
      input.copy(payload, 0, REQUEST_HEADER_BYTES, REQUEST_HEADER_BYTES + inInput);
      consume(REQUEST_HEADER_BYTES + inInput);
      filled = inInput;
      writeAt = offset;
      if (filled === length) writePayload();
      return true;
    }
    consume(REQUEST_HEADER_BYTES);
    if (type === C.NBD_CMD_READ && async) {
      const data = free.take(length);
      const [hi, lo] = [cookieHi, cookieLo];
      void preadFully(fd, data, offset).then(() => {
        // Given back once the socket has sent it.
        adopted.write(encodeSimpleReply(0, hi, lo));
        adopted.write(data, () => free.give(data));
      }, () => adopted.destroy());
    } else if (type === C.NBD_CMD_READ) {
      const data = Buffer.allocUnsafe(length);
      preadFullySync(fd, data, offset);
      reply(0, data);
    } else if (type === C.NBD_CMD_FLUSH) {
      fs.fdatasyncSync(fd);
      reply(0);
    } else if (type === C.NBD_CMD_DISC) {
      adopted.end();
      return false;
    } else {
      reply(C.NBD_EINVAL);
    }
    return true;
  };
  const parse = (): void => {
    for (;;) {
      if (payload !== undefined) return;
      if (state === 'client-flags') {
        if (have < 4) return;
        noZeroes = (input.readUInt32BE(0) & C.NBD_FLAG_C_NO_ZEROES) !== 0;
        consume(4);
        state = 'options';
      } else if (state === 'options') {
        if (have < OPTION_HEADER_BYTES) return;
        const length = input.readUInt32BE(12);
        if (OPTION_HEADER_BYTES + length > READ_BUFFER_BYTES) {
          // More than the input buffer holds: it would never be complete.
          adopted.destroy();
          return;
        }
        if (have < OPTION_HEADER_BYTES + length) return;
        const type = input.readUInt32BE(8);
        consume(OPTION_HEADER_BYTES + length);
        if (option(type)) state = 'requests';
      } else {
        if (have < REQUEST_HEADER_BYTES || !request()) return;
      }
    }
  };

  adopted.on('error', () => adopted.destroy());
  adopted.on('end', () => adopted.end());
  adopted.write(encodeGreeting(C.NBD_FLAG_FIXED_NEWSTYLE | C.NBD_FLAG_NO_ZEROES));
  adopted.resume();
}

function openImage(imagePath: string): { fd: number; sizeBytes: number } {
  const fd = fs.openSync(imagePath, 'r+');
  return { fd, sizeBytes: fs.fstatSync(fd).size };
}

function listen(socketPath: string, imagePath: string, async: boolean, announce: boolean, cow?: { storePath: string; chunkBytes: number; checksum: boolean }): void {
  const { fd, sizeBytes } = openImage(imagePath);
  const floor = cow === undefined ? undefined : cowFloor(cow.storePath, cow.chunkBytes, cow.checksum, sizeBytes);
  const server = net.createServer({ pauseOnConnect: true, allowHalfOpen: true }, (socket) => serve(socket, fd, sizeBytes, async, floor));
  server.listen(socketPath, () => {
    if (announce) process.stderr.write(`nbd-floor: serving ${socketPath}\n`);
  });
  process.once('SIGTERM', () => process.exit(0));
}

interface ThreadData { imagePath: string; async: boolean }

/** One process accepting, `threads` worker threads serving: each connection's descriptor is duplicated and posted to the one with the fewest. */
function listenThreaded(socketPath: string, imagePath: string, async: boolean, threads: number): void {
  const libc = loadLibc();
  if (libc === undefined) throw new Error('no libc binding to duplicate descriptors with');
  const workers = Array.from({ length: threads }, () => ({ worker: new Worker(fileURLToPath(import.meta.url), { workerData: { imagePath, async } satisfies ThreadData }), connections: 0 }));
  for (const w of workers) w.worker.on('message', () => w.connections--);
  const server = net.createServer({ pauseOnConnect: true, allowHalfOpen: true }, (socket) => {
    const fd = socketFd(socket);
    if (fd === undefined) throw new Error('an accepted socket without a descriptor');
    const w = workers.reduce((a, b) => (b.connections < a.connections ? b : a));
    const copy = libc.duplicate(fd);
    socket.destroy();
    w.connections++;
    w.worker.postMessage(copy);
  });
  server.listen(socketPath, () => process.stderr.write(`nbd-floor: serving ${socketPath} from ${threads} threads${async ? ' (thread-pool I/O)' : ''}\n`));
  process.once('SIGTERM', () => process.exit(0));
}

/** A worker thread of listenThreaded: its own descriptor of the image, the connections posted to it. */
function serveThread(): void {
  const { imagePath, async } = workerData as ThreadData;
  const { fd, sizeBytes } = openImage(imagePath);
  parentPort?.on('message', (socketFdCopy: number) => {
    const socket = new net.Socket({ fd: socketFdCopy, readable: true, writable: true, allowHalfOpen: true, pauseOnCreate: true } as net.SocketConstructorOpts);
    socket.once('close', () => parentPort?.postMessage('closed'));
    serve(socket, fd, sizeBytes, async);
  });
}

function main(): void {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      processes: { type: 'string', default: '1' }, threads: { type: 'string', default: '1' }, async: { type: 'boolean', default: false },
      'cow-store': { type: 'string' }, 'chunk-size': { type: 'string', default: '16384' }, 'no-checksum': { type: 'boolean', default: false },
    },
  });
  const storePath = values['cow-store'];
  const chunkBytes = Number(values['chunk-size']);
  const processes = Number(values.processes);
  const threads = Number(values.threads);
  const async = values.async ?? false;
  const [socketPath, imagePath] = positionals;
  const count = (n: number): boolean => Number.isInteger(n) && n >= 1;
  if (socketPath === undefined || imagePath === undefined || !count(processes) || !count(threads) || (processes > 1 && threads > 1)) {
    throw new Error('usage: nbd-floor [--processes N | --threads N] [--async | --cow-store FILE [--chunk-size N] [--no-checksum]] SOCKET IMAGE');
  }
  if (storePath !== undefined && (async || processes > 1 || threads > 1 || !Number.isInteger(chunkBytes) || chunkBytes < 512)) {
    throw new Error('--cow-store: one process, one thread, synchronous I/O, a chunk size of at least 512 bytes');
  }
  const cow = storePath === undefined ? undefined : { storePath, chunkBytes, checksum: !(values['no-checksum'] ?? false) };
  if (threads > 1) {
    fs.rmSync(socketPath, { force: true });
    listenThreaded(socketPath, imagePath, async, threads);
  } else if (processes === 1) {
    fs.rmSync(socketPath, { force: true });
    listen(socketPath, imagePath, async, true, cow);
  } else if (cluster.isPrimary) {
    fs.rmSync(socketPath, { force: true });
    let listening = 0;
    for (let i = 0; i < processes; i++) {
      cluster.fork().once('listening', () => {
        if (++listening === processes) process.stderr.write(`nbd-floor: serving ${socketPath} from ${processes} processes\n`);
      });
    }
    process.once('SIGTERM', () => {
      for (const worker of Object.values(cluster.workers ?? {})) worker?.kill();
      process.exit(0);
    });
  } else {
    listen(socketPath, imagePath, async, false);
  }
}

if (!isMainThread) {
  serveThread();
} else if (process.argv[1] !== undefined && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  try {
    main();
  } catch (err) {
    process.stderr.write(`nbd-floor: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exitCode = 1;
  }
}
