/**
 * The full crash exploration (scripts/crash-explore.sh): every workload, more states than the
 * suite's slice, counts printed. Exit 1 when a defect was found.
 */

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { runChangeMapExploration } from './change-map-workload.js';
import { runInstantRestoreExploration } from './instant-restore-workload.js';
import { runRepositoryExploration } from './repository-workload.js';
import { runSessionExploration, type CheckedRun } from './session-workload.js';
import { runSnapshotExploration } from './snapshot-workload.js';

function report(name: string, run: CheckedRun): boolean {
  const outcomes = [...run.outcomes].map(([k, n]) => `${k} ${n}`).join(', ');
  console.log(`${name}: ${run.built} distinct crash states built, ${run.checked} checked: ${outcomes}`);
  for (const [reason, n] of run.refusals) console.log(`  refused x${n}: ${reason}`);
  for (const f of run.unsyncedFlushes) console.log(`  DEFECT: ${f} answered while device writes were not synced`);
  for (const d of run.defects.slice(0, 20)) console.log(`  DEFECT: ${d}`);
  if (run.defects.length > 20) console.log(`  ... ${run.defects.length - 20} more defects`);
  return run.defects.length === 0 && run.unsyncedFlushes.length === 0;
}

const maxStates = Number(process.env.CRASH_MAX_STATES ?? 5000);
const seed = Number(process.env.CRASH_SEED ?? 1);
const top = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-crash-explore-'));
let ok = true;
try {
  const dir = path.join(top, 'session');
  fs.mkdirSync(dir);
  ok = report('session store (strict)', await runSessionExploration(dir, { maxStates, seed, mixesPerPoint: 32 })) && ok;
  const cbtDir = path.join(top, 'change-map');
  fs.mkdirSync(cbtDir);
  ok = report('change map (strict: writes, snapshot take, reset)', await runChangeMapExploration(cbtDir, { maxStates, seed, mixesPerPoint: 32 })) && ok;
  const snapDir = path.join(top, 'snapshot');
  fs.mkdirSync(snapDir);
  ok = report('snapshot through the daemon (take, writes after it, restart)', await runSnapshotExploration(snapDir, { maxStates: Math.min(maxStates, 400), seed, mixesPerPoint: 32 })) && ok;
  const repoDir = path.join(top, 'repository');
  fs.mkdirSync(repoDir);
  ok = report('backup repository (init, create, incremental, forget, prune)', await runRepositoryExploration(repoDir, { maxStates, seed, mixesPerPoint: 32 })) && ok;
  const instantDir = path.join(top, 'instant-restore');
  fs.mkdirSync(instantDir);
  ok = report('instant restore (start, client writes and flushes among the copy, end)', await runInstantRestoreExploration(instantDir, { maxStates, seed, mixesPerPoint: 32 })) && ok;
  const placedDir = path.join(top, 'instant-restore-repository');
  fs.mkdirSync(placedDir);
  ok = report('instant restore from a local repository (pieces placed by the piece workers)', await runInstantRestoreExploration(placedDir, { maxStates, seed, mixesPerPoint: 32, source: 'repository' })) && ok;
} finally {
  fs.rmSync(top, { recursive: true, force: true });
}
process.exitCode = ok ? 0 : 1;
