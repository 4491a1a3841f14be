/**
 * Crash states of a strict-durability session (crash-states.ts, after ALICE): a fast slice of
 * the exploration runs here; scripts/crash-explore.sh runs the full one.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { makeTempDir } from '../../testkit/files.js';
import { namesNotDurableAt } from '../helpers/crash-states.js';
import { recordSessionWorkload, runSessionExploration } from './session-workload.js';

test('strict session: every crash state explored restores the start exactly or refuses with nothing lost', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-crash-session-');
  const run = await runSessionExploration(dir, { maxStates: 120, seed: 1 });
  const outcomes = [...run.outcomes].map(([k, n]) => `${k} ${n}`).join(', ');
  t.diagnostic(`${run.built} distinct crash states, ${run.checked} checked: ${outcomes}`);
  assert.ok(run.built >= 60, `the exploration builds the states of every step (built ${run.built})`);
  assert.deepEqual(run.unsyncedFlushes, [], 'a flush is answered only once the device writes before it are synced');
  assert.deepEqual(run.defects, []);
});

test('strict session: a snapshot root the session creates is durable before its first device write', async (t) => {
  // Crash state found by the explorer: the root made by mkdir -p, its name in the parent never
  // synced; a power loss after the first device write took the whole session directory away.
  const dir = makeTempDir(t, 'bdsnap-crash-root-');
  const world = await recordSessionWorkload(dir);
  const firstDeviceWrite = world.rec.entries.findIndex((e) => e.k === 'write' && e.id === world.imageId);
  assert.ok(firstDeviceWrite > 0);
  assert.deepEqual(namesNotDurableAt(world.rec, firstDeviceWrite), []);
});
