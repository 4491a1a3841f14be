/**
 * Crash states of the backup repository (crash-states.ts, after ALICE): init, a full and an
 * incremental backup, forget and prune. A fast slice runs here; scripts/crash-explore.sh runs
 * the full exploration.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { makeTempDir } from '../../testkit/files.js';
import { namesNotDurableAt } from '../helpers/crash-states.js';
import { recordRepositoryWorkload, runRepositoryExploration } from './repository-workload.js';

test('backup repository: in every crash state explored, each backup whose create returned restores exactly and verify passes', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-crash-repo-');
  const run = await runRepositoryExploration(dir, { maxStates: 100, seed: 1 });
  t.diagnostic(`${run.built} distinct crash states, ${run.checked} checked: ${[...run.outcomes].map(([k, n]) => `${k} ${n}`).join(', ')}`);
  // Packs make fewer, larger writes than a file per piece: about 60 distinct states here.
  assert.ok(run.built >= 40, `the exploration builds the states of every step (built ${run.built})`);
  assert.deepEqual(run.defects, []);
});

test('backup repository: what create, forget and prune did is durable when they return', async (t) => {
  // Crash states found by the explorer: directories made below the repository (pieces/ab/,
  // backups/) were never synced into their parents, so a power loss after create returned
  // lost its pieces or its manifest; and forget's unlink of a manifest was not synced before
  // prune deleted the pieces, so the forgotten backup came back damaged and verify failed.
  const dir = makeTempDir(t, 'bdsnap-crash-repo-names-');
  const world = await recordRepositoryWorkload(dir);
  const marks = world.rec.entries.flatMap((e, i) => (e.k === 'mark' && /^(init returned|created|forgot|pruned)/.test(e.label) ? [{ label: e.label, i }] : []));
  assert.equal(marks.length, 5);
  for (const { label, i } of marks) assert.deepEqual(namesNotDurableAt(world.rec, i), [], `after ${label}`);
});
