/**
 * The README's `sh` blocks run as written, in order, in one shell each, against a real daemon:
 * a reader who copies them must get what the text says. Only the example places move into the
 * test's directory (/images, /mnt, /backup), and `bdsnap` on PATH is the built program.
 */

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { BDSNAP_MAIN, PROJECT_ROOT } from '../../testkit/bdsnap-cli.js';
import { sandbox, startDaemon } from '../../testkit/daemon.js';
import { makeImage } from '../../testkit/files.js';
import { needs } from '../../testkit/needs.js';

/** The bodies of the README's ```sh blocks, in order. */
function shellBlocks(): string[] {
  const readme = fs.readFileSync(path.join(PROJECT_ROOT, 'README.md'), 'utf8');
  return [...readme.matchAll(/^```sh\n([\s\S]*?)^```$/gm)].map((m) => m[1]!);
}

test('the README\'s sh blocks run as written', { timeout: 120_000 }, async (t) => {
  if (!needs(t, { root: true, tools: ['jq', 'nbdcopy', 'nbdfuse', 'mkfs.ext4', 'mount'], paths: ['/dev/fuse'] })) return;
  const blocks = shellBlocks();
  assert.ok(blocks.length >= 3, `expected the worked examples as sh blocks, found ${blocks.length}`);

  const box = sandbox(t, 'bdsnap-readme-');
  const places = { images: path.join(box.top, 'images'), mnt: path.join(box.top, 'mnt'), backup: path.join(box.top, 'backup') };
  fs.mkdirSync(places.images);
  fs.mkdirSync(path.join(places.mnt, 'disk'), { recursive: true });
  for (const name of ['disk.img', 'a.img', 'b.img']) {
    const image = makeImage(path.join(places.images, name), 32 << 20, 0);
    const mkfs = spawnSync('mkfs.ext4', ['-q', '-F', image], { encoding: 'utf8' });
    assert.equal(mkfs.status, 0, mkfs.stderr);
  }
  const bin = path.join(box.top, 'bin');
  fs.mkdirSync(bin);
  fs.writeFileSync(path.join(bin, 'bdsnap'), `#!/bin/sh\nexec ${JSON.stringify(process.execPath)} ${JSON.stringify(BDSNAP_MAIN)} "$@"\n`, { mode: 0o755 });
  await startDaemon(t, { sandbox: box, password: false });

  const env = { ...box.env, PATH: `${bin}:${process.env.PATH ?? '/usr/bin:/bin'}` };
  for (const block of blocks) {
    const script = block
      .replaceAll('/images/', `${places.images}/`)
      .replaceAll('/mnt/', `${places.mnt}/`)
      .replace(/\/backup\b/g, places.backup);
    const r = spawnSync('bash', ['-euo', 'pipefail', '-c', script], { cwd: box.top, env, encoding: 'utf8', timeout: 60_000 });
    assert.equal(r.status, 0, `this README block failed (exit ${r.status}):\n${block}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  }

  // What the blocks promise: both images copied whole, and the singlefilefs text as written.
  for (const name of ['a.img', 'b.img']) {
    assert.equal(fs.statSync(path.join(places.backup, name)).size, 32 << 20, `${name} was copied`);
  }
  const cat = spawnSync(path.join(bin, 'bdsnap'), ['sffs', 'cat', path.join(places.images, 'disk.img')], { env, encoding: 'utf8' });
  assert.equal(cat.status, 0, cat.stderr);
  assert.match(cat.stdout, /^Hello[\s\S]* and more at the end$/);
});
