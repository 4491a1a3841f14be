/**
 * Crash states of a strict change map (crash-states.ts, after ALICE): writes, a snapshot take,
 * a requested reset. A fast slice runs here; scripts/crash-explore.sh runs the full one. And
 * the daemon's snapshot take flushes the device before the snapshot counts as taken (a
 * backup can be based on it), which the explorer showed is needed.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { pino } from 'pino';
import { NbdClient } from '../../src/nbd/client.js';
import { BdsnapClient } from '../../src/service/client.js';
import { Daemon } from '../../src/service/daemon.js';
import { CrashRecorder } from '../helpers/crash-recorder.js';
import { makeTempDir } from '../../testkit/files.js';
import { runChangeMapExploration } from './change-map-workload.js';

test('strict change map: in every crash state explored the map is reset or reports every block changed since each snapshot', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-crash-cbt-');
  const run = await runChangeMapExploration(dir, { maxStates: 120, seed: 1 });
  t.diagnostic(`${run.built} distinct crash states, ${run.checked} checked: ${[...run.outcomes].map(([k, n]) => `${k} ${n}`).join(', ')}`);
  assert.ok(run.built >= 50, `the exploration builds the states of every step (built ${run.built})`);
  assert.deepEqual(run.defects, []);
});

test('a take that does not flush the device lets a power loss undo a write the map counts as before the snapshot', async (t) => {
  // What the explorer found in the daemon's take: the map moved on while the device still had
  // unsynced writes; a power loss undid one, and "changed since the snapshot" missed that block.
  const dir = makeTempDir(t, 'bdsnap-crash-cbt-noflush-');
  const run = await runChangeMapExploration(dir, { maxStates: 120, seed: 1, flushAtTake: false });
  assert.ok(run.defects.some((d) => /does not say so/.test(d)), 'the checker sees the under-report');
});

test('the daemon flushes a device during a snapshot take, before the snapshot is saved as taken', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-crash-take-');
  const image = path.join(dir, 'disk.img');
  fs.writeFileSync(image, Buffer.alloc(1 << 20, 5));
  const daemon = await Daemon.start({
    runDir: path.join(dir, 'run'), stateDir: path.join(dir, 'state'), snapshotRoot: path.join(dir, 'snap'), log: pino({ level: 'silent' }),
    session: { durability: 'strict' },
  });
  t.after(() => daemon.close());
  const client = await BdsnapClient.connect(daemon.runDir);
  t.after(() => client.close());
  // A snapshot taken and dropped makes the daemon serve the image.
  await client.destroySnapshot((await client.createSnapshot([image])).id);
  const nbd = await NbdClient.connect({ socketPath: daemon.nbdSocket, exportName: image });
  t.after(() => nbd.close());
  await nbd.write(Buffer.alloc(65536, 9), 0);
  const recorder = new CrashRecorder([dir]);
  recorder.start();
  let id: string;
  try {
    id = (await client.createSnapshot([image], { freeze: false })).id;
  } finally {
    recorder.stop();
  }
  const imageId = recorder.initial.files.find((f) => f.path === fs.realpathSync(image))!.id;
  const synced = recorder.entries.findIndex((e) => e.k === 'fsync' && e.id === imageId);
  assert.ok(synced >= 0, 'the device is synced during the take');
  // The record says 'ok' (its last atomic replace, in the snapshot's directory) only after.
  const recorded = recorder.entries.reduce((last, e, i) => (e.k === 'rename' && e.to.endsWith(`/${id}/snapshot.json`) ? i : last), -1);
  assert.ok(recorded > synced, `the snapshot is recorded taken (step ${recorded}) after the device is synced (step ${synced})`);
});
