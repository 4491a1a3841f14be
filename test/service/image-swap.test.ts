/**
 * A registered image is opened again at every NBD connection. A local user who can write the
 * image's directory (here `nobody`, through runuser) swaps the name for a symbolic link to a
 * root-only file between activation and a connection: the daemon must refuse to open it, not
 * serve the root file to the client, and say at activation that the directory is unsafe.
 */

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import { TEST_PASSWORD, cli, ok, sandbox, startDaemon, type Sandbox } from '../../testkit/daemon.js';
import { makeImage, sha256File } from '../../testkit/files.js';
import { needs } from '../../testkit/needs.js';

function asNobody(script: string): void {
  execFileSync('runuser', ['-u', 'nobody', '--', 'sh', '-c', script], { stdio: 'pipe' });
}

/** A sandbox with a directory of images in which others may create and rename names (no sticky bit), as a shared image directory. */
function sharedImages(t: TestContext): { box: Sandbox; images: string } {
  const box = sandbox(t, 'bdsnap-swap-');
  const images = path.join(box.top, 'images');
  fs.mkdirSync(images);
  fs.chmodSync(images, 0o777);
  return { box, images };
}

test('an image name swapped for a symlink after activation is not opened; activation warns about the directory', async (t) => {
  if (!needs(t, { root: true, tools: ['runuser'] })) return;
  const { box, images } = sharedImages(t);
  const image = makeImage(path.join(images, 'disk.img'), 1 << 20, 'random', 5);
  const secret = path.join(box.top, 'root-only');
  fs.writeFileSync(secret, Buffer.alloc(1 << 20, 0x5a), { mode: 0o600 });
  const secretBefore = await sha256File(secret);

  const daemon = await startDaemon(t, { sandbox: box, password: false });
  ok(box, ['passwd', '--password-stdin'], `${TEST_PASSWORD}\n`);
  const activated = cli(box, ['activate', image, '--password-stdin'], `${TEST_PASSWORD}\n`);
  assert.equal(activated.status, 0, activated.stderr);
  assert.match(activated.stderr, /warning: .*disk\.img can be replaced by another user \(.*images is writable by other users \(mode 777\)\)/);

  asNobody(`mv ${images}/disk.img ${images}/moved.img && ln -s ${secret} ${images}/disk.img`);
  const socketPath = path.join(box.runDir, 'nbd.sock');
  await assert.rejects(NbdClient.connect({ socketPath, exportName: image }), 'the swapped name is refused');
  assert.equal(await sha256File(secret), secretBefore, 'the root-only file is untouched');

  // The image put back under its name is served again.
  fs.rmSync(image);
  fs.renameSync(path.join(images, 'moved.img'), image);
  const client = await NbdClient.connect({ socketPath, exportName: image });
  await client.close();
  // The log is read whole once the daemon has exited.
  await daemon.server.stop();
  assert.ok(daemon.logLines().some((l) => l.event === 'device-path-unsafe' && l.device === image), 'the warning is logged');
});

test('a device named through a link another user can replace is refused, before it is registered or written', async (t) => {
  if (!needs(t, { root: true, tools: ['runuser'] })) return;
  const { box, images } = sharedImages(t);
  // A root singlefilefs image, and a link to it where the operator expects an image of the shared directory.
  const secret = path.join(box.top, 'root-only.img');
  ok(box, ['sffs', 'mkfs', secret]);
  const secretBefore = await sha256File(secret);
  const link = path.join(images, 'disk.img');
  asNobody(`ln -s ${secret} ${link}`);
  await startDaemon(t, { sandbox: box, password: false });
  ok(box, ['passwd', '--password-stdin'], `${TEST_PASSWORD}\n`);

  const through = new RegExp(`${link} leads to ${secret} through ${link}, a link another user can replace \\(.*images is writable by other users \\(mode 777\\)\\); give the real path`);
  const written = cli(box, ['sffs', 'write', link, '0', 'written through their link']);
  const offline = cli(box, ['sffs', 'write', '--image', link, '0', 'written through their link']);
  assert.equal(await sha256File(secret), secretBefore, 'the file the link points at is untouched');
  for (const r of [written, offline, cli(box, ['activate', link, '--password-stdin'], `${TEST_PASSWORD}\n`), cli(box, ['snapshot', 'create', link])]) {
    assert.equal(r.status, 1, r.stdout);
    assert.match(r.stderr, through);
  }
  const status = JSON.parse(ok(box, ['status', '--json'])) as { devices: unknown[] };
  assert.deepEqual(status.devices, [], 'nothing was registered');
});
