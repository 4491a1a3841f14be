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

test('run, state and snapshot directories whose path another user could change are refused at start, though private themselves', (t) => {
  if (!needs(t, { root: true, tools: ['runuser'] })) return;
  const box = sandbox(t, 'bdsnap-dirs-');
  fs.chmodSync(box.top, 0o711);
  const start = (dirs: { runDir?: string; stateDir?: string; snapshotRoot?: string }): { status: number | null; stderr: string } => spawnSync(process.execPath, [
    BDSNAP_MAIN, 'daemon', '--run-dir', dirs.runDir ?? box.runDir, '--state-dir', dirs.stateDir ?? box.stateDir, '--snapshot-root', dirs.snapshotRoot ?? box.snapshotRoot,
  ], { encoding: 'utf8', timeout: 10_000 });

  // A directory of theirs above: they can rename ours away and put theirs (or a link) there.
  const theirs = path.join(box.top, 'theirs');
  fs.mkdirSync(theirs, { mode: 0o755 });
  fs.chownSync(theirs, 65534, 65534);
  for (const which of ['runDir', 'stateDir', 'snapshotRoot'] as const) {
    const dir = path.join(theirs, which);
    const refused = start({ [which]: dir });
    assert.notEqual(refused.status, 0, `${which} under another user's directory: ${refused.stderr}`);
    assert.match(refused.stderr, new RegExp(`${dir} is private, but another user could move it .*${theirs} belongs to uid 65534`));
  }
  // Reached through a link they may replace, in a shared sticky directory.
  const shared = path.join(box.top, 'shared');
  fs.mkdirSync(shared);
  fs.chmodSync(shared, 0o1777);
  const real = path.join(box.top, 'real');
  fs.mkdirSync(real, { mode: 0o700 });
  const link = path.join(shared, 'link');
  execFileSync('runuser', ['-u', 'nobody', '--', 'ln', '-s', real, link]);
  const throughLink = start({ stateDir: path.join(link, 'state') });
  assert.notEqual(throughLink.status, 0);
  assert.match(throughLink.stderr, new RegExp(`${link}/state leads to ${real}/state through ${link}, a link another user can replace`));
  assert.deepEqual(fs.readdirSync(path.join(real, 'state')), [], 'nothing was written through the link');
});

test('the daemon runs with core dumps off', async (t) => {
  if (!needs(t, { root: true })) return;
  const daemon = await startDaemon(t, { password: false });
  const limits = fs.readFileSync(`/proc/${daemon.server.pid}/limits`, 'utf8');
  assert.match(limits, /^Max core file size\s+0\s+0\s+bytes/m);
});
