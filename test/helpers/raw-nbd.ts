/**
 * A deliberately naive NBD client for tests that real clients refuse to send: unknown
 * commands, unknown flags, requests past the end, write payloads the server must discard.
 * It is independent of the project's own codec on purpose, so a shared misreading of the
 * specification cannot make both sides agree. Fixed newstyle, NBD_OPT_GO, simple replies
 * only; one request at a time.
 */

import net from 'node:net';

export const NBD_MAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const IHAVEOPT = 0x49484156454f5054n;
export const NBD_OPT_REPLY_MAGIC = 0x3e889045565a9n;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1;
export const NBD_FLAG_C_NO_ZEROES = 2;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_GO = 7;
export const NBD_REP_ACK = 1;
export const NBD_REP_INFO = 3;
export const NBD_REP_FLAG_ERROR = 0x80000000;
export const NBD_INFO_EXPORT = 0;
export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_FLAG_READ_ONLY = 1 << 1;

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

export interface SimpleReply {
  error: number;
  cookie: bigint;
  data: Buffer;
}

/** Buffers socket bytes and hands out exact-length reads; fails on EOF or timeout. */
class ByteReader {
  #chunks: Buffer[] = [];
  #available = 0;
  #ended = false;
  #endError: Error | undefined;
  #wake: (() => void) | undefined;

  constructor(socket: net.Socket) {
    socket.on('data', (b: Buffer) => {
      this.#chunks.push(b);
      this.#available += b.length;
      this.#wake?.();
    });
    socket.on('end', () => {
      this.#ended = true;
      this.#wake?.();
    });
    socket.on('error', (e) => {
      this.#ended = true;
      this.#endError = e;
      this.#wake?.();
    });
    socket.on('close', () => {
      this.#ended = true;
      this.#wake?.();
    });
  }

  get ended(): boolean {
    return this.#ended && this.#available === 0;
  }

