/**
 * Crash states of a snapshot taken by the daemon (run in this process so that the recording
 * sees its calls) and of the writes after it: on each, the daemon starts as after a reboot and
 * the image must be the device at the take, or failed.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { FLUSH_ANSWERED_MARK } from '../../src/host/fs-trace.js';
import { makeTempDir } from '../../testkit/files.js';
import { namesNotDurableAt } from '../helpers/crash-states.js';
import { recordSnapshotWorkload, runSnapshotExploration } from './snapshot-workload.js';

test('snapshot: in every crash state explored the restarted daemon serves the image exactly as at the take, or failed', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-crash-snap-');
  const run = await runSnapshotExploration(dir, { maxStates: 40, seed: 1 });
  t.diagnostic(`${run.built} distinct crash states, ${run.checked} checked: ${[...run.outcomes].map(([k, n]) => `${k} ${n}`).join(', ')}`);
  assert.ok(run.built >= 60, `the exploration builds the states of every step (built ${run.built})`);
  assert.deepEqual(run.unsyncedFlushes, [], 'a flush is answered only once the device writes before it are synced');
  assert.deepEqual(run.defects, []);
});

test('snapshot: the directory of a snapshot is durable when its create returns', async (t) => {
  // Crash state found by the explorer: the snapshot's directory (its record and difference
  // storage) was made without syncing its parent, so after a power loss a snapshot whose
  // create had returned was gone.
  const dir = makeTempDir(t, 'bdsnap-crash-snap-names-');
  const world = await recordSnapshotWorkload(dir);
  const created = world.rec.entries.findIndex((e) => e.k === 'mark' && e.label === 'created');
  assert.ok(created > 0);
  assert.deepEqual(namesNotDurableAt(world.rec, created), []);
  assert.equal(world.rec.entries.filter((e) => e.k === 'mark' && e.label === FLUSH_ANSWERED_MARK).length, 2, 'the NBD server reports the flushes it answers');
});
