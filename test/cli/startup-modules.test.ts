/**
 * A client command must start about as fast as Node itself: `bdsnap status` loads the control
 * client and its own module, never the snapshot engine, the NBD server or zod (which alone
 * costs about as much as starting Node), and `--version` and `--help` load no command's
 * implementation. Counted with a preload that logs every module the process loads.
 */

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { BDSNAP_MAIN, PROJECT_ROOT } from '../../testkit/bdsnap-cli.js';
import { startDaemon } from '../../testkit/daemon.js';
import { makeImage, makeTempDir } from '../../testkit/files.js';
import { waitForRestore } from '../helpers/instant-restore.js';

const MODULE_LOG_PRELOAD = fileURLToPath(new URL('../../testkit/module-log.js', import.meta.url));
const DIST_SRC_URL = pathToFileURL(path.join(PROJECT_ROOT, 'dist', 'src')).href + '/';

interface Loaded {
  status: number | null;
  stdout: string;
  stderr: string;
  /** The modules of dist/src loaded, relative to it. */
  ours: string[];
  /** The modules of the zod package loaded. */
  zod: string[];
}

function runLogged(dir: string, args: string[], env: NodeJS.ProcessEnv = process.env): Loaded {
  const log = path.join(dir, `modules-${args.join('_').replace(/[^\w-]/g, '')}.log`);
  const r = spawnSync(process.execPath, ['--import', MODULE_LOG_PRELOAD, BDSNAP_MAIN, ...args], {
    encoding: 'utf8', timeout: 30_000, env: { ...env, MODULE_LOG: log },
  });
  const urls = fs.existsSync(log) ? fs.readFileSync(log, 'utf8').split('\n').filter(Boolean) : [];
  // An empty log would pass every bound below: the program's own entry must be in it.
  assert.ok(urls.some((u) => u === `${DIST_SRC_URL}cli/main.js`), `the module log of ${args.join(' ')} does not show the program:\n${urls.join('\n')}\n${r.stderr}`);
  return {
    status: r.status,
    stdout: r.stdout,
    stderr: r.stderr,
    ours: urls.filter((u) => u.startsWith(DIST_SRC_URL)).map((u) => u.slice(DIST_SRC_URL.length)),
    zod: urls.filter((u) => u.includes('/node_modules/zod/')),
  };
}

test('bdsnap status against a daemon loads the control client and no more', async (t) => {
  const daemon = await startDaemon(t);
  const dir = makeTempDir(t, 'bdsnap-startup-');
  const r = runLogged(dir, ['status'], daemon.sandbox.env);
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stdout, 'no devices registered\n');
  // main, program, errors, the command list, status, client-options, the client with its
  // framing, paths, timeout and units: 11 today; the engine behind `forget` alone is 60.
  assert.ok(r.ours.length <= 12, `status loaded ${r.ours.length} modules of dist/src:\n${r.ours.join('\n')}`);
  assert.ok(!r.ours.some((m) => m.startsWith('snapshot/') || m.startsWith('nbd/')), r.ours.join('\n'));
  assert.deepEqual(r.zod, [], 'status loads no zod');
});

test('bdsnap --version loads no command', (t) => {
  const dir = makeTempDir(t, 'bdsnap-startup-');
  const version = (JSON.parse(fs.readFileSync(path.join(PROJECT_ROOT, 'package.json'), 'utf8')) as { version: string }).version;
  for (const flag of ['--version', '-V']) {
    const r = runLogged(dir, [flag]);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, `${version}\n`);
    // main, program, errors and the command list.
    assert.ok(r.ours.length <= 4, `${flag} loaded ${r.ours.length} modules of dist/src:\n${r.ours.join('\n')}`);
  }
});

test('bdsnap --help lists every command without loading their implementations', (t) => {
  const dir = makeTempDir(t, 'bdsnap-startup-');
  const r = runLogged(dir, ['--help']);
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /^Usage: bdsnap \[options\] \[command\]\n/);
  for (const name of ['daemon', 'status', 'forget', 'restore', 'backup', 'serve', 'sffs']) assert.match(r.stdout, new RegExp(`\\n  ${name} `));
  // The command modules and the small ones their options need (37 today); the engines behind
  // them were 146 in all.
  assert.ok(r.ours.length <= 40, `--help loaded ${r.ours.length} modules of dist/src:\n${r.ours.join('\n')}`);
  assert.ok(!r.ours.some((m) => /^(backup|device|snapshot\/(?!session-settings))/.test(m)), `--help loaded an engine:\n${r.ours.join('\n')}`);
  assert.deepEqual(r.zod, [], '--help loads no zod');
});

test('bdsnap backup restore --instant leaves the repository to the daemon: the command loads no repository engine and derives no key', async (t) => {
  const daemon = await startDaemon(t, { password: false });
  const dir = makeTempDir(t, 'bdsnap-startup-');
  const image = makeImage(path.join(dir, 'disk.img'), 2 * 1024 * 1024, 'random', 5);
  const repoDir = path.join(dir, 'repo');
  await daemon.cli(['backup', 'init', '--repo', repoDir]);
  const { id } = JSON.parse((await daemon.cli(['backup', 'create', image, '--repo', repoDir, '--json'])).stdout) as { id: string };
  const out = path.join(dir, 'out.img');
  const r = runLogged(dir, ['backup', 'restore', '--repo', repoDir, id, image, '--output', out, '--instant'], daemon.sandbox.env);
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /^serving /);
  // The daemon checks the password, once: a second key derivation (a scrypt) here cost as much as the rest of the command.
  const engine = r.ours.filter((m) => m.startsWith('backup/') || ['repository/repository.js', 'repository/crypto.js', 'repository/s3-store.js'].includes(m));
  assert.deepEqual(engine, [], `the command loaded the repository's engine:\n${r.ours.join('\n')}`);
  await waitForRestore(daemon, path.resolve(out), 'the restore is complete', (x) => x === undefined || x.state === 'complete');
  assert.ok(fs.readFileSync(out).equals(fs.readFileSync(image)), 'the target is the backup');
});