  async read(lengthBytes: number, timeoutMs: number): Promise<Buffer> {
    const deadlineMs = Date.now() + timeoutMs;
    while (this.#available < lengthBytes) {
      if (this.#ended) {
        throw new Error(`connection closed with ${this.#available} of ${lengthBytes} bytes read${this.#endError ? `: ${this.#endError.message}` : ''}`);
      }
      if (!(await this.#sleepUntilWoken(deadlineMs))) throw new Error(`timed out waiting for ${lengthBytes} bytes (have ${this.#available})`);
    }
    const all = Buffer.concat(this.#chunks);
    this.#chunks = [all.subarray(lengthBytes)];
    this.#available -= lengthBytes;
    return all.subarray(0, lengthBytes);
  }

  /** Resolves true once the peer has closed the connection (within the timeout). */
  async waitForEnd(timeoutMs: number): Promise<boolean> {
    const deadlineMs = Date.now() + timeoutMs;
    while (!this.#ended) {
      if (!(await this.#sleepUntilWoken(deadlineMs))) return false;
    }
    return true;
  }

  /** Wait for incoming data or the end; false if the deadline had already passed. */
  async #sleepUntilWoken(deadlineMs: number): Promise<boolean> {
    const waitMs = deadlineMs - Date.now();
    if (waitMs <= 0) return false;
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, waitMs);
      this.#wake = () => {
        clearTimeout(timer);
        resolve();
      };
    });
    this.#wake = undefined;
    return true;
  }
}

export class RawNbdClient {
  readonly #socket: net.Socket;
  readonly #reader: ByteReader;
  readonly #timeoutMs: number;
  #nextCookie = 1n;
  /** Export size and transmission flags, after a successful go(). */
  exportSize = 0n;
  transmissionFlags = 0;

  private constructor(socket: net.Socket, timeoutMs: number) {
    this.#socket = socket;
    this.#reader = new ByteReader(socket);
    this.#timeoutMs = timeoutMs;
  }

  /** Connect and do the fixed-newstyle greeting (no options yet). */
  static async connect(socketPath: string, timeoutMs = 10_000): Promise<RawNbdClient> {
    const socket = await new Promise<net.Socket>((resolve, reject) => {
      const s = net.createConnection(socketPath);
      s.once('connect', () => resolve(s));
      s.once('error', reject);
    });
    const client = new RawNbdClient(socket, timeoutMs);
    const greeting = await client.#read(18);
    if (greeting.readBigUInt64BE(0) !== NBD_MAGIC) throw new Error(`bad server magic ${greeting.subarray(0, 8).toString('hex')}`);
    if (greeting.readBigUInt64BE(8) !== IHAVEOPT) throw new Error(`server is not newstyle: ${greeting.subarray(8, 16).toString('hex')}`);
    const handshakeFlags = greeting.readUInt16BE(16);
    const clientFlags = NBD_FLAG_C_FIXED_NEWSTYLE | (handshakeFlags & NBD_FLAG_C_NO_ZEROES);
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(clientFlags);
    client.#socket.write(flags);
    return client;
  }

  #read(lengthBytes: number): Promise<Buffer> {
    return this.#reader.read(lengthBytes, this.#timeoutMs);
  }

  sendOption(option: number, data: Buffer = Buffer.alloc(0)): void {
    const header = Buffer.alloc(16);
    header.writeBigUInt64BE(IHAVEOPT, 0);
    header.writeUInt32BE(option, 8);
    header.writeUInt32BE(data.length, 12);
    this.#socket.write(Buffer.concat([header, data]));
  }

  async readOptionReply(): Promise<OptionReply> {
    const header = await this.#read(20);
    const magic = header.readBigUInt64BE(0);
    if (magic !== NBD_OPT_REPLY_MAGIC) throw new Error(`bad option reply magic 0x${magic.toString(16)}`);
    const lengthBytes = header.readUInt32BE(16);
    if (lengthBytes > 1 << 20) throw new Error(`option reply too long: ${lengthBytes}`);
    return { option: header.readUInt32BE(8), type: header.readUInt32BE(12), data: await this.#read(lengthBytes) };
  }

  /**
   * NBD_OPT_GO for `exportName`. Returns the final reply: NBD_REP_ACK on success (export
   * size and flags are then set), or the error reply (type with NBD_REP_FLAG_ERROR).
   */
  async go(exportName: string): Promise<OptionReply> {
    const name = Buffer.from(exportName, 'utf8');
    const data = Buffer.alloc(4 + name.length + 2);
    data.writeUInt32BE(name.length, 0);
    name.copy(data, 4);
    data.writeUInt16BE(0, 4 + name.length);
    this.sendOption(NBD_OPT_GO, data);
    for (;;) {
      const reply = await this.readOptionReply();
      if (reply.option !== NBD_OPT_GO) throw new Error(`reply for option ${reply.option}, expected NBD_OPT_GO`);
      if (reply.type === NBD_REP_INFO && reply.data.length >= 2 && reply.data.readUInt16BE(0) === NBD_INFO_EXPORT) {
        if (reply.data.length !== 12) throw new Error(`NBD_INFO_EXPORT of ${reply.data.length} bytes, expected 12`);
        this.exportSize = reply.data.readBigUInt64BE(2);
        this.transmissionFlags = reply.data.readUInt16BE(10);
        continue;
      }
      if (reply.type === NBD_REP_INFO) continue;
      return reply;
    }
  }

  /** Send one request (with its payload, if any) and return its cookie. */
  sendRequest(type: number, offsetBytes: bigint, lengthBytes: number, flags = 0, payload?: Buffer): bigint {
    const cookie = this.#nextCookie++;
    const header = Buffer.alloc(28);
    header.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
    header.writeUInt16BE(flags, 4);
    header.writeUInt16BE(type, 6);
    header.writeBigUInt64BE(cookie, 8);
    header.writeBigUInt64BE(offsetBytes, 16);
    header.writeUInt32BE(lengthBytes, 24);
    this.#socket.write(payload ? Buffer.concat([header, payload]) : header);
    return cookie;
  }

  /** Stop reading from the socket: replies then pile up on the server's side (a client that never reads). */
  stopReading(): void {
    this.#socket.pause();
  }

  /** Write bytes as they are (to break framing on purpose). */
  sendRaw(bytes: Buffer): void {
    this.#socket.write(bytes);
  }

  /** Read one simple reply; `dataBytes` of payload follow it only for a successful read. */
  async readSimpleReply(dataBytes = 0): Promise<SimpleReply> {
    const header = await this.#read(16);
    const magic = header.readUInt32BE(0);
    if (magic !== NBD_SIMPLE_REPLY_MAGIC) throw new Error(`expected a simple reply, got magic 0x${magic.toString(16)}`);
    const error = header.readUInt32BE(4);
    const cookie = header.readBigUInt64BE(8);
    const data = error === 0 && dataBytes > 0 ? await this.#read(dataBytes) : Buffer.alloc(0);
    return { error, cookie, data };
  }

  /** One request, one reply. */
  async request(type: number, offsetBytes: bigint, lengthBytes: number, flags = 0, payload?: Buffer): Promise<SimpleReply> {
    const cookie = this.sendRequest(type, offsetBytes, lengthBytes, flags, payload);
    const reply = await this.readSimpleReply(type === NBD_CMD_READ ? lengthBytes : 0);
    if (reply.cookie !== cookie) throw new Error(`reply cookie ${reply.cookie} for request ${cookie}`);
    return reply;
  }

  waitForEnd(timeoutMs = this.#timeoutMs): Promise<boolean> {
    return this.#reader.waitForEnd(timeoutMs);
  }

  /** NBD_CMD_DISC, then close. */
  async disconnect(): Promise<void> {
    if (!this.#socket.destroyed) {
      this.sendRequest(NBD_CMD_DISC, 0n, 0);
      await new Promise<void>((resolve) => this.#socket.end(resolve));
    }
    this.#socket.destroy();
  }

  destroy(): void {
    this.#socket.destroy();
  }
}
