/**
 * Listening on unix sockets and TCP with errors in bdsnap's terms, shared by the NBD server and
 * the daemon's control server.
 */

import fs from 'node:fs';
import net from 'node:net';
import { isMainThread } from 'node:worker_threads';
import { BdsnapError } from './errors.js';

/**
 * The descriptor of a connected socket, for the socket options Node does not expose, or
 * undefined where it cannot be had. The libuv handle keeps it in `fd` on POSIX systems.
 */
export function socketFd(socket: net.Socket): number | undefined {
  const handle = (socket as unknown as { _handle?: { fd?: unknown } | null })._handle;
  return typeof handle?.fd === 'number' && handle.fd >= 0 ? handle.fd : undefined;
}

/** Start listening (`start` calls server.listen) and wait, for what `start` returned; EBUSY if the address is taken. */
export function listenServer<T>(server: net.Server, start: () => T): Promise<T> {
  return new Promise((resolve, reject) => {
    const onError = (err: NodeJS.ErrnoException): void => {
      const code = err.code === 'EADDRINUSE' ? 'EBUSY' : err.code === 'EACCES' ? 'EPERM' : 'EIO';
      reject(new BdsnapError(code, `cannot listen: ${err.message}`, { cause: err }));
    };
    server.once('error', onError);
    server.once('listening', () => {
      server.off('error', onError);
      resolve(started);
    });
    // 'listening' comes on a later tick, after this is set.
    const started = start();
  });
}

/**
 * Listen on a unix socket, created mode 0600. A stale socket file (nobody listening) is
 * replaced; a live one is EBUSY; any other file there is EINVAL.
 */
export async function listenUnixSocket(server: net.Server, socketPath: string): Promise<void> {
  await removeStaleSocket(socketPath);
  // The socket file is born 0600: bind(2) runs inside listen() with the umask at 0177. A chmod
  // by name after bind left a window in which the file had the umask's mode (connectable by
  // everyone under umask 0), and followed a symbolic link that whoever can write the directory
  // had put in the socket's place: root then changed the mode of the file it pointed at.
  const born = await listenServer(server, () => bindOwnerOnly(() => server.listen(socketPath)));
  if (!born.ownerOnly) {
    // A worker thread cannot set the umask: the chmod, which only a private directory makes safe.
    await fs.promises.chmod(socketPath, 0o600).catch((err: unknown) => {
      server.close();
      throw new BdsnapError('EPERM', `cannot restrict ${socketPath} to its owner: ${(err as Error).message}`, { cause: err });
    });
  }
  const st = await fs.promises.lstat(socketPath).catch(() => undefined);
  if (st === undefined || !st.isSocket() || st.uid !== (process.geteuid?.() ?? st.uid)) {
    server.close();
    throw new BdsnapError('EPERM', `${socketPath} was replaced by another file as the server started; nobody could reach it there: use a directory that only this user can write`);
  }
}

/** Run `listen` (which binds a unix socket at once) with the umask at 0177, where a thread may set it. */
function bindOwnerOnly(listen: () => void): { ownerOnly: boolean } {
  if (!isMainThread) {
    listen();
    return { ownerOnly: false };
  }
  const umask = process.umask(0o177);
  try {
    listen();
  } finally {
    process.umask(umask);
  }
  return { ownerOnly: true };
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
