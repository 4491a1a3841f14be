/**
 * A connection's socket that reads into one reused buffer, or straight into the WRITE payload
 * being received (see adoptWithReadBuffer).
 */

import net from 'node:net';

/** Socket write buffer size at which replies stop being produced until 'drain'. */
export const SOCKET_HIGH_WATER_MARK_BYTES = 4 * 1024 * 1024;
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
