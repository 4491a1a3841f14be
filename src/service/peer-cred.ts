/**
 * Who is on the other end of a unix socket. Node exposes no SO_PEERCRED, so the daemon asks
 * the kernel through `ss` (sock_diag): our accepted socket's inode names its peer's inode,
 * and the peer's line lists the processes holding it; their effective uids come from
 * /proc/<pid>/status. Every holder must pass, because a descriptor can be shared.
 *
 * This runs once per control connection (a few milliseconds), never on the data path.
 */

import { execFile } from 'node:child_process';
import fs from 'node:fs';
import type net from 'node:net';

export type PeerCheck =
  | { kind: 'known'; pids: number[]; euids: number[] }
  | { kind: 'unknown'; reason: string };

function socketFd(socket: net.Socket): number | undefined {
  // The libuv pipe handle keeps its descriptor in `fd` on POSIX systems.
  const handle = (socket as unknown as { _handle?: { fd?: unknown } })._handle;
  return typeof handle?.fd === 'number' && handle.fd >= 0 ? handle.fd : undefined;
}

function runSs(): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile('ss', ['-xpnH'], { encoding: 'utf8', maxBuffer: 32 * 1024 * 1024, timeout: 5000 }, (err, stdout) => (err ? reject(err) : resolve(stdout)));
  });
}

/** Line tail: `<local inode> <peer address> <peer inode> [users:(...)]`. */
const LINE_TAIL = /\s(\d+)\s+\S+\s+(\d+)(?:\s+users:\((.*)\))?\s*$/;

async function effectiveUid(pid: number): Promise<number | undefined> {
  try {
    const status = await fs.promises.readFile(`/proc/${pid}/status`, 'utf8');
    const m = /^Uid:\s+\d+\s+(\d+)/m.exec(status);
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}

export async function peerCredentials(socket: net.Socket): Promise<PeerCheck> {
  const fd = socketFd(socket);
  if (fd === undefined) return { kind: 'unknown', reason: 'the socket descriptor is not available' };
  let inode: string;
  try {
    const link = await fs.promises.readlink(`/proc/self/fd/${fd}`);
    const m = /^socket:\[(\d+)\]$/.exec(link);
    if (!m?.[1]) return { kind: 'unknown', reason: `descriptor ${fd} is not a socket` };
    inode = m[1];
  } catch (err) {
    return { kind: 'unknown', reason: `cannot read /proc/self/fd: ${(err as Error).message}` };
  }
  let table: string;
  try {
    table = await runSs();
  } catch (err) {
    return { kind: 'unknown', reason: `ss is not usable: ${(err as Error).message}` };
  }
  const rows = new Map<string, { peer: string; users: string }>();
  for (const line of table.split('\n')) {
    const m = LINE_TAIL.exec(line);
    if (m?.[1] && m[2]) rows.set(m[1], { peer: m[2], users: m[3] ?? '' });
  }
  const peerInode = rows.get(inode)?.peer;
  if (!peerInode || peerInode === '0') return { kind: 'unknown', reason: 'the peer socket is not listed' };
  const users = rows.get(peerInode)?.users ?? '';
  const pids = [...users.matchAll(/pid=(\d+)/g)].map((m) => Number(m[1]));
  if (pids.length === 0) return { kind: 'unknown', reason: 'no process holds the peer socket (it exited?)' };
  const euids: number[] = [];
  for (const pid of pids) {
    const euid = await effectiveUid(pid);
    if (euid === undefined) return { kind: 'unknown', reason: `process ${pid} went away` };
    euids.push(euid);
  }
  return { kind: 'known', pids, euids };
}
