/**
 * The daemon's own footing: a snapshot root that another user made (or may write) is refused
 * like the run and state directories, and the daemon leaves no core dump.
 */

import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { BDSNAP_MAIN } from '../../testkit/bdsnap-cli.js';
import { sandbox, startDaemon } from '../../testkit/daemon.js';
import { needs } from '../../testkit/needs.js';

test('a snapshot root made by another user, or open to others, is refused at start', (t) => {
  if (!needs(t, { root: true, tools: ['runuser'] })) return;
  const box = sandbox(t, 'bdsnap-root-');
  fs.chmodSync(box.top, 0o711);
  const shared = path.join(box.top, 'shared');
  fs.mkdirSync(shared);
  fs.chmodSync(shared, 0o1777);
  const start = (snapshotRoot: string): { status: number | null; stderr: string } => spawnSync(process.execPath, [
    BDSNAP_MAIN, 'daemon', '--run-dir', box.runDir, '--state-dir', box.stateDir, '--snapshot-root', snapshotRoot,
  ], { encoding: 'utf8', timeout: 30_000 });

  // Sessions there hold the devices' original content, which a restore writes back.
  const theirs = path.join(shared, 'snapshots');
  execFileSync('runuser', ['-u', 'nobody', '--', 'mkdir', '-m', '700', theirs]);
  const refused = start(theirs);
  assert.notEqual(refused.status, 0);
  assert.match(refused.stderr, /snapshots is owned by uid \d+, not by this user/);

  const open = path.join(shared, 'open');
  fs.mkdirSync(open);
  fs.chmodSync(open, 0o755);
  const openRefused = start(open);
  assert.notEqual(openRefused.status, 0);
  assert.match(openRefused.stderr, /open is open to other users \(mode 755\)/);
});

test('the daemon runs with core dumps off', async (t) => {
  if (!needs(t, { root: true })) return;
  const daemon = await startDaemon(t, { password: false });
  const limits = fs.readFileSync(`/proc/${daemon.server.pid}/limits`, 'utf8');
  assert.match(limits, /^Max core file size\s+0\s+0\s+bytes/m);
});
