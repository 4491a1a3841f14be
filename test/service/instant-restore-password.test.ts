/**
 * The repository password of an instant restore is checked by the daemon alone (the command
 * hands it over without deriving a key): a wrong or missing one is refused there, clearly,
 * before anything is written, in the repository, the target or the daemon's state.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { BDSNAP_MAIN } from '../../testkit/bdsnap-cli.js';
import { startDaemon } from '../../testkit/daemon.js';
import { makeImage } from '../../testkit/files.js';
import { run } from '../../testkit/process.js';
import { restoresOf } from '../helpers/instant-restore.js';

/** Every file under `dir` with its size and mtime. */
function treeState(dir: string): string[] {
  return (fs.readdirSync(dir, { recursive: true, withFileTypes: true }))
    .map((e) => path.join(e.parentPath, e.name))
    .map((p) => { const st = fs.statSync(p); return `${p} ${st.size} ${st.mtimeMs}`; })
    .sort();
}

test('an instant restore with a wrong or no repository password is refused by the daemon, saying so, and nothing is written', { timeout: 60_000 }, async (t) => {
  const daemon = await startDaemon(t, { password: false });
  const top = daemon.sandbox.top;
  const image = makeImage(path.join(top, 'disk.img'), 2 * 1024 * 1024, 'random', 11);
  const repoDir = path.join(top, 'repo');
  await daemon.cli(['backup', 'init', '--repo', repoDir]);
  const { id } = JSON.parse((await daemon.cli(['backup', 'create', image, '--repo', repoDir, '--json'])).stdout) as { id: string };
  const repoBefore = treeState(repoDir);
  const out = path.join(top, 'out.img');
  const restore = (env: NodeJS.ProcessEnv): ReturnType<typeof run> =>
    run(process.execPath, [BDSNAP_MAIN, 'backup', 'restore', '--repo', repoDir, id, image, '--output', out, '--instant'], { env, input: '', allowFailure: true, timeoutMs: 30_000 });
  const { BDSNAP_REPO_PASSWORD: _given, ...noPassword } = daemon.sandbox.env;
  for (const [env, why] of [
    [{ ...daemon.sandbox.env, BDSNAP_REPO_PASSWORD: 'not the password' }, /wrong password: no key of .* accepts it/],
    [noPassword, /is encrypted: give its password in BDSNAP_REPO_PASSWORD, with --password-file FILE/],
  ] as const) {
    const r = await restore(env);
    assert.notEqual(r.exitCode, 0, r.stdout);
    assert.match(r.stderr, why);
    assert.equal(r.stderr.trim().split('\n').length, 1, `one line: ${r.stderr}`);
    assert.equal(fs.existsSync(out), false, 'no target was made');
    assert.deepEqual(treeState(repoDir), repoBefore, 'nothing in the repository changed (no lock either)');
    assert.deepEqual(await restoresOf(daemon), []);
    const kept = path.join(daemon.stateDir, 'restores');
    assert.deepEqual(fs.existsSync(kept) ? fs.readdirSync(kept) : [], [], 'the daemon kept nothing of it');
  }
});
