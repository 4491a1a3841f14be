/**
 * Real NBD clients writing to an activated device through `bdsnap daemon`: every attach is
 * a copy-before-write session, and `bdsnap restore` of the oldest session gives back the
 * image exactly (sha256), whatever qemu and nbdcopy (four connections) did to it. Restore
 * refuses while a client is attached, and --output leaves the device alone.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { CleanupStack } from '../../testkit/cleanup.js';
import { startDaemon, type RunningDaemon } from '../../testkit/daemon.js';
import { makeImage, makeTempDir, sha256File } from '../../testkit/files.js';
import { run } from '../../testkit/process.js';
import { needs } from '../../testkit/needs.js';
import { NBD_CMD_WRITE, RawNbdClient } from '../helpers/raw-nbd.js';

const IMAGE_BYTES = 16 << 20;

interface SessionInfo {
  dir: string;
  device: string;
  state: string;
}

async function sessions(daemon: RunningDaemon, device: string): Promise<SessionInfo[]> {
  const listed = await daemon.cli(['list', device, '--json']);
  return (JSON.parse(listed.stdout) as { sessions: SessionInfo[] }).sessions;
}

/** Sessions end asynchronously after the last client leaves; wait until all are closed. */
async function waitForClosedSessions(daemon: RunningDaemon, device: string, count: number): Promise<SessionInfo[]> {
  const deadlineMs = Date.now() + 15_000;
  for (;;) {
    const list = await sessions(daemon, device);
    if (list.length === count && list.every((s) => s.state === 'complete')) return list;
    if (Date.now() > deadlineMs) throw new Error(`expected ${count} complete sessions, have ${JSON.stringify(list)}\n${daemon.server.stderr()}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

test('qemu-io and nbdcopy through sessions, then restore gives back the exact image', { timeout: 180_000 }, async (t) => {
  if (!needs(t, { root: true, tools: ['qemu-io', 'nbdcopy'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup);
  const image = path.join(dir, 'protected.img');
  makeImage(image, IMAGE_BYTES, 'random', 77);
  const original = await sha256File(image);
  const daemon = await startDaemon(cleanup, { activate: [image] });
  const device = daemon.server.exportNames[0] as string;
  const uri = daemon.server.uri(device);

  // Session 1: qemu, all kinds of modifying requests.
  await run('qemu-io', ['-f', 'raw', uri,
    '-c', 'write -P 0xab 0 1M', '-c', 'write -f -P 0xcd 3M 64k', '-c', 'write -P 0x11 6291453 7',
    '-c', 'write -z 8M 512k', '-c', 'discard 10M 1M', '-c', `write -P 0x77 ${IMAGE_BYTES - 4096} 4k`]);
  await waitForClosedSessions(daemon, device, 1);

  // Session 2: nbdcopy over four connections (one attach, one session).
  const source = path.join(dir, 'source.img');
  makeImage(source, IMAGE_BYTES, 'blocks');
  await run('nbdcopy', ['--connections', '4', '--flush', source, uri]);
  assert.equal(await sha256File(image), await sha256File(source), 'nbdcopy reached the image');
  const closed = await waitForClosedSessions(daemon, device, 2);
  const oldest = [...closed].sort((a, b) => a.dir.localeCompare(b.dir))[0] as SessionInfo;
  for (const s of closed) assert.ok(fs.statSync(s.dir).isDirectory() && s.dir.startsWith(daemon.snapshotRoot), `session dir ${s.dir}`);

  // Restore refuses while a client is attached (and writing starts a third session).
  const client = await RawNbdClient.connect(daemon.server.socketPath);
  cleanup.after(() => client.destroy());
  await client.go(device);
  assert.equal((await client.request(NBD_CMD_WRITE, 0n, 4096, 0, Buffer.alloc(4096, 0x99))).error, 0);
  const refused = await daemon.cli(['restore', oldest.dir], undefined, true);
  assert.notEqual(refused.exitCode, 0, `restore while attached must fail:\n${refused.stdout}`);
  assert.match(refused.stderr, /attach|in use|busy|mounted|already open/i, refused.stderr);
  await client.disconnect();
  await waitForClosedSessions(daemon, device, 3);

  // --output writes a restored copy and leaves the device as it is.
  const before = await sha256File(image);
  const copy = path.join(dir, 'restored-copy.img');
  await daemon.cli(['restore', oldest.dir, '--output', copy]);
  assert.equal(await sha256File(copy), original, 'the restored copy equals the image before session 1');
  assert.equal(await sha256File(image), before, '--output did not touch the device');

  // The real thing: newer sessions are applied first, then the oldest.
  await daemon.cli(['restore', oldest.dir]);
  assert.equal(await sha256File(image), original, 'the device is back to its state before session 1');
});
