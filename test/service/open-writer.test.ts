/**
 * An image another process writes (a VM, dd) would be written around copy-before-write and the
 * change map: the daemon does not attach it (for a snapshot, a mount or an NBD client), and
 * says which process writes it; activation, which opens nothing, warns. Once that process is
 * gone, it does.
 */

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { TEST_PASSWORD, cli, ok, sandbox, startDaemon } from '../../testkit/daemon.js';
import { cleanupOf } from '../../testkit/cleanup.js';
import { makeImage } from '../../testkit/files.js';
import { needs } from '../../testkit/needs.js';

/** `sh` holding `file` open for reading and writing on descriptor 3 until killed; its pid and a kill. */
async function writerOf(t: TestContext, file: string): Promise<{ pid: number; stop: () => Promise<void> }> {
  const child = spawn('sh', ['-c', 'exec 3<>"$1"; echo ready; exec sleep 60', 'sh', file], { stdio: ['ignore', 'pipe', 'ignore'] });
  cleanupOf(t).after(() => void child.kill('SIGKILL'));
  await new Promise<void>((resolve, reject) => {
    child.stdout!.once('data', () => resolve());
    child.once('exit', (code) => reject(new Error(`the writer of ${file} exited (${code})`)));
  });
  const exited = new Promise((resolve) => child.once('exit', resolve));
  return { pid: child.pid!, stop: async () => { child.kill('SIGKILL'); await exited; } };
}

test('an image another process has open for writing: activation warns, and it is not attached for a snapshot, naming the process; once it is gone, it is', { timeout: 120_000 }, async (t) => {
  if (!needs(t, { root: true })) return;
  const box = sandbox(t, 'bdsnap-writer-');
  const image = makeImage(path.join(box.top, 'disk.img'), 4 << 20, 'random', 3);
  await startDaemon(t, { sandbox: box, password: false });
  ok(box, ['passwd', '--password-stdin'], `${TEST_PASSWORD}\n`);

  // Activation opens nothing, but says so at once.
  const writer = await writerOf(t, image);
  const activated = cli(box, ['activate', image, '--password-stdin'], `${TEST_PASSWORD}\n`);
  assert.equal(activated.status, 0, activated.stderr);
  assert.match(activated.stderr, new RegExp(`^bdsnap: warning: ${image} is open for writing by pid ${writer.pid} \\(sleep\\): bdsnap will not mount, snapshot or serve it until that process lets go$`, 'm'));
  const refused = cli(box, ['snapshot', 'create', image]);
  assert.equal(refused.status, 1, refused.stderr);
  assert.match(refused.stderr, new RegExp(`^bdsnap: .*${image} is open for writing by pid ${writer.pid} \\(sleep\\); stop that process first`, 'm'));
  assert.deepEqual((JSON.parse(ok(box, ['snapshot', 'list', '--json'])) as { snapshots: unknown[] }).snapshots, [], 'no snapshot was taken');

  await writer.stop();
  const taken = cli(box, ['snapshot', 'create', image]);
  assert.equal(taken.status, 0, taken.stderr);
});
