/**
 * The reported case, end to end through the CLI, a real daemon and the kernel's ext4: mount,
 * write, unmount twice (sessions Sa, Sb), restore Sb, restore Sa, mount and write again (Sc).
 * The start of Sb was overwritten by Sa's restore and is kept nowhere, so `restore Sb --output`
 * must be refused with the reason (it used to write an image that never existed, exit 0); the
 * sessions that can still be rebuilt restore exactly.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { CleanupStack } from '../../testkit/cleanup.js';
import { startDaemon } from '../../testkit/daemon.js';
import { makeImage, makeTempDir, sha256File } from '../../testkit/files.js';
import { mountCycle } from '../helpers/mount-cycle.js';
import { run } from '../../testkit/process.js';
import { needs } from '../../testkit/needs.js';

const IMAGE_BYTES = 64 << 20;

test('a session whose start a restore of an older one overwrote is refused, never rebuilt wrong', { timeout: 300_000 }, async (t) => {
  if (!needs(t, { root: true, paths: ['/dev/fuse'], tools: ['nbdfuse', 'losetup', 'fusermount3', 'mkfs.ext4', 'mount', 'umount'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup, 'bdsnap-chain-');
  const image = path.join(dir, 'fs.img');
  makeImage(image, IMAGE_BYTES, 'zero');
  await run('mkfs.ext4', ['-q', '-F', '-b', '4096', image]);
  const original = await sha256File(image);
  const daemon = await startDaemon(cleanup, { activate: [image] });
  const device = daemon.server.exportNames[0] as string;
  const mountPoint = path.join(dir, 'mnt');
  fs.mkdirSync(mountPoint);

  const sa = await mountCycle(daemon, device, mountPoint, 'a.bin', 1);
  const h1 = await sha256File(image);
  const sb = await mountCycle(daemon, device, mountPoint, 'b.bin', 2);
  await daemon.cli(['restore', sb]);
  assert.equal(await sha256File(image), h1, 'restore of Sb gives the state at its start');
  await daemon.cli(['restore', sa]);
  assert.equal(await sha256File(image), original, 'restore of Sa gives the very first state');
  const sc = await mountCycle(daemon, device, mountPoint, 'c.bin', 3);

  const out = path.join(dir, 'x.img');
  const refused = await daemon.cli(['restore', sb, '--output', out], undefined, true);
  assert.notEqual(refused.exitCode, 0, `restore of Sb must be refused:\n${refused.stdout}`);
  assert.match(refused.stderr, /the start of .* cannot be rebuilt: a restore from the older session .* took .* back to before it/);
  assert.equal(fs.existsSync(out), false, 'a refused restore leaves no output file');

  // What can be rebuilt is rebuilt exactly: Sc's start and Sa's start are both the first state.
  for (const [session, name] of [[sc, 'c'], [sa, 'a']] as const) {
    const copy = path.join(dir, `${name}.img`);
    await daemon.cli(['restore', session, '--output', copy]);
    assert.equal(await sha256File(copy), original, `restore of S${name} --output`);
  }
});
