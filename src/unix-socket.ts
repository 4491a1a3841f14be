/**
 * Listening on unix sockets and TCP with errors in bdsnap's terms, shared by the NBD server and
 * the daemon's control server.
 */

import fs from 'node:fs';
import net from 'node:net';
import { BdsnapError } from './errors.js';

/**
 * The descriptor of a connected socket, for the socket options Node does not expose, or
 * undefined where it cannot be had. The libuv handle keeps it in `fd` on POSIX systems.
 */
export function socketFd(socket: net.Socket): number | undefined {
  const handle = (socket as unknown as { _handle?: { fd?: unknown } | null })._handle;
  return typeof handle?.fd === 'number' && handle.fd >= 0 ? handle.fd : undefined;
}

/** Start listening (`start` calls server.listen) and wait; EBUSY if the address is taken. */
export function listenServer(server: net.Server, start: () => void): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (err: NodeJS.ErrnoException): void => {
      const code = err.code === 'EADDRINUSE' ? 'EBUSY' : err.code === 'EACCES' ? 'EPERM' : 'EIO';
      reject(new BdsnapError(code, `cannot listen: ${err.message}`, { cause: err }));
    };
    server.once('error', onError);
    server.once('listening', () => {
      server.off('error', onError);
      resolve();
    });
    start();
  });
}

/**
 * Listen on a unix socket, created mode 0600. A stale socket file (nobody listening) is
 * replaced; a live one is EBUSY; any other file there is EINVAL.
 */
export async function listenUnixSocket(server: net.Server, socketPath: string): Promise<void> {
  // Between bind(2) and the chmod below the socket has the umask's mode. Only a private
  // directory closes that window: the daemon's sockets are in its run directory, which it
  // checked with ensurePrivateDir before listening.
  await removeStaleSocket(socketPath);
  await listenServer(server, () => server.listen(socketPath));
  try {
    await fs.promises.chmod(socketPath, 0o600);
  } catch (err) {
    server.close();
    throw new BdsnapError('EPERM', `cannot restrict ${socketPath} to its owner: ${(err as Error).message}`, { cause: err });
  }
}

async function removeStaleSocket(socketPath: string): Promise<void> {
  let st: fs.Stats;
  try {
    st = await fs.promises.lstat(socketPath);
  } catch {
    return;
  }
  if (!st.isSocket()) throw new BdsnapError('EINVAL', `${socketPath} exists and is not a socket`);
  if (await unixSocketAccepts(socketPath)) throw new BdsnapError('EBUSY', `${socketPath} is in use by another server`);
  await fs.promises.rm(socketPath, { force: true });
}

/** Whether a server listens on the unix socket `socketPath` (a connection is accepted). */
export function unixSocketAccepts(socketPath: string): Promise<boolean> {
  return new Promise<boolean>((resolve) => {
    const probe = net.connect(socketPath);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
}
