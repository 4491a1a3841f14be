/**
 * Faults of a backup into S3, against a radosgw of this file's own (it is killed here): the
 * gateway killed in the middle of a backup and started again, `backup create` itself killed,
 * and the bucket's quota reached in the middle of a backup. Afterwards no half backup is visible, the repository verifies, the last committed
 * backup restores exactly, and the next backup works.
 */

import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { BDSNAP_MAIN } from '../../testkit/bdsnap-cli.js';
import { ok, sandbox, startDaemon, type Sandbox } from '../../testkit/daemon.js';
import { makeImage } from '../../testkit/files.js';
import { rgwForFile } from '../helpers/rgw.js';
import { parseRepoLocation } from '../../src/repository/location.js';
import { PACKS_PREFIX } from '../../src/repository/format.js';
import { S3Store } from '../../src/repository/s3-store.js';
import type { Created } from './daemon-cycles.js';

const rgw = rgwForFile({ own: true });
const BYTES = 64 << 20;

/** A `backup create` in its own process, and its end (exit code and stderr). */
function startCreate(box: Sandbox, device: string, repo: string): { child: ChildProcess; done: Promise<{ code: number | null; signal: string | null; out: string; err: string }> } {
  const child = spawn(process.execPath, [BDSNAP_MAIN, 'backup', 'create', device, '--repo', repo, '--json'], { env: box.env, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const done = new Promise<{ code: number | null; signal: string | null; out: string; err: string }>((resolve) => child.once('exit', (code, signal) => resolve({ code, signal, out, err })));
  return { child, done };
}

/** Resolves once the repository holds more than `count` packs (the backup is under way). */
async function packsBeyond(repo: string, count: number): Promise<void> {
  const at = parseRepoLocation(repo);
  if (at.kind !== 's3') throw new Error('not s3');
  const store = new S3Store(at);
  try {
    const deadline = Date.now() + 120_000;
    while ((await store.names(PACKS_PREFIX)).length <= count) {
      if (Date.now() > deadline) throw new Error('the backup stored no new pack within 120 s');
      await sleep(100);
    }
  } finally {
    store.close();
  }
}

async function bucketBytes(repo: string): Promise<number> {
  const at = parseRepoLocation(repo);
  if (at.kind !== 's3') throw new Error('not s3');
  const store = new S3Store(at);
  try {
    return (await store.list('')).reduce((n, o) => n + o.sizeBytes, 0);
  } finally {
    store.close();
  }
}

async function packCount(repo: string): Promise<number> {
  const at = parseRepoLocation(repo);
  if (at.kind !== 's3') throw new Error('not s3');
  const store = new S3Store(at);
  try {
    return (await store.names(PACKS_PREFIX)).length;
  } finally {
    store.close();
  }
}

function restoresExactly(box: Sandbox, repo: string, id: string, device: string, want: Buffer): void {
  const out = path.join(box.top, `restored-${id}.img`);
  ok(box, ['backup', 'restore', '--repo', repo, id, device, '--output', out]);
  assert.ok(fs.readFileSync(out).equals(want), `backup ${id} restores exactly`);
  fs.rmSync(out);
}

function listed(box: Sandbox, repo: string): Array<{ id: string; error?: string }> {
  return JSON.parse(ok(box, ['backup', 'list', '--repo', repo, '--json'])) as Array<{ id: string; error?: string }>;
}

/** A first committed backup of a random image, then the image changed all over for the next. */
async function setUp(t: TestContext): Promise<{ box: Sandbox; repo: string; device: string; first: Created; firstImage: Buffer } | undefined> {
  const r = await rgw(t);
  if (!r) return undefined;
  Object.assign(process.env, r.env);
  const box = sandbox(t);
  Object.assign(box.env, r.env);
  const device = makeImage(path.join(box.top, 'disk.img'), BYTES, 'random', 3);
  await startDaemon(t, { sandbox: box, password: false });
  const repo = r.newRepo('faults');
  // Small packs: a backup of BYTES writes some 64 of them, so a fault lands well inside one.
  ok(box, ['backup', 'init', '--repo', repo, '--pack-size', '1M']);
  const first = JSON.parse(ok(box, ['backup', 'create', device, '--repo', repo, '--json'])) as Created;
  const firstImage = fs.readFileSync(device);
  makeImage(device, BYTES, 'random', 4);
  return { box, repo, device, first, firstImage };
}

test('radosgw killed in the middle of a backup and started again: the backup rides it out, the repository verifies, the next backup works', { timeout: 400_000 }, async (t) => {
  const s = await setUp(t);
  if (!s) return;
  const r = (await rgw(t))!;
  const before = await packCount(s.repo);
  const create = startCreate(s.box, s.device, s.repo);
  await packsBeyond(s.repo, before + 20);
  await r.killGateway();
  await sleep(2_000);
  await r.startGateway();
  const end = await create.done;
  // Its retries outlast a restart of a few seconds: the backup goes on and completes.
  assert.equal(end.code, 0, `backup create rode out the restart: ${end.err}`);
  const second = JSON.parse(end.out) as Created;
  const ids = listed(s.box, s.repo);
  assert.deepEqual(ids, ids.filter((l) => l.error === undefined), 'no damaged backup is listed');
  assert.deepEqual(ids.map((l) => l.id), [s.first.id, second.id]);
  restoresExactly(s.box, s.repo, second.id, s.device, fs.readFileSync(s.device));
  ok(s.box, ['backup', 'verify', '--repo', s.repo]);
  restoresExactly(s.box, s.repo, s.first.id, s.device, s.firstImage);
  const next = JSON.parse(ok(s.box, ['backup', 'create', s.device, '--repo', s.repo, '--json'])) as Created;
  restoresExactly(s.box, s.repo, next.id, s.device, fs.readFileSync(s.device));
});

test('SIGKILL of backup create leaves nothing half visible; the repository verifies and the next backup works', { timeout: 400_000 }, async (t) => {
  const s = await setUp(t);
  if (!s) return;
  const before = await packCount(s.repo);
  const create = startCreate(s.box, s.device, s.repo);
  await packsBeyond(s.repo, before + 20);
  create.child.kill('SIGKILL');
  const end = await create.done;
  assert.equal(end.signal, 'SIGKILL');
  assert.deepEqual(listed(s.box, s.repo).map((l) => l.id), [s.first.id], 'only the committed backup is listed');
  ok(s.box, ['backup', 'verify', '--repo', s.repo]);
  restoresExactly(s.box, s.repo, s.first.id, s.device, s.firstImage);
  // The killed create's snapshot is the daemon's to clean up; a new backup goes ahead.
  const next = JSON.parse(ok(s.box, ['backup', 'create', s.device, '--repo', s.repo, '--json'])) as Created;
  restoresExactly(s.box, s.repo, next.id, s.device, fs.readFileSync(s.device));
  assert.deepEqual(listed(s.box, s.repo).map((l) => l.id), [s.first.id, next.id]);
});

test('the bucket quota reached in the middle of a backup: a clear error soon, no half backup; verify passes, the last backup restores, and a backup after the quota is raised works', { timeout: 400_000 }, async (t) => {
  const s = await setUp(t);
  if (!s) return;
  const r = (await rgw(t))!;
  const at = parseRepoLocation(s.repo);
  if (at.kind !== 's3') throw new Error('not s3');
  // Room for a quarter of the next backup's packs: it fails well inside its upload.
  await r.setBucketQuota(at.bucket, await bucketBytes(s.repo) + BYTES / 4);
  const startedMs = Date.now();
  const end = await startCreate(s.box, s.device, s.repo).done;
  const tookMs = Date.now() - startedMs;
  assert.equal(end.code, 1, `backup create fails: ${end.err}`);
  // Not retried as if it might pass: the quota stays until someone changes it.
  assert.ok(tookMs < 60_000, `it fails within a minute, not after retrying (${tookMs} ms)`);
  const lines = end.err.trim().split('\n');
  assert.equal(lines.length, 1, `one line on stderr: ${end.err}`);
  assert.match(lines[0]!, /the bucket is over its quota/, 'it says the bucket is over its quota');
  assert.match(lines[0]!, /raise the bucket's quota/, 'it says what to do');
  assert.deepEqual(listed(s.box, s.repo).map((l) => l.id), [s.first.id], 'only the committed backup is listed');
  ok(s.box, ['backup', 'verify', '--repo', s.repo]);
  restoresExactly(s.box, s.repo, s.first.id, s.device, s.firstImage);
  await r.setBucketQuota(at.bucket, null);
  const next = JSON.parse(ok(s.box, ['backup', 'create', s.device, '--repo', s.repo, '--json'])) as Created;
  restoresExactly(s.box, s.repo, next.id, s.device, fs.readFileSync(s.device));
  assert.deepEqual(listed(s.box, s.repo).map((l) => l.id), [s.first.id, next.id]);
});
