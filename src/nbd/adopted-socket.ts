/**
 * A connection's socket that reads into one reused buffer, or straight into the WRITE payload
 * being received (see adoptWithReadBuffer), and the TLS socket that takes it over after
 * STARTTLS, made to read the same way (readTlsInto).
 */

import net from 'node:net';
import type tls from 'node:tls';

/** Socket write buffer size at which replies stop being produced until 'drain'. */
export const SOCKET_HIGH_WATER_MARK_BYTES = 4 * 1024 * 1024;
/** How a listener of NBD clients makes its sockets: paused until adopted (adoptWithReadBuffer), replies buffered up to SOCKET_HIGH_WATER_MARK_BYTES. */
export const LISTENER_OPTIONS: net.ServerOpts = {
  allowHalfOpen: true, noDelay: true, pauseOnConnect: true, highWaterMark: SOCKET_HIGH_WATER_MARK_BYTES,
};
/** Per-connection receive buffer, reused for every read from the socket. */
export const READ_BUFFER_BYTES = 256 * 1024;

type SocketInternals = net.Socket & { _handle?: object | null };

/** Where an adopted socket reads: `target()` if it gives a buffer (then `placed`), else the shared buffer (then `received`). */
export interface ReadSink {
  target(): Buffer | undefined;
  received(n: number): void;
  placed(n: number): void;
}

/**
 * Move an accepted (paused) socket's handle into a socket that reads into one reused buffer
 * (`onread`), which net.Server cannot do itself. Reading into fresh 64 KiB buffers, a 1 MiB
 * write would cost sixteen allocations of external memory and the garbage collections they
 * trigger. While a WRITE payload is being received, reads go straight into it instead, which
 * saves copying it out of the shared buffer. Relies on the long-stable `_handle` field; returns undefined (and leaves the
 * socket alone) where it is missing, and the caller reads the ordinary way.
 */
export function adoptWithReadBuffer(socket: net.Socket, buffer: Buffer, reads: ReadSink): net.Socket | undefined {
  const original = socket as SocketInternals;
  const handle = original._handle;
  if (!handle || process.env.BDSNAP_NBD_PLAIN_READS) return undefined;
  original._handle = null;
  const adopted = new net.Socket({
    handle,
    allowHalfOpen: true,
    readable: true,
    writable: true,
    writableHighWaterMark: SOCKET_HIGH_WATER_MARK_BYTES,
    onread: {
      // Asked before every read: a WRITE payload being received takes the bytes directly.
      buffer: () => reads.target() ?? buffer,
      callback: (n: number, into: Uint8Array) => {
        if (into === buffer) reads.received(n);
        else reads.placed(n);
      },
    },
  } as net.SocketConstructorOpts);
  adopted.setNoDelay(true);
  // The original still counts as the server's connection: end it with the adopted one.
  adopted.once('close', () => original.destroy());
  return adopted;
}

/** The fields of net.Socket that `onread` sets (internal symbols, found by their names). */
const USER_BUFFER_FIELDS = ['kBuffer', 'kBufferGen', 'kBufferCb'] as const;

/**
 * Make a TLS socket that took over an adopted one read as the adopted one did: decrypted bytes
 * go into `reads.target()` or the shared buffer, not into a fresh Buffer per TLS record pushed
 * through the stream and copied out again (an allocation, a copy and garbage for every 16 KiB);
 * and pausing it stops its reads, where its stream would read ahead up to its high-water mark
 * (the one the connection gives it, 4 MiB), past the connection's in-flight cap. A TLSSocket
 * built around an existing socket ignores `onread`, so this sets what net.Socket
 * sets from it: the stream's three user-buffer fields and the handle's user buffer. Returns
 * false and changes nothing where those internals are not as expected; the socket then reads
 * the ordinary way. Call it before the socket starts reading (in the turn it was made).
 */
export function readTlsInto(secure: tls.TLSSocket, buffer: Buffer, reads: ReadSink): boolean {
  const fields = new Map(Object.getOwnPropertySymbols(secure).map((s) => [s.description, s]));
  const [kBuffer, kBufferGen, kBufferCb] = USER_BUFFER_FIELDS.map((name) => fields.get(name));
  const s = secure as unknown as Record<symbol, unknown>;
  const handle = (secure as SocketInternals)._handle as { useUserBuffer?: (buf: Uint8Array) => void } | null | undefined;
  if (!kBuffer || !kBufferGen || !kBufferCb || s[kBuffer] || s[kBufferGen] !== null || s[kBufferCb] !== null) return false;
  if (typeof handle?.useUserBuffer !== 'function') return false;
  // TLS copies each decrypted record into the buffer in a loop that never ends on an empty one.
  const next = (): Buffer => {
    const target = reads.target();
    return target !== undefined && target.length > 0 ? target : buffer;
  };
  s[kBufferGen] = next;
  s[kBufferCb] = (n: number, into: Uint8Array) => {
    if (into === buffer) reads.received(n);
    else reads.placed(n);
  };
  const first = next();
  s[kBuffer] = first;
  handle.useUserBuffer(first);
  return true;
}
