/**
 * The point-in-time view of a session opened by the serve path (startServe wrapping the image
 * in a CowDevice, as `bdsnap serve --snapshot-root` does): while real clients (qemu-io, the
 * NBD client) change the live export, `CowDevice.view()` reads the pre-session bytes of every
 * chunk, a backup tool (nbdcopy) copying the view over NBD during the writes gets the exact
 * pre-session image, and the live export shows the new bytes.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { startServe } from '../../src/service/serve.js';
import { BdsnapError } from '../../src/errors.js';
import { NbdClient } from '../../src/nbd/client.js';
import { NbdServer } from '../../src/nbd/server.js';
import { StaticExports } from '../../src/nbd/static-exports.js';
import { CowDevice } from '../../src/snapshot/index.js';
import { CleanupStack } from '../../testkit/cleanup.js';
import { fillRandom, makeImage, makeTempDir, sha256, sha256File, xorshift32 } from '../../testkit/files.js';
import { run } from '../../testkit/process.js';
import { needs } from '../../testkit/needs.js';
import { nbdUri } from '../../testkit/server.js';

const IMAGE_BYTES = 32 << 20;
const CHUNK_BYTES = 64 << 10;
const OPERATIONS = 300;
const SECTOR_BYTES = 512;

/** xorshift32: the same seed gives the same operations on every run. */
function prng(seed: number): (limit: number) => number {
  let x = seed >>> 0 || 1;
  return (limit) => {
    x = xorshift32(x);
    return x % limit;
  };
}

