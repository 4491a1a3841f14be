/**
 * Memory under abuse, against real processes and measured from /proc (VmRSS): after a warm-up
 * (a fifth of the traffic), the rest of a campaign must leave the process within 20 MB of where
 * the warm-up left it. Shortened from the long campaign (`dist/test/fuzz/campaign.js`, 100,000
 * control messages and 1,000,000 NBD frames) to fit the suite.
 *
 * - Control socket: junk, oversized lines, wrong types, floods and wrong passwords over many
 *   connections. Requests with a wrong password used to wait in a line that moves at one per
 *   8 s, each holding its closed connection and that connection's later lines: about 30 KB per
 *   connection, for good.
 * - NBD: random READ and WRITE lengths used to fill the server's buffer pool with one buffer
 *   per length, up to its 64 MiB cap.
 */

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as delay } from 'node:timers/promises';
import { CleanupStack } from '../../testkit/cleanup.js';
import { startDaemon } from '../../testkit/daemon.js';
import { runControlCampaign } from '../../testkit/fuzz/control-campaign.js';
import { gauge, runNbdCampaign } from '../../testkit/fuzz/nbd-campaign.js';
import { campaignAt, startFuzzTarget } from './serve-target.js';

/** Fixed by default: the campaign must hold the requests that used to pile up. */
const SEED = Number(process.env.BDSNAP_FUZZ_SEED ?? 4242);
const MAX_GROWTH_KIB = 20 * 1024;
/** How long the daemon has, after the campaign, to give back what its last requests used. */
const SETTLE_MS = 3000;

test(`control daemon: 30,000 abusive messages leave resident memory within 20 MB of the warm-up (seed ${SEED})`, { timeout: 120_000 }, async (t) => {
  const cleanup = new CleanupStack(t);
  const daemon = await startDaemon(cleanup);
  const result = await runControlCampaign({ runDir: daemon.runDir, pid: daemon.server.pid, messages: 30_000, maxDurationMs: 90_000, seed: SEED, concurrency: 8 });
  t.diagnostic(JSON.stringify({ ...result, failures: result.failures.slice(0, 5) }));
  assert.deepEqual(result.failures, [], `replay with BDSNAP_FUZZ_SEED=${SEED}`);
  assert.ok(result.messages >= 30_000, `the whole campaign ran: ${result.messages} messages in ${result.durationMs} ms`);
  // The last wrong passwords may still be hashing (32 MiB of scrypt each) when the campaign
  // ends: memory must come back within a few seconds of it, not at its last instant.
  let after = result.after;
  const settleBy = Date.now() + SETTLE_MS;
  while (after.rssKiB - result.before.rssKiB >= MAX_GROWTH_KIB && Date.now() < settleBy) {
    await delay(100);
    after = gauge(daemon.server.pid);
  }
  const growth = after.rssKiB - result.before.rssKiB;
  assert.ok(growth < MAX_GROWTH_KIB, `memory: ${result.before.rssKiB} KiB after the warm-up, ${result.after.rssKiB} KiB at the end, ${after.rssKiB} KiB ${SETTLE_MS} ms later (+${growth} KiB)`);
  t.diagnostic(`rss at the end ${result.after.rssKiB} KiB, settled ${after.rssKiB} KiB`);
  assert.match((await daemon.cli(['status'])).stdout, /no devices registered/);
});

test(`NBD server: 200,000 fuzzed frames leave resident memory within 20 MB of the warm-up (seed ${SEED})`, { timeout: 120_000 }, async (t) => {
  const cleanup = new CleanupStack(t);
  const target = await startFuzzTarget(cleanup);
  const result = await runNbdCampaign({
    ...campaignAt(target),
    frames: 200_000, maxDurationMs: 100_000, seed: SEED, concurrency: 8,
  });
  t.diagnostic(JSON.stringify({ ...result, failures: result.failures.slice(0, 5) }));
  assert.deepEqual(result.failures, [], `replay with BDSNAP_FUZZ_SEED=${SEED}`);
  assert.ok(result.frames >= 200_000, `the whole campaign ran: ${result.frames} frames in ${result.durationMs} ms`);
  const growth = result.after.rssKiB - result.before.rssKiB;
  assert.ok(growth < MAX_GROWTH_KIB, `memory: ${result.before.rssKiB} KiB after the warm-up, ${result.after.rssKiB} KiB at the end (+${growth} KiB)`);
});
