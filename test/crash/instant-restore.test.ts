/**
 * Crash states of an instant restore (crash-states.ts, after ALICE): the restore's start, a
 * client's writes and flushes among the background copy's fills, the end. A fast slice runs
 * here; scripts/crash-explore.sh runs the full one. From a plain file of the backup, and from a
 * local repository, whose pieces the piece workers write into the target from their threads.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { makeTempDir } from '../../testkit/files.js';
import { runInstantRestoreExploration } from './instant-restore-workload.js';

test('instant restore: in every crash state explored the done map claims only durable slots, and the resumed restore ends as the backup plus every flushed write', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-crash-instant-');
  const run = await runInstantRestoreExploration(dir, { maxStates: 80, seed: 1 });
  t.diagnostic(`${run.built} distinct crash states, ${run.checked} checked: ${[...run.outcomes].map(([k, n]) => `${k} ${n}`).join(', ')}`);
  assert.ok(run.built >= 100, `the exploration builds the states of every step (built ${run.built})`);
  assert.deepEqual(run.defects, []);
});

test('instant restore from a local repository: the piece workers\' writes are recorded, and every crash state explored is exact', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-crash-instant-repo-');
  const run = await runInstantRestoreExploration(dir, { maxStates: 80, seed: 1, source: 'repository' });
  t.diagnostic(`${run.built} distinct crash states, ${run.checked} checked: ${[...run.outcomes].map(([k, n]) => `${k} ${n}`).join(', ')}`);
  assert.ok(run.built >= 100, `the exploration builds the states of every step (built ${run.built})`);
  assert.deepEqual(run.defects, []);
});