test('point-in-time view through a serve session: every chunk reads as before while the live export changes', { timeout: 120_000 }, async (t) => {
  if (!needs(t, { tools: ['qemu-io', 'nbdcopy'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup, 'bdsnap-e2e-view-');
  const image = path.join(dir, 'live.img');
  makeImage(image, IMAGE_BYTES, 'random', 99);
  const before = fs.readFileSync(image);
  const beforeSha = sha256(before);
  const model = Buffer.from(before);
  const touchedChunks = new Set<number>();
  const touch = (offsetBytes: number, lengthBytes: number): void => {
    for (let c = Math.floor(offsetBytes / CHUNK_BYTES); c <= Math.floor((offsetBytes + lengthBytes - 1) / CHUNK_BYTES); c++) touchedChunks.add(c);
  };

  let cow: CowDevice | undefined;
  const liveSocket = path.join(dir, 'live.sock');
  const serving = await startServe({
    images: [image],
    socketPath: liveSocket,
    wrap: (device, devicePath) => {
      cow = CowDevice.create(device, { devicePath, snapshotRoot: path.join(dir, 'snapshots'), chunkSize: CHUNK_BYTES });
      return cow;
    },
  });
  cleanup.after(() => serving.stop());
  assert.ok(cow !== undefined, 'serve wrapped the image');
  const session = cow;
  const device = serving.exportNames[0] as string;

  // The view as its own NBD export, for a backup tool.
  const viewSocket = path.join(dir, 'view.sock');
  const viewServer = new NbdServer({ exports: new StaticExports([{ name: 'view', device: session.view() }]) });
  await viewServer.listenUnix(viewSocket);
  cleanup.after(() => viewServer.close());

  // A real external client first: qemu-io, aligned and unaligned (qemu does the read-modify-write), one crossing a chunk boundary.
  const qemuWrites: Array<[number, number, number]> = [[0x5a, 1 << 20, 256 << 10], [0x11, 3 * CHUNK_BYTES - 700, 1500], [0xc3, IMAGE_BYTES - 4096, 4096]];
  await run('qemu-io', ['-f', 'raw', nbdUri(liveSocket, device), ...qemuWrites.flatMap(([p, o, l]) => ['-c', `write -P ${p} ${o} ${l}`])]);
  for (const [p, o, l] of qemuWrites) {
    model.fill(p, o, o + l);
    touch(o, l);
  }
  assert.match(session.sessionDir ?? '', /snapshots/, 'the first write opened the session directory');

  // Then the in-process NBD client writes while a backup of the view runs (started first, so
  // the two overlap for as long as the copy lasts).
  const client = await NbdClient.connect({ socketPath: liveSocket, exportName: device });
  cleanup.after(() => client.close());
  const backup = path.join(dir, 'backup.img');
  const copying = run('nbdcopy', ['--connections', '2', nbdUri(viewSocket, 'view'), backup]);
  const next = prng(2026);
  for (let i = 0; i < OPERATIONS; i++) {
    // The export advertises a 512-byte minimum block size, which the client must honour.
    const offsetBytes = SECTOR_BYTES * next(IMAGE_BYTES / SECTOR_BYTES);
    const lengthBytes = Math.min(SECTOR_BYTES * (1 + next(300)), IMAGE_BYTES - offsetBytes);
    touch(offsetBytes, lengthBytes);
    if (next(5) === 0) {
      await client.zero(offsetBytes, lengthBytes);
      model.fill(0, offsetBytes, offsetBytes + lengthBytes);
    } else {
      const data = Buffer.alloc(lengthBytes);
      fillRandom(data, i + 1);
      await client.write(data, offsetBytes);
      data.copy(model, offsetBytes);
    }
  }
  await client.flush();
  await copying;
  assert.equal(await sha256File(backup), beforeSha, 'nbdcopy of the view, taken while the device was written, is the pre-session image');

  // Every chunk: the view shows the original, the live export the new content.
  const view = session.view();
  const viewChunk = Buffer.alloc(CHUNK_BYTES);
  const liveChunk = Buffer.alloc(CHUNK_BYTES);
  let changedChunks = 0;
  for (let offsetBytes = 0; offsetBytes < IMAGE_BYTES; offsetBytes += CHUNK_BYTES) {
    await view.read(viewChunk, offsetBytes);
    await client.read(liveChunk, offsetBytes);
    const chunk = offsetBytes / CHUNK_BYTES;
    assert.ok(viewChunk.equals(before.subarray(offsetBytes, offsetBytes + CHUNK_BYTES)), `view chunk ${chunk} holds the pre-session bytes`);
    assert.ok(liveChunk.equals(model.subarray(offsetBytes, offsetBytes + CHUNK_BYTES)), `live chunk ${chunk} holds the new bytes`);
    if (!liveChunk.equals(viewChunk)) changedChunks++;
  }
  // Reads that straddle chunks, from odd offsets.
  for (const [offsetBytes, lengthBytes] of [[CHUNK_BYTES - 1, 3], [5 * CHUNK_BYTES - 12345, 3 * CHUNK_BYTES + 7], [IMAGE_BYTES - 5000, 5000]] as const) {
    const part = Buffer.alloc(lengthBytes);
    await view.read(part, offsetBytes);
    assert.ok(part.equals(before.subarray(offsetBytes, offsetBytes + lengthBytes)), `view read at ${offsetBytes}+${lengthBytes}`);
  }
  const stats = session.stats();
  t.diagnostic(`${changedChunks} of ${IMAGE_BYTES / CHUNK_BYTES} chunks changed; ${stats.preservedChunks} preserved`);
  assert.ok(changedChunks > 100, `the writes changed many chunks (${changedChunks})`);
  assert.equal(stats.preservedChunks, touchedChunks.size, 'exactly the chunks the clients touched were preserved');

  // The view is writable by nobody.
  await assert.rejects(view.write(Buffer.alloc(4096), 0), (err: unknown) => err instanceof BdsnapError && err.code === 'EPERM');

  // Ending the session ends its view; the image keeps the new content.
  await client.close();
  await viewServer.close();
  await serving.stop();
  await assert.rejects(view.read(Buffer.alloc(4096), 0), (err: unknown) => err instanceof BdsnapError && err.code === 'ESHUTDOWN');
  assert.equal(sha256(fs.readFileSync(image)), sha256(model), 'the image holds what the clients wrote');
});
