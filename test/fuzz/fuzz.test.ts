/**
 * Live-socket fuzzing, bounded for the suite (a few seconds each): `bdsnap serve` and the
 * daemon's control socket fed random and mutated traffic through real sockets while a
 * well-behaved client is served. The long campaign is `node dist/test/fuzz/campaign.js`
 * (see README.md).
 */

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { CleanupStack } from '../../testkit/cleanup.js';
import { startDaemon } from '../../testkit/daemon.js';
import { runControlCampaign } from '../../testkit/fuzz/control-campaign.js';
import { runNbdCampaign } from '../../testkit/fuzz/nbd-campaign.js';
import { campaignAt, startFuzzTarget } from './serve-target.js';

/** A fixed seed per run of the suite would test the same cases forever: vary it, and print it. */
const SEED = Number(process.env.BDSNAP_FUZZ_SEED ?? Date.now() % 1_000_000);
/** Growth of the server's resident memory tolerated over a bounded run (allocator and JIT warm-up). */
const MAX_RSS_GROWTH_KIB = 64 * 1024;

test(`NBD server under random and mutated traffic in every phase (seed ${SEED})`, { timeout: 90_000 }, async (t) => {
  const cleanup = new CleanupStack(t);
  const target = await startFuzzTarget(cleanup);
  const result = await runNbdCampaign({
    ...campaignAt(target),
    frames: 20_000, maxDurationMs: 12_000, seed: SEED, concurrency: 4,
  });
  t.diagnostic(JSON.stringify({ ...result, failures: result.failures.slice(0, 5) }));
  assert.deepEqual(result.failures, [], `replay with BDSNAP_FUZZ_SEED=${SEED}`);
  assert.ok(target.server.running(), `the server is still running:\n${target.server.stderr()}`);
  assert.ok(result.connections >= 50 && result.frames >= 500, `enough traffic: ${result.connections} connections, ${result.frames} frames`);
  for (const phase of ['handshake', 'options', 'transmission'] as const) assert.ok(result.byPhase[phase] > 0, `${phase} fuzzed`);
  assert.ok(result.halfClosed > 0, 'some connections were half-closed and had to be closed by the server');
  assert.ok(result.checkerRounds >= 10, `the well-behaved client was served throughout (${result.checkerRounds} rounds)`);
  assert.ok(result.after.fds <= result.before.fds, `descriptors: ${result.before.fds} before, ${result.after.fds} after`);
  assert.ok(result.after.rssKiB - result.before.rssKiB < MAX_RSS_GROWTH_KIB, `memory: ${result.before.rssKiB} KiB before, ${result.after.rssKiB} KiB after`);
  const stopped = await target.server.stop();
  assert.deepEqual([stopped.exitCode, stopped.killed], [0, false], `a clean exit after the campaign:\n${target.server.stderr()}`);
});

test(`control socket under random bytes, oversized lines and wrong types (seed ${SEED})`, { timeout: 90_000 }, async (t) => {
  const cleanup = new CleanupStack(t);
  const daemon = await startDaemon(cleanup);
  const result = await runControlCampaign({ runDir: daemon.runDir, pid: daemon.server.pid, messages: 3000, maxDurationMs: 10_000, seed: SEED, concurrency: 4 });
  t.diagnostic(JSON.stringify({ ...result, failures: result.failures.slice(0, 5) }));
  assert.deepEqual(result.failures, [], `replay with BDSNAP_FUZZ_SEED=${SEED}`);
  assert.ok(daemon.server.running(), `the daemon is still running:\n${daemon.server.stderr()}`);
  assert.ok(result.connections >= 20 && result.answers > 0, `enough traffic: ${result.connections} connections, ${result.answers} answers`);
  assert.ok(result.checkerRounds >= 5, `the well-behaved client was served throughout (${result.checkerRounds} rounds)`);
  assert.ok(result.after.rssKiB - result.before.rssKiB < MAX_RSS_GROWTH_KIB, `memory: ${result.before.rssKiB} KiB before, ${result.after.rssKiB} KiB after`);
  assert.match((await daemon.cli(['status'])).stdout, /no devices registered/);
});
