/**
 * `bdsnap forget`: old sessions go, oldest first, and every session kept restores exactly as
 * before; sessions a restore went back past go too; an open session and everything newer stay.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { FileDevice } from '../../src/device/file-device.js';
import { CowDevice, forgetSessions, listSessions, planForget, restore } from '../../src/snapshot/index.js';
import { makeImage } from '../../testkit/files.js';
import { run } from '../../testkit/process.js';
import { BDSNAP_MAIN } from '../../testkit/bdsnap-cli.js';
import { isError, tempDir } from './helpers.js';

const CS = 16384;

async function session(image: string, root: string, mountTime: Date, writes = 3): Promise<{ dir: string; start: Buffer }> {
  const start = fs.readFileSync(image);
  const dev = await FileDevice.open(image);
  try {
    const cow = CowDevice.create(dev, { devicePath: image, snapshotRoot: root, chunkSize: CS, deviceIdentity: { ...dev.identity }, mountTime });
    for (let i = 0; i < writes; i++) await cow.write(randomBytes(5000), Math.floor(Math.random() * (dev.size - 5000)));
    return { dir: (await cow.close())!.sessionDir, start };
  } finally {
    await dev.close();
  }
}

const at = (hour: number): Date => new Date(Date.UTC(2026, 5, 1, hour));

test('forget keeps the newest sessions, removes the older ones, and what is kept restores exactly', async (t) => {
  const dir = tempDir(t, 'bdsnap-forget-');
  const image = makeImage(path.join(dir, 'disk.img'), 1 << 20, 'random', 5);
  const root = path.join(dir, 'snap');
  const s = [];
  for (let h = 0; h < 5; h++) s.push(await session(image, root, at(h)));
  await assert.rejects(planForget(root, image, {}), isError('EINVAL', /say what to keep/));

  const dry = await planForget(root, image, { keepLast: 2 });
  assert.deepEqual(dry.remove.map((r) => r.dir), s.slice(0, 3).map((x) => x.dir));
  assert.deepEqual(dry.keep, s.slice(3).map((x) => x.dir));
  assert.equal((await listSessions(root, image)).length, 5, 'planning removes nothing');
  // --keep-within keeps what --keep-last would not: the union is kept.
  const within = await planForget(root, image, { keepLast: 1, keepWithinMs: 2.5 * 3600_000, nowMs: at(4).getTime() });
  assert.deepEqual(within.keep, s.slice(2).map((x) => x.dir));

  await forgetSessions(root, dry);
  assert.deepEqual((await listSessions(root, image)).map((x) => x.dir), s.slice(3).map((x) => x.dir));
  assert.deepEqual(fs.readdirSync(root).sort(), s.slice(3).map((x) => path.basename(x.dir)).sort(), 'nothing left behind');
  await restore(s[3]!.dir);
  assert.deepEqual(fs.readFileSync(image), s[3]!.start);
});

test('forget removes sessions a restore went back past, and stops at a session still open', async (t) => {
  const dir = tempDir(t, 'bdsnap-forget-');
  const image = makeImage(path.join(dir, 'disk.img'), 1 << 20, 'random', 6);
  const root = path.join(dir, 'snap');
  const sa = await session(image, root, at(1));
  const sb = await session(image, root, at(2));
  await restore(sa.dir); // sb's start is gone now
  const sc = await session(image, root, at(3));
  const plan = await planForget(root, image, { keepLast: 5 });
  assert.deepEqual(plan.remove.map((r) => r.dir), [sb.dir]);
  assert.match(plan.remove[0]!.reason, /cannot be restored: a restore from .* went back past its start/);
  await forgetSessions(root, plan);
  await restore(sa.dir, { output: path.join(dir, 'a.img') });
  assert.deepEqual(fs.readFileSync(path.join(dir, 'a.img')), sa.start, 'what is kept restores exactly');

  // A session open right now (written, not closed) and everything after it stay.
  const dev = await FileDevice.open(image);
  t.after(() => dev.close());
  const open = CowDevice.create(dev, { devicePath: image, snapshotRoot: root, chunkSize: CS, deviceIdentity: { ...dev.identity }, mountTime: at(4) });
  await open.write(randomBytes(4096), 0);
  const stopped = await planForget(root, image, { keepLast: 0 });
  assert.deepEqual(stopped.remove.map((r) => r.dir), [sa.dir, sc.dir]);
  assert.match(stopped.stoppedBy ?? '', /is still open/);
  await open.close();
});

test('bdsnap forget on the command line: --dry-run, --json, and a bad --keep-within', async (t) => {
  const dir = tempDir(t, 'bdsnap-forget-');
  const image = makeImage(path.join(dir, 'disk.img'), 1 << 20, 'random', 7);
  const root = path.join(dir, 'snap');
  const s = [await session(image, root, at(1)), await session(image, root, at(2)), await session(image, root, at(3))];
  const cli = (args: string[]): ReturnType<typeof run> => run(process.execPath, [BDSNAP_MAIN, 'forget', image, '--snapshot-root', root, ...args], { allowFailure: true, timeoutMs: 30_000, env: { ...process.env, BDSNAP_RUN_DIR: path.join(dir, 'no-daemon') } });
  const dry = await cli(['--keep-last', '1', '--dry-run']);
  assert.equal(dry.exitCode, 0, dry.stderr);
  assert.match(dry.stdout, /2 session\(s\) would be removed, 1 kept/);
  assert.equal((await listSessions(root, image)).length, 3);
  const bad = await cli(['--keep-within', 'soon']);
  assert.notEqual(bad.exitCode, 0);
  assert.match(bad.stderr, /--keep-within takes a duration such as 30d/);
  const done = await cli(['--keep-last', '1', '--json']);
  assert.equal(done.exitCode, 0, done.stderr);
  const out = JSON.parse(done.stdout) as { remove: Array<{ dir: string }>; keep: string[] };
  assert.deepEqual(out.keep, [s[2]!.dir]);
  assert.deepEqual((await listSessions(root, image)).map((x) => x.dir), [s[2]!.dir]);
});
