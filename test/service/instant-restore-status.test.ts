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
import { startDaemon, type RunningDaemon } from '../../testkit/daemon.js';
import { makeImage } from '../../testkit/files.js';

const MiB = 1024 * 1024;

interface RestoreInfo { target: string; state: string; doneBytes: number; totalBytes: number; rateBytesPerSecond: number; readFilledBytesPerSecond: number }

async function restoreOf(daemon: RunningDaemon, target: string): Promise<RestoreInfo | undefined> {
  return (JSON.parse((await daemon.cli(['status', '--json'])).stdout) as { restores: RestoreInfo[] }).restores.find((r) => r.target === target);
}

test('status shows the background copy\'s own rate, within --restore-rate, and what client reads filled apart', { timeout: 60_000 }, async (t) => {
  const rateBytes = 2 * MiB;
  const daemon = await startDaemon(t, { password: false, extraArgs: ['--restore-rate', '2M'] });
  const top = daemon.sandbox.top;
  const image = makeImage(path.join(top, 'disk.img'), 48 * MiB, 'random', 5);
  const repoDir = path.join(top, 'repo');
  await daemon.cli(['backup', 'init', '--repo', repoDir]);
  const { id } = JSON.parse((await daemon.cli(['backup', 'create', image, '--repo', repoDir, '--json'])).stdout) as { id: string };
  const out = path.join(top, 'out.img');
  const started = Date.now();
  await daemon.cli(['backup', 'restore', '--repo', repoDir, id, image, '--output', out, '--instant']);
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
  const waitMs = 4000 - (Date.now() - started);
  if (waitMs > 0) await new Promise((resolve) => setTimeout(resolve, waitMs));
  const r = await restoreOf(daemon, out);
  const seconds = (Date.now() - started) / 1000;
  t.diagnostic(`after ${seconds} s: ${JSON.stringify(r)}`);
  assert.equal(r?.state, 'running', 'the copy still runs');
  assert.ok(r.rateBytesPerSecond <= rateBytes * 1.5, `the rate shown, ${r.rateBytesPerSecond} B/s, is the copy's, within --restore-rate 2M`);
  assert.ok(r.rateBytesPerSecond > 0, 'the copy runs');
  assert.ok(r.readFilledBytesPerSecond >= readBytes / seconds / 2, `what the reads filled is shown apart: ${r.readFilledBytesPerSecond} B/s`);
  const human = (await daemon.cli(['status'])).stdout;
  assert.match(human, /copying [\d.]+ \w+\/s \(reads fill [\d.]+ \w+\/s more\)/);
});
