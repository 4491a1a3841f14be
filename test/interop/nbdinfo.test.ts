/**
 * nbdinfo (libnbd) against `bdsnap serve`: what the server advertises (size, flags, block
 * sizes, structured replies, base:allocation), the allocation map, the export list, the
 * default export, refusal of unknown exports, and a clean exit on SIGTERM.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { CleanupStack } from '../../testkit/cleanup.js';
import { makeImage, makeTempDir, sha256File } from '../../testkit/files.js';
import { run } from '../../testkit/process.js';
import { needs } from '../../testkit/needs.js';
import { BDSNAP_MAIN, startServer } from '../../testkit/server.js';

interface NbdinfoExport {
  'export-name': string;
  'export-size': number;
  contexts?: string[];
  is_read_only: boolean;
  can_flush: boolean;
  can_fua: boolean;
  can_trim: boolean;
  can_zero: boolean;
  can_multi_conn: boolean;
  block_size_minimum?: number;
  block_size_preferred?: number;
  block_size_maximum?: number;
}

interface NbdinfoJson {
  protocol: string;
  structured: boolean;
  exports: NbdinfoExport[];
}

interface MapEntry {
  offset: number;
  length: number;
  type: number;
}

const isPowerOfTwo = (n: number): boolean => Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;

async function nbdinfoJson(args: string[]): Promise<NbdinfoJson> {
  const result = await run('nbdinfo', ['--json', ...args]);
  try {
    return JSON.parse(result.stdout) as NbdinfoJson;
  } catch (err) {
    throw new Error(`nbdinfo --json printed something that is not JSON: ${result.stdout}`, { cause: err });
  }
}

function onlyExport(info: NbdinfoJson): NbdinfoExport {
  assert.equal(info.exports.length, 1, `one export expected: ${JSON.stringify(info)}`);
  return info.exports[0] as NbdinfoExport;
}

test('nbdinfo --json: size, flags, block sizes, structured replies and base:allocation', async (t) => {
  if (!needs(t, { tools: ['nbdinfo'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup);
  const image = path.join(dir, 'info.img');
  const sizeBytes = 24 << 20;
  makeImage(image, sizeBytes, 'blocks');
  const server = await startServer(cleanup, { images: [image] });

  const info = await nbdinfoJson([server.uri(image)]);
  assert.equal(info.protocol, 'newstyle-fixed');
  assert.equal(info.structured, true, 'structured replies negotiated');
  const exp = onlyExport(info);
  assert.equal(exp['export-name'], image);
  assert.equal(exp['export-size'], sizeBytes);
  assert.equal(exp.is_read_only, false);
  assert.equal(exp.can_flush, true);
  assert.equal(exp.can_fua, true);
  assert.equal(exp.can_trim, true);
  assert.equal(exp.can_zero, true);
  assert.equal(exp.can_multi_conn, true);
  assert.ok(exp.contexts?.includes('base:allocation'), `base:allocation offered: ${JSON.stringify(exp.contexts)}`);

  const { block_size_minimum: min, block_size_preferred: preferred, block_size_maximum: max } = exp;
  assert.ok(min !== undefined && preferred !== undefined && max !== undefined, `block sizes advertised: ${JSON.stringify(exp)}`);
  assert.ok(isPowerOfTwo(min) && min <= 4096, `minimum block size ${min}`);
  assert.ok(isPowerOfTwo(preferred) && preferred >= min, `preferred block size ${preferred}`);
  assert.ok(max >= preferred && max >= 1 << 20 && max <= 0xffffffff, `maximum block size ${max}`);

  const size = await run('nbdinfo', ['--size', server.uri(image)]);
  assert.equal(size.stdout.trim(), String(sizeBytes));
});

test('nbdinfo with --read-only reports is_read_only', async (t) => {
  if (!needs(t, { tools: ['nbdinfo'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup);
  const image = path.join(dir, 'ro.img');
  makeImage(image, 1 << 20, 'blocks');
  const server = await startServer(cleanup, { images: [image], readOnly: true });
  const exp = onlyExport(await nbdinfoJson([server.uri(image)]));
  assert.equal(exp.is_read_only, true);
  assert.equal(exp['export-size'], 1 << 20);
});

test('nbdinfo --map: contiguous extents over the whole export, data never reported as zero', async (t) => {
  if (!needs(t, { tools: ['nbdinfo'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup);
  const image = path.join(dir, 'map.img');
  const sizeBytes = 8 << 20;
  makeImage(image, sizeBytes, 'blocks');
  const server = await startServer(cleanup, { images: [image] });

  const text = await run('nbdinfo', ['--map', server.uri(image)]);
  assert.match(text.stdout, /^\s*0\s+\d+\s+\d+/m, `--map prints offset, length, type: ${text.stdout}`);

  const json = await run('nbdinfo', ['--map', '--json', server.uri(image)]);
  const entries = JSON.parse(json.stdout) as MapEntry[];
  assert.ok(entries.length >= 1);
  let expectedOffset = 0;
  for (const entry of entries) {
    assert.equal(entry.offset, expectedOffset, `extents are contiguous: ${json.stdout}`);
    assert.ok(entry.length > 0);
    assert.ok(entry.type >= 0 && entry.type <= 3, `base:allocation type ${entry.type}`);
    // Every block of this image holds non-zero bytes: calling any of it "zero" would lose data.
    assert.equal(entry.type & 2, 0, `extent at ${entry.offset} claims zeroes over data: ${json.stdout}`);
    expectedOffset += entry.length;
  }
  assert.equal(expectedOffset, sizeBytes, 'the map covers the whole export');

  // --totals sums the map; all of it must be data (type 0).
  const totals = await run('nbdinfo', ['--map', '--totals', server.uri(image)]);
  assert.match(totals.stdout, new RegExp(`^\\s*${sizeBytes}\\s+100\\.0%\\s+0\\s+data`, 'm'), totals.stdout);
});

test('nbdinfo --map: the holes of a sparse image are holes that read as zeroes, its data is data', async (t) => {
  if (!needs(t, { tools: ['nbdinfo'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup);
  const image = path.join(dir, 'sparse.img');
  const MiB = 1 << 20;
  // Data at [1 MiB, 2 MiB) and [5 MiB, 6 MiB) of 8 MiB; the rest never written.
  fs.writeFileSync(image, '');
  fs.truncateSync(image, 8 * MiB);
  const fd = fs.openSync(image, 'r+');
  fs.writeSync(fd, Buffer.alloc(MiB, 0x5a), 0, MiB, MiB);
  fs.writeSync(fd, Buffer.alloc(MiB, 0xa5), 0, MiB, 5 * MiB);
  fs.closeSync(fd);
  const server = await startServer(cleanup, { images: [image], readOnly: true });

  const json = await run('nbdinfo', ['--map', '--json', server.uri(image)]);
  const entries = (JSON.parse(json.stdout) as MapEntry[]).map((e) => [e.offset / MiB, e.length / MiB, e.type]);
  assert.deepEqual(entries, [[0, 1, 3], [1, 1, 0], [2, 3, 3], [5, 1, 0], [6, 2, 3]], json.stdout);
});

test('nbdinfo --list shows every export; the empty name selects the first; unknown names are refused', async (t) => {
  if (!needs(t, { tools: ['nbdinfo'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup);
  const first = path.join(dir, 'first.img');
  const second = path.join(dir, 'second disk.img');
  makeImage(first, 2 << 20, 'blocks');
  makeImage(second, 3 << 20, 'random');
  const server = await startServer(cleanup, { images: [first, second] });

  const listed = await nbdinfoJson(['--list', server.uri()]);
  const byName = new Map(listed.exports.map((e) => [e['export-name'], e]));
  assert.deepEqual([...byName.keys()].sort(), [first, second].sort(), `exports listed: ${JSON.stringify(listed)}`);
  assert.equal(byName.get(first)?.['export-size'], 2 << 20);
  assert.equal(byName.get(second)?.['export-size'], 3 << 20);

  const plain = await run('nbdinfo', ['--list', server.uri()]);
  assert.ok(plain.stdout.includes(first) && plain.stdout.includes(second), plain.stdout);

  // A name with a space goes through URI encoding and still selects the right export.
  assert.equal(onlyExport(await nbdinfoJson([server.uri(second)]))['export-size'], 3 << 20);
  assert.equal(onlyExport(await nbdinfoJson([server.uri('')]))['export-size'], 2 << 20, 'the empty export name selects the first image');

  const unknown = await run('nbdinfo', ['--json', server.uri(path.join(dir, 'not-served.img'))], { allowFailure: true });
  assert.notEqual(unknown.exitCode, 0, `an unknown export name is refused: ${unknown.stdout}`);
  assert.match(unknown.stderr, /export|not found|unknown|unavailable|refused|UNKNOWN/i, unknown.stderr);

  // Refusals are per option: the server is still there for the next client.
  assert.equal(onlyExport(await nbdinfoJson([server.uri(first)]))['export-size'], 2 << 20);
});

test('the server exits 0 on SIGTERM and leaves the image as it was', async (t) => {
  if (!needs(t, { tools: ['nbdinfo'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup);
  const image = path.join(dir, 'term.img');
  makeImage(image, 1 << 20, 'random', 9);
  const before = await sha256File(image);
  const server = await startServer(cleanup, { images: [image] });
  await run('nbdinfo', ['--size', server.uri(image)]);
  const stopped = await server.stop();
  assert.equal(stopped.killed, false, `stopped by SIGTERM without SIGKILL:\n${server.stderr()}`);
  assert.equal(stopped.exitCode, 0, `a graceful exit after SIGTERM: ${JSON.stringify(stopped)}\n${server.stderr()}`);
  assert.equal(await sha256File(image), before);
});

test('the unix socket is not world-accessible and is removed on exit', async (t) => {
  if (!needs(t, { tools: ['nbdinfo'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup);
  const image = path.join(dir, 'perm.img');
  makeImage(image, 1 << 20, 'blocks');
  const socketPath = path.join(dir, 'nbd.sock');
  const server = await startServer(cleanup, { images: [image], socketPath });
  const stat = fs.statSync(socketPath);
  assert.ok(stat.isSocket());
  assert.equal(stat.mode & 0o007, 0, `socket mode ${(stat.mode & 0o777).toString(8)} gives access to everyone`);
  const stopped = await server.stop();
  assert.deepEqual(stopped, { exitCode: 0, signal: null, killed: false }, server.stderr());
  assert.equal(fs.existsSync(socketPath), false, 'the socket file is gone after a clean exit');
});

test('--listen --insecure-tcp serves the same exports over TCP, and SIGINT exits 0', async (t) => {
  if (!needs(t, { tools: ['nbdinfo'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup);
  const image = path.join(dir, 'tcp.img');
  makeImage(image, 3 << 20, 'blocks');
  const port = await freePort();
  const server = await startServer(cleanup, { images: [image], extraArgs: ['--listen', `127.0.0.1:${port}`, '--insecure-tcp'] });
  const name = image.split('/').map(encodeURIComponent).join('/');
  const info = onlyExport(await nbdinfoJson([`nbd://127.0.0.1:${port}/${name}`]));
  assert.equal(info['export-size'], 3 << 20);
  process.kill(server.pid, 'SIGINT');
  const exited = await server.waitForExit(10_000);
  assert.deepEqual(exited, { exitCode: 0, signal: null }, `exit after SIGINT:\n${server.stderr()}`);
});

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = net.createServer();
    probe.once('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const address = probe.address();
      probe.close(() => (typeof address === 'object' && address !== null ? resolve(address.port) : reject(new Error('no port'))));
    });
  });
}

test('a live socket is never taken over; a stale one left by a killed server is replaced', async (t) => {
  if (!needs(t, { tools: ['nbdinfo'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup);
  const first = path.join(dir, 'first.img');
  const second = path.join(dir, 'second.img');
  makeImage(first, 1 << 20, 'blocks');
  makeImage(second, 2 << 20, 'blocks');
  const socketPath = path.join(dir, 'shared.sock');
  const server = await startServer(cleanup, { images: [first], socketPath });
  const intruder = await run(process.execPath, [BDSNAP_MAIN, 'serve', '--socket', socketPath, second], { allowFailure: true, timeoutMs: 15_000 });
  assert.notEqual(intruder.exitCode, 0, 'a second server on a socket in use fails');
  assert.match(intruder.stderr, /in use|EADDRINUSE|already/i, intruder.stderr);
  assert.equal((await run('nbdinfo', ['--size', server.uri()])).stdout.trim(), String(1 << 20), 'the first server still owns the socket');

  process.kill(server.pid, 'SIGKILL');
  await server.waitForExit(10_000);
  assert.ok(fs.existsSync(socketPath), 'SIGKILL leaves the socket file behind');
  const successor = await startServer(cleanup, { images: [second], socketPath });
  assert.equal((await run('nbdinfo', ['--size', successor.uri()])).stdout.trim(), String(2 << 20));
});
