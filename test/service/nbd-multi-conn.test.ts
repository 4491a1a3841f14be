/**
 * Several connections writing the same chunks of an active export at once, against a model:
 * the session preserves each chunk once (whichever connection's write reached it first), the
 * image holds every write, and restoring the session gives back the start. The daemon is asked
 * for two worker threads, so requests of one chunk arrive from both at once and are applied on
 * its main thread.
 */

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import { TEST_PASSWORD, cli, ok, sandbox, startDaemon } from '../../testkit/daemon.js';
import { makeImage, sha256File } from '../../testkit/files.js';
import { until } from '../helpers/poll.js';

const IMAGE_BYTES = 4 << 20;
/** The daemon's default chunk. */
const CHUNK_BYTES = 16 * 1024;
const CONNECTIONS = 4;
/** Each connection writes its own quarter of a chunk, so the image's end state is exact. */
const SLICE_BYTES = CHUNK_BYTES / CONNECTIONS;
const ROUNDS = 40;

/** A small deterministic generator, so a failure can be replayed with its seed. */
function random(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let x = Math.imul(s ^ (s >>> 15), 1 | s);
    x ^= x + Math.imul(x ^ (x >>> 7), 61 | x);
    return ((x ^ (x >>> 14)) >>> 0) / 2 ** 32;
  };
}

test('four connections writing the same chunks at once: each chunk preserved once, every write in the image, the start restored', { timeout: 120_000 }, async (t) => {
  const seed = Number(process.env.BDSNAP_TEST_SEED ?? Date.now() % 100_000);
  t.diagnostic(`seed ${seed}`);
  const next = random(seed);
  const box = sandbox(t);
  box.env.BDSNAP_NBD_THREADS = '2';
  // Debug: the log says which thread served each connection.
  const daemon = await startDaemon(t, { sandbox: box, password: false, logLevel: 'debug' });
  ok(box, ['passwd', '--password-stdin'], `${TEST_PASSWORD}\n`);
  const image = fs.realpathSync(makeImage(path.join(box.top, 'disk.img'), IMAGE_BYTES, 'random'));
  const original = await sha256File(image);
  ok(box, ['activate', image, '--password-stdin'], `${TEST_PASSWORD}\n`);

  const model = fs.readFileSync(image);
  const touched = new Set<number>();
  const clients = await Promise.all(Array.from({ length: CONNECTIONS }, () => NbdClient.connect({ socketPath: path.join(box.runDir, 'nbd.sock'), exportName: image })));
  try {
    // The worker's log line reaches the daemon's output a moment after the client's reply.
    const opened = (): Array<Record<string, unknown>> => daemon.logLines().filter((l) => l.event === 'export-opened' && l.export === image);
    await until('each connection\'s export-opened line', () => opened().length === CONNECTIONS);
    const threads = new Set(opened().map((l) => l.thread));
    assert.ok(threads.size >= 2 && !threads.has(undefined), `the connections were served by several threads (${[...threads].join(', ')})`);
    const chunks = IMAGE_BYTES / CHUNK_BYTES;
    for (let round = 0; round < ROUNDS; round++) {
      // A few chunks per round, most of them new: every connection writes its slice of each
      // at once, so first writes of one chunk race each other.
      const picked = Array.from({ length: 1 + Math.floor(next() * 4) }, () => Math.floor(next() * chunks));
      const writes: Array<Promise<void>> = [];
      for (const chunk of new Set(picked)) {
        touched.add(chunk);
        clients.forEach((client, i) => {
          const data = Buffer.alloc(SLICE_BYTES, (round * CONNECTIONS + i) % 255 + 1);
          const offset = chunk * CHUNK_BYTES + i * SLICE_BYTES;
          data.copy(model, offset);
          writes.push(client.write(data, offset));
        });
      }
      await Promise.all(writes);
      // What each connection reads is what all of them wrote.
      const chunk = [...touched][Math.floor(next() * touched.size)]!;
      const seen = Buffer.alloc(CHUNK_BYTES);
      await clients[round % CONNECTIONS]!.read(seen, chunk * CHUNK_BYTES);
      assert.ok(seen.equals(model.subarray(chunk * CHUNK_BYTES, (chunk + 1) * CHUNK_BYTES)), `round ${round}: chunk ${chunk} reads as written`);
    }
    await Promise.all(clients.map((c) => c.flush()));
  } finally {
    await Promise.all(clients.map((c) => c.close()));
  }
  await until('the session to end', () => !(JSON.parse(ok(box, ['status', '--json'])) as { devices: Array<{ attached: boolean }> }).devices[0]?.attached);

  assert.ok(fs.readFileSync(image).equals(model), 'the image holds every write');
  const list = JSON.parse(ok(box, ['list', image, '--json'])) as { sessions: Array<{ dir: string; state: string; preservedBytes: number }> };
  assert.equal(list.sessions.length, 1, 'the connections shared one session');
  assert.equal(list.sessions[0]?.state, 'complete');
  assert.equal(list.sessions[0]?.preservedBytes, touched.size * CHUNK_BYTES, `each of the ${touched.size} chunks written was preserved once`);
  const restored = cli(box, ['restore', list.sessions[0]!.dir]);
  assert.equal(restored.status, 0, restored.stderr);
  assert.equal(await sha256File(image), original, 'restoring the session gives back the start');
});
