/**
 * Fixtures of the service tests on top of the daemon launcher (helpers/daemon.ts): session
 * directories, nbdsh against a sandbox's daemon, and the password/activate/restore
 * steps several tests share.
 */

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { cli, daemonUri, ok, type CliResult, type Sandbox } from '../helpers/daemon.js';
import { nbdshEnv } from '../helpers/process.js';

export function sessionDirs(box: Sandbox): string[] {
  if (!fs.existsSync(box.snapshotRoot)) return [];
  return fs.readdirSync(box.snapshotRoot).sort();
}

/** Run nbdsh with a python snippet against an export; returns the process result. */
export function nbdsh(box: Sandbox, exportName: string, code: string): CliResult {
  const r = spawnSync('nbdsh', ['-u', daemonUri(box, exportName), '-c', code], { encoding: 'utf8', timeout: 60000, env: nbdshEnv() });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Set the service password for the first time and activate `device` with it, through the CLI. */
export function passwdAndActivate(box: Sandbox, device: string, password: string): void {
  ok(box, ['passwd', '--password-stdin'], `${password}\n`);
  ok(box, ['activate', device, '--password-stdin'], `${password}\n`);
}

/**
 * The sandbox holds exactly one session: return its manifest state after running
 * `bdsnap restore` on it (which must succeed).
 */
export function restoreOnlySession(box: Sandbox): string {
  const dirs = sessionDirs(box);
  assert.equal(dirs.length, 1, `expected one session directory, found ${dirs.join(', ')}`);
  const dir = path.join(box.snapshotRoot, dirs[0] as string);
  const manifest = JSON.parse(fs.readFileSync(path.join(dir, 'manifest.json'), 'utf8')) as { state: string };
  const restored = cli(box, ['restore', dir]);
  assert.equal(restored.status, 0, restored.stderr);
  return manifest.state;
}
