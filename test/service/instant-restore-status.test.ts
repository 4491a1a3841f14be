/**
 * What `status` says of a running instant restore, through the real daemon and CLI: the rate it
 * shows is the background copy's own (what --restore-rate bounds), with what client reads filled
 * shown apart.
 */

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import { instantRestoreOfImage, restoreOf } from '../helpers/instant-restore.js';

const MiB = 1024 * 1024;

test('status shows the background copy\'s own rate, within --restore-rate, and what client reads filled apart', { timeout: 60_000 }, async (t) => {
  const rateBytes = 2 * MiB;
  const { daemon, image, out, startedMs } = await instantRestoreOfImage(t, { rate: '2M', imageBytes: 48 * MiB, seed: 5 });
  // A client reads the last 24 MiB at once: far more than the copy may fill in the meantime.
  const client = await NbdClient.connect({ socketPath: path.join(daemon.runDir, 'nbd.sock'), exportName: out });
  const readBytes = 24 * MiB;
  try {
    const got = Buffer.alloc(readBytes);
    await client.read(got, 24 * MiB);
    assert.ok(got.equals(fs.readFileSync(image).subarray(24 * MiB)), 'the client reads the backup');
  } finally {
    await client.close();
  }
  // A few seconds on, so that the copy's steps in flight (a piece each) weigh little.
  const waitMs = 4000 - (Date.now() - startedMs);
  if (waitMs > 0) await new Promise((resolve) => setTimeout(resolve, waitMs));
  const r = await restoreOf(daemon, out);
  const seconds = (Date.now() - startedMs) / 1000;
  t.diagnostic(`after ${seconds} s: ${JSON.stringify(r)}`);
  assert.equal(r?.state, 'running', 'the copy still runs');
  assert.ok(r.rateBytesPerSecond <= rateBytes * 1.5, `the rate shown, ${r.rateBytesPerSecond} B/s, is the copy's, within --restore-rate 2M`);
  assert.ok(r.rateBytesPerSecond > 0, 'the copy runs');
  assert.ok(r.readFilledBytesPerSecond >= readBytes / seconds / 2, `what the reads filled is shown apart: ${r.readFilledBytesPerSecond} B/s`);
  const human = (await daemon.cli(['status'])).stdout;
  assert.match(human, /copying [\d.]+ \w+\/s \(reads fill [\d.]+ \w+\/s more\)/);
});
