/**
 * A restore killed half way leaves the device in neither state: the daemon must not serve it
 * (to a client, a mount or a snapshot) until that restore is finished, and then serves it as
 * restored; nor may `bdsnap serve --snapshot-root` open a session on it. Through the real CLI,
 * daemon and server; the restore is killed by strace at its third write.
 */

/** `bdsnap restore DIR`, killed by strace at its third write to the device. */
const KILL_AT_THIRD_WRITE = ['strace', '-f', '-qq', '-o', '/dev/null', '-e', 'trace=pwrite64,pwritev,pwritev2', '-e', 'inject=pwrite64,pwritev,pwritev2:signal=SIGKILL:when=3'];

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import { BDSNAP_MAIN } from '../../testkit/bdsnap-cli.js';
import { TEST_PASSWORD, cli, ok, sandbox, startDaemon } from '../../testkit/daemon.js';
import { startServer } from '../../testkit/server.js';
import { makeImage, sha256File } from '../../testkit/files.js';
import { needs } from '../../testkit/needs.js';
import { passwdAndActivate } from './helpers.js';

test('a device an interrupted restore left half way is not served until that restore is finished', { timeout: 120_000 }, async (t) => {
  if (!needs(t, { tools: ['strace'] })) return;
  const box = sandbox(t);
  const device = makeImage(path.join(box.top, 'a.img'), 8 << 20, 'random', 7);
  const before = await sha256File(device);
  await startDaemon(t, { sandbox: box, password: false });
  passwdAndActivate(box, device, TEST_PASSWORD);
  const socketPath = path.join(box.runDir, 'nbd.sock');
  // One session with writes far apart, so that its restore writes several runs.
  const client = await NbdClient.connect({ socketPath, exportName: device });
  for (let i = 0; i < 8; i++) await client.write(randomBytes(64 << 10), i * (1 << 20));
  await client.flush();
  await client.close();
  const sessions = JSON.parse(ok(box, ['list', '--json'])) as { sessions: Array<{ dir: string; state: string }> };
  assert.equal(sessions.sessions.length, 1);
  const dir = sessions.sessions[0]!.dir;

  const killed = cli(box, ['restore', dir], '', KILL_AT_THIRD_WRITE);
  assert.equal(killed.status, null, `the restore was killed half way: ${killed.stdout}${killed.stderr}`);
  assert.notEqual(await sha256File(device), before, 'the device is half restored');

  // An NBD client is refused the export; the CLI says why.
  await assert.rejects(NbdClient.connect({ socketPath, exportName: device }), /refused/);
  const snapshot = cli(box, ['snapshot', 'create', device]);
  assert.notEqual(snapshot.status, 0);
  assert.match(snapshot.stderr, /half way through a restore from .*; finish it first: bdsnap restore /);

  assert.match(ok(box, ['restore', dir]), /digest check: skipped-resume/);
  assert.equal(await sha256File(device), before, 'the finished restore is exact');
  const again = await NbdClient.connect({ socketPath, exportName: device });
  const back = Buffer.alloc(64 << 10);
  await again.read(back, 0);
  await again.close();
  assert.ok(back.equals(fs.readFileSync(device).subarray(0, 64 << 10)), 'served as restored');
});

test('bdsnap serve --snapshot-root refuses a device an interrupted restore left half way', { timeout: 120_000 }, async (t) => {
  if (!needs(t, { tools: ['strace'] })) return;
  const box = sandbox(t);
  const image = makeImage(path.join(box.top, 'b.img'), 8 << 20, 'random', 8);
  const before = await sha256File(image);
  const root = path.join(box.top, 'snap');
  const served = await startServer(t, { kind: 'bdsnap', images: [image], extraArgs: ['--snapshot-root', root] });
  const client = await NbdClient.connect({ socketPath: served.socketPath, exportName: served.exportNames[0] });
  for (let i = 0; i < 8; i++) await client.write(randomBytes(64 << 10), i * (1 << 20));
  await client.flush();
  await client.close();
  await served.stop();
  const [session] = fs.readdirSync(root);
  assert.ok(session !== undefined, 'the server left its session');
  const dir = path.join(root, session);

  const killed = cli(box, ['restore', dir], '', KILL_AT_THIRD_WRITE);
  assert.equal(killed.status, null, `the restore was killed half way: ${killed.stdout}${killed.stderr}`);
  assert.notEqual(await sha256File(image), before, 'the image is half restored');

  // Refused before it listens: it exits at once, naming the restore to finish, and opens no session.
  const socketPath = path.join(box.top, 'refused.sock');
  const refused = spawnSync(process.execPath, [BDSNAP_MAIN, 'serve', '--socket', socketPath, '--snapshot-root', root, image], { encoding: 'utf8', env: box.env, timeout: 15_000 });
  assert.equal(refused.status, 1, `serve refused the half-restored image: ${refused.stderr}`);
  assert.match(refused.stderr, /half way through a restore from .*; finish it first: bdsnap restore /);
  assert.deepEqual(fs.readdirSync(root), [session], 'no session was opened on it');

  assert.match(ok(box, ['restore', dir]), /digest check: skipped-resume/);
  assert.equal(await sha256File(image), before, 'the finished restore is exact');
  const again = await startServer(t, { kind: 'bdsnap', images: [image], extraArgs: ['--snapshot-root', root] });
  const reader = await NbdClient.connect({ socketPath: again.socketPath, exportName: again.exportNames[0] });
  const back = Buffer.alloc(64 << 10);
  await reader.read(back, 1 << 20);
  await reader.close();
  assert.ok(back.equals(fs.readFileSync(image).subarray(1 << 20, (1 << 20) + (64 << 10))), 'served as restored');
});
