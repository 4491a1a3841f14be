/**
 * A long fuzz campaign against `bdsnap serve` and the control socket of `bdsnap daemon`:
 *
 *     npm run -s build && node dist/test/fuzz/campaign.js --frames 1000000 [--seed N] [--concurrency 8] [--control-messages 100000]
 *
 * Prints progress, then one JSON summary; exits 1 if anything failed (each failure names the
 * seed that replays it).
 */

import { parseArgs } from 'node:util';
import { CleanupStack } from '../../testkit/cleanup.js';
import { startDaemon } from '../../testkit/daemon.js';
import { runControlCampaign } from '../../testkit/fuzz/control-campaign.js';
import { runNbdCampaign } from '../../testkit/fuzz/nbd-campaign.js';
import { campaignAt, startFuzzTarget } from './serve-target.js';

// The test runner runs every file under dist/test/: without arguments this says how to use it and stops.
if (process.argv.length <= 2) {
  console.log('usage: node dist/test/fuzz/campaign.js --frames N [--seed N] [--concurrency N] [--control-messages N]');
  process.exit(0);
}
const { values } = parseArgs({
  options: {
    frames: { type: 'string', default: '1000000' },
    seed: { type: 'string', default: String(Date.now() % 1_000_000) },
    concurrency: { type: 'string', default: '8' },
    'control-messages': { type: 'string', default: '100000' },
  },
});
const frames = Number(values.frames);
const seed = Number(values.seed);
const concurrency = Number(values.concurrency);
const controlMessages = Number(values['control-messages']);
const cleanup = new CleanupStack();
let failed = false;
try {
  const target = await startFuzzTarget(cleanup);
  const log = (line: string): void => console.error(`[nbd] ${line}`);
  const nbd = await runNbdCampaign({
    ...campaignAt(target),
    frames, seed, concurrency, progress: log,
  });
  console.log(JSON.stringify({ nbd: { ...nbd, failures: nbd.failures.slice(0, 50) } }, null, 2));
  failed ||= nbd.failures.length > 0 || !target.server.running();
  if (controlMessages > 0) {
    const daemon = await startDaemon(cleanup);
    const control = await runControlCampaign({ runDir: daemon.runDir, pid: daemon.server.pid, messages: controlMessages, seed, concurrency, progress: (l) => console.error(`[control] ${l}`) });
    console.log(JSON.stringify({ control: { ...control, failures: control.failures.slice(0, 50) } }, null, 2));
    failed ||= control.failures.length > 0;
  }
} finally {
  await cleanup.run();
}
process.exitCode = failed ? 1 : 0;
