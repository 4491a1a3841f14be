/**
 * The control server's second line of defence: the peer's credentials from the kernel
 * (SO_PEERCRED through src/host/libc.ts), and failing closed when they cannot be read.
 * The non-root caller through the real CLI is in cli-control.test.ts.
 */

import assert from 'node:assert/strict';
import net from 'node:net';
import path from 'node:path';
import { test } from 'node:test';
import { pino } from 'pino';
import { loadLibc } from '../../src/host/libc.js';
import { ControlServer } from '../../src/service/control-server.js';
import { peerCredentials, type PeerCheck } from '../../src/service/peer-cred.js';
import { makeTempDir } from '../../testkit/files.js';

const silent = pino({ level: 'silent' });

/** Connect, send lines, collect one answer per line (5 s at most). */
async function exchange(socketPath: string, lines: object[]): Promise<Array<{ id: number | null; ok: boolean; error?: { code: string; message: string } }>> {
  const socket = net.connect(socketPath);
  let text = '';
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { socket.destroy(); reject(new Error(`no full answer: ${text}`)); }, 5000);
    socket.on('connect', () => socket.write(lines.map((l) => `${JSON.stringify(l)}\n`).join('')));
    socket.on('data', (d: Buffer) => {
      text += d.toString();
      const got = text.split('\n').filter((l) => l !== '');
      if (got.length >= lines.length) {
        clearTimeout(timer);
        socket.end();
        resolve(got.map((l) => JSON.parse(l) as { id: number | null; ok: boolean; error?: { code: string; message: string } }));
      }
    });
    socket.on('error', reject);
  });
}

test('SO_PEERCRED names this very process as the peer of its own connection', async (t) => {
  const libc = loadLibc();
  assert.ok(libc, 'koffi is a dependency of the project and must load here');
  const dir = makeTempDir(t);
  const socketPath = path.join(dir, 's.sock');
  const seen = new Promise<PeerCheck>((resolve) => {
    const server = net.createServer((s) => { resolve(peerCredentials(s)); s.destroy(); server.close(); });
    server.listen(socketPath, () => net.connect(socketPath).on('error', () => undefined));
  });
  const check = await seen;
  assert.deepEqual(check, { kind: 'known', cred: { pid: process.pid, uid: process.geteuid?.(), gid: process.getegid?.() } });
  assert.throws(() => libc.peerCred(1 << 20), /getsockopt\(SO_PEERCRED\).*errno 9/);
  const unknown = peerCredentials(new net.Socket(), libc);
  assert.deepEqual(unknown, { kind: 'unknown', reason: 'the socket descriptor is not available' });
});

test('without the kernel\'s answer the control server fails closed: ping only', async (t) => {
  const dir = makeTempDir(t);
  const socketPath = path.join(dir, 'run', 'control.sock');
  const handled: string[] = [];
  const server = await ControlServer.listen(socketPath, async (r) => { handled.push(r.op); return r.op === 'ping' ? { pong: true } : {}; }, silent,
    () => ({ kind: 'unknown', reason: 'no binding in this test' }));
  t.after(() => server.close());
  const answers = await exchange(socketPath, [{ id: 1, op: 'ping' }, { id: 2, op: 'status' }, { id: 3, op: 'activate', device: '/x', password: 'p' }]);
  assert.deepEqual(answers.map((a) => [a.id, a.ok, a.error?.code]), [[1, true, undefined], [2, false, 'EPERM'], [3, false, 'EPERM']]);
  assert.match(answers[1]?.error?.message ?? '', /cannot verify the caller's credentials \(no binding in this test\); install the optional dependency koffi/);
  assert.deepEqual(handled, ['ping'], 'refused requests never reach the handler');
});

test('a peer the kernel names as another uid is refused; a throwing source counts as unknown', async (t) => {
  const dir = makeTempDir(t);
  const other = await ControlServer.listen(path.join(dir, 'a', 'control.sock'), async () => ({}), silent,
    () => ({ kind: 'known', cred: { pid: 1, uid: 4242, gid: 4242 } }));
  t.after(() => other.close());
  const [refused] = await exchange(other.socketPath, [{ id: 1, op: 'ping' }]);
  assert.deepEqual([refused?.ok, refused?.error?.code], [false, 'EPERM']);
  const throwing = await ControlServer.listen(path.join(dir, 'b', 'control.sock'), async () => ({}), silent,
    () => { throw new Error('boom'); });
  t.after(() => throwing.close());
  const [denied] = await exchange(throwing.socketPath, [{ id: 1, op: 'status' }]);
  assert.deepEqual([denied?.ok, denied?.error?.code], [false, 'EPERM']);
  const real = await ControlServer.listen(path.join(dir, 'c', 'control.sock'), async () => ({ fine: true }), silent);
  t.after(() => real.close());
  const [allowed] = await exchange(real.socketPath, [{ id: 1, op: 'status' }]);
  assert.equal(allowed?.ok, true, JSON.stringify(allowed));
});
