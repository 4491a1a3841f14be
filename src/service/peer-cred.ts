/**
 * Who is on the other end of an accepted control connection, from the kernel: SO_PEERCRED on
 * the socket's descriptor gives the effective uid, gid and pid the peer had when it called
 * connect(). Nothing the peer sends, and no text another process can shape (a process name,
 * a bound socket path), enters the decision.
 *
 * Node has no binding for SO_PEERCRED, so it comes from libc through src/host/libc.ts (koffi,
 * an optional dependency). One call costs about 5 µs after a one-time load of about 20 ms.
 * Where the binding is missing the answer is 'unknown' and the control server fails closed.
 */

import type net from 'node:net';
import { loadLibc, libcUnavailableReason, type Libc, type PeerCred } from '../host/libc.js';
import { socketFd } from '../unix-socket.js';

export type PeerCheck =
  | { kind: 'known'; cred: PeerCred }
  | { kind: 'unknown'; reason: string };

/** How the control server learns its peers; tests replace it to exercise the fail-closed path. */
export type PeerCredentialSource = (socket: net.Socket) => PeerCheck;

/** The peer's credentials as the kernel recorded them, or why they cannot be had. */
export function peerCredentials(socket: net.Socket, libc: Libc | undefined = loadLibc()): PeerCheck {
  if (libc === undefined) return { kind: 'unknown', reason: libcUnavailableReason() ?? 'libc is not available' };
  const fd = socketFd(socket);
  if (fd === undefined) return { kind: 'unknown', reason: 'the socket descriptor is not available' };
  try {
    return { kind: 'known', cred: libc.peerCred(fd) };
  } catch (err) {
    return { kind: 'unknown', reason: (err as Error).message };
  }
}
