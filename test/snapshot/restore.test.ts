/** Restore: checks before any byte is written, --output, --dry-run, re-runs, chains and refusals. */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import { FileDevice } from '../../src/device/file-device.js';
import { DATA_FILE, DIGESTS_FILE, INDEX_FILE, JOURNAL_FILE, MANIFEST_FILE, decodeDigests, encodeDigestArrays } from '../../src/snapshot/format.js';
import { CowDevice, restore } from '../../src/snapshot/index.js';
import { readDeviceStamp } from '../../src/host/device-stamp.js';
import { needs } from '../../testkit/needs.js';
import { makeImage, sha256File } from '../../testkit/files.js';
import { isError, tempDir, type TestContext } from './helpers.js';

const CS = 16384;

/** Run one session of random writes over `image`; returns its directory. */
async function session(image: string, root: string, writes: Array<[number, number]>, mountTime?: Date): Promise<string> {
  const dev = await FileDevice.open(image);
  try {
    const cow = CowDevice.create(dev, { devicePath: image, snapshotRoot: root, chunkSize: CS, deviceIdentity: { ...dev.identity }, mountTime });
    for (const [offset, length] of writes) await cow.write(randomBytes(length), offset);
    const summary = await cow.close();
    assert.equal(summary?.state, 'complete');
    return summary.sessionDir;
  } finally {
    await dev.close();
  }
}

async function setup(t: TestContext): Promise<{ dir: string; image: string; root: string; before: string }> {
  const dir = tempDir(t);
  const image = makeImage(path.join(dir, 'disk.img'), 4 << 20, 'random', 1);
  return { dir, image, root: path.join(dir, 'snap'), before: await sha256File(image) };
}

const WRITES: Array<[number, number]> = [[0, 5000], [100_000, 70_000], [3 << 20, 1 << 20]];

test('corrupt or missing store files are refused and the device is left byte-identical', async (t) => {
  const cases: Array<[string, (sessionDir: string) => void, RegExp, 'ECORRUPT' | 'ENOENT']> = [
    ['flipped byte in data', (d) => flip(path.join(d, DATA_FILE), 70_000), /checksum mismatch at byte/, 'ECORRUPT'],
    ['flipped byte in a record header', (d) => flip(path.join(d, DATA_FILE), 20), /header checksum/, 'ECORRUPT'],
    ['truncated data', (d) => fs.truncateSync(path.join(d, DATA_FILE), fs.statSync(path.join(d, DATA_FILE)).size - 1000), /truncated/, 'ECORRUPT'],
    ['data cut at a record boundary', (d) => fs.truncateSync(path.join(d, DATA_FILE), 64 + CS), /manifest records/, 'ECORRUPT'],
    ['missing data', (d) => fs.rmSync(path.join(d, DATA_FILE)), /data file data.bin is missing/, 'ECORRUPT'],
    ['missing manifest', (d) => fs.rmSync(path.join(d, MANIFEST_FILE)), /manifest manifest.json is missing/, 'ENOENT'],
    ['garbled manifest', (d) => fs.writeFileSync(path.join(d, MANIFEST_FILE), '{"format": "bdsnap-session", "version": 1'), /not valid JSON/, 'ECORRUPT'],
    ['manifest of another format version', (d) => rewriteManifest(d, { version: 7 }), /manifest is invalid: version/, 'ECORRUPT'],
    ['flipped byte in digests', (d) => flip(path.join(d, DIGESTS_FILE), 30), /digests.bin fails its checksum/, 'ECORRUPT'],
    ['missing digests', (d) => fs.rmSync(path.join(d, DIGESTS_FILE)), /digests.bin is missing/, 'ECORRUPT'],
    ['flipped byte in index', (d) => flip(path.join(d, INDEX_FILE), 20), /index.bin/, 'ECORRUPT'],
  ];
  for (const [name, damage, message, code] of cases) {
    const { image, root } = await setup(t);
    const sessionDir = await session(image, root, WRITES);
    const changed = await sha256File(image);
    damage(sessionDir);
    await assert.rejects(restore(sessionDir), isError(code, message), name);
    await assert.rejects(restore(sessionDir, { force: true }), isError(code), `${name} with --force`);
    assert.equal(await sha256File(image), changed, `${name}: the device is untouched`);
  }
});

function flip(file: string, at: number): void {
  const b = fs.readFileSync(file);
  b[at]! ^= 0x01;
  fs.writeFileSync(file, b);
}

function rewriteManifest(dir: string, patch: Record<string, unknown>): void {
  const file = path.join(dir, MANIFEST_FILE);
  fs.writeFileSync(file, JSON.stringify({ ...JSON.parse(fs.readFileSync(file, 'utf8')), ...patch }));
}

/**
 * After a test changed the image outside bdsnap and put the bytes back: make the newest
 * session's end stamp the image's stamp now, as if nothing had written it, so the test can go on.
 */
async function restamp(sessionDir: string, image: string): Promise<void> {
  rewriteManifest(sessionDir, { endStamp: await readDeviceStamp(image) });
}

test('--output writes a restored copy and leaves the device alone; --dry-run writes nothing', async (t) => {
  const { dir, image, root, before } = await setup(t);
  const sessionDir = await session(image, root, WRITES);
  const changed = await sha256File(image);
  const plan = await restore(sessionDir, { dryRun: true });
  assert.equal(plan.dryRun, true);
  assert.equal(plan.chunks, 1 + 5 + 64);
  assert.equal(plan.bytes, 70 * CS);
  assert.equal(plan.digestCheck, 'verified');
  assert.equal(await sha256File(image), changed);
  assert.equal(fs.existsSync(path.join(sessionDir, JOURNAL_FILE)), false);

  const output = path.join(dir, 'restored.img');
  const progress: number[] = [];
  const summary = await restore(sessionDir, { output, onProgress: (done) => progress.push(done) });
  assert.equal(summary.targetPath, output);
  assert.equal(await sha256File(output), before);
  assert.equal(await sha256File(image), changed);
  assert.equal(progress.at(-1), 70 * CS);
  // The device is still restorable after that.
  await restore(sessionDir);
  assert.equal(await sha256File(image), before);
  await assert.rejects(restore(sessionDir, { output: image }), isError('EINVAL', /is the device itself/));
});

test('a re-run is harmless, and an interrupted restore finishes when run again', async (t) => {
  const { image, root, before } = await setup(t);
  const sessionDir = await session(image, root, WRITES);
  const first = await restore(sessionDir);
  assert.equal(first.bytes, 70 * CS);
  const second = await restore(sessionDir);
  assert.equal(second.alreadyRestored, true);
  assert.equal(second.bytes, 0);
  assert.equal(await sha256File(image), before);

  // An interruption: the journal says running and only part of the device has been put back.
  const { image: image2, root: root2, before: before2 } = await setup(t);
  const dir2 = await session(image2, root2, WRITES);
  fs.writeFileSync(path.join(dir2, JOURNAL_FILE), JSON.stringify({ state: 'running', devicePath: image2, sessions: [dir2], startedAt: new Date().toISOString() }));
  const restoredCopy = path.join(path.dirname(image2), 'copy.img');
  await restore(dir2, { output: restoredCopy });
  const fd = fs.openSync(image2, 'r+');
  fs.writeSync(fd, fs.readFileSync(restoredCopy).subarray(0, 100_000 + 20_000), 0, 120_000, 0);
  fs.closeSync(fd);
  const resumed = await restore(dir2);
  assert.equal(resumed.digestCheck, 'skipped-resume');
  assert.match(resumed.warnings.join(' '), /did not finish/);
  assert.equal(await sha256File(image2), before2);
});

test('a device changed outside bdsnap is refused with the chunk named; --force restores anyway', async (t) => {
  const { image, root, before } = await setup(t);
  const sessionDir = await session(image, root, WRITES);
  const fd = fs.openSync(image, 'r+');
  fs.writeSync(fd, Buffer.from('tampered'), 0, 8, 100_000 + 2 * CS);
  fs.closeSync(fd);
  const changed = await sha256File(image);
  await assert.rejects(restore(sessionDir), isError('EMISMATCH', /1 chunk\(s\) of .* differ from its end digests: chunk 8 \(bytes 131072\.\.147455\) vs the device.*--force/));
  assert.equal(await sha256File(image), changed);
  const forced = await restore(sessionDir, { force: true });
  assert.equal(forced.digestCheck, 'skipped-force');
  assert.equal(await sha256File(image), before);
});

test('newer sessions are applied first; a change between sessions, a failed newer session, size and identity are checked', async (t) => {
  const { image, root, before } = await setup(t);
  const s1 = await session(image, root, WRITES, new Date('2026-03-01T10:00:00Z'));
  const middle = await sha256File(image);
  const s2 = await session(image, root, [[50_000, 200_000], [3 << 20, 4096]], new Date('2026-03-01T11:00:00Z'));
  const end = await sha256File(image);
  const plan = await restore(s1, { dryRun: true });
  assert.deepEqual(plan.sessionsApplied, [s2, s1]);
  assert.equal(plan.digestCheck, 'verified');

  // A chunk touched by the older session only, changed between the two sessions: the older
  // session's digest no longer matches what the newer restore would give.
  const fd = fs.openSync(image, 'r+');
  const saved = Buffer.alloc(10);
  fs.readSync(fd, saved, 0, 10, 0);
  fs.writeSync(fd, Buffer.from('0123456789'), 0, 10, 0);
  fs.fsyncSync(fd);
  // s2 never touched chunk 0, so the change shows against s1's end digest of it.
  await assert.rejects(restore(s1), isError('EMISMATCH', /differ from its end digests: chunk 0 \(bytes 0\.\.16383\) vs the device/));
  fs.writeSync(fd, saved, 0, 10, 0);
  fs.closeSync(fd);
  assert.equal(await sha256File(image), end);
  // The same bytes back: a write outside bdsnap all the same, which restore cannot tell from a change.
  await assert.rejects(restore(s1), isError('EMISMATCH', /was written outside bdsnap after session .* ended and since \(.*mtime 20\d\d-.*Z \(\d+ ns\) -> .*\): .*--force/));
  await restamp(s2, image);

  // A newer failed session blocks the restore of an older one.
  rewriteManifest(s2, { state: 'failed', failedReason: 'the snapshot disk is full' });
  await assert.rejects(restore(s1), isError('ESESSION', /failed \(the snapshot disk is full\)/));
  rewriteManifest(s2, { state: 'complete', failedReason: null });

  // A newer session directory that cannot be read blocks it too.
  const bogus = `${s2}-9`;
  fs.mkdirSync(bogus);
  await assert.rejects(restore(s1), isError('ECORRUPT', /may be a newer session/));
  fs.rmdirSync(bogus);
  // An older one does not matter.
  const older = s1.replace(/_\d{8}T/, '_20000101T');
  fs.mkdirSync(older);
  assert.equal((await restore(s1, { dryRun: true })).digestCheck, 'verified');
  fs.rmdirSync(older);

  // Size and identity.
  const copy = `${image}.copy`;
  fs.copyFileSync(image, copy);
  fs.truncateSync(image, (4 << 20) + 4096);
  await assert.rejects(restore(s1), isError('EMISMATCH', /4198400 bytes but session .* recorded 4194304/));
  fs.rmSync(image);
  fs.renameSync(copy, image); // same bytes, a different file
  await assert.rejects(restore(s1), isError('EMISMATCH', /is not the device session .* was taken of \(ino/));
  // Sessions written before identities and stamps were recorded.
  rewriteManifest(s1, { deviceIdentity: {}, startStamp: undefined, endStamp: undefined });
  rewriteManifest(s2, { deviceIdentity: {}, startStamp: undefined, endStamp: undefined });
  const summary = await restore(s1);
  assert.deepEqual(summary.sessionsApplied, [s2, s1]);
  assert.equal(await sha256File(image), before);
  assert.notEqual(middle, before);
});

test('restore refuses while the device is open by a server or backs a loop device', async (t) => {
  const { image, root, before } = await setup(t);
  const sessionDir = await session(image, root, WRITES);
  const dev = await FileDevice.open(image);
  await assert.rejects(restore(sessionDir), isError('EBUSY', /already open/));
  await dev.close();
  // The loop-device check needs root (the skip policy of needs.ts decides what happens without it).
  if (!needs(t, { root: true, tools: ['losetup'] })) return;
  const loop = execFileSync('losetup', ['-f', '--show', image], { encoding: 'utf8' }).trim();
  try {
    await assert.rejects(restore(sessionDir), isError('EBUSY', new RegExp(`backing file of ${loop}`)));
  } finally {
    execFileSync('losetup', ['-d', loop]);
  }
  await restore(sessionDir);
  assert.equal(await sha256File(image), before, 'once released, the device is restored');
});

test('a missing session directory is ENOENT', async (t) => {
  const { dir } = await setup(t);
  await assert.rejects(restore(path.join(dir, 'nope')), isError('ENOENT', /no such session directory/));
});

test('after a restore, a later session is undone by restoring the same session again', async (t) => {
  const { image, root, before } = await setup(t);
  const s1 = await session(image, root, WRITES, new Date('2026-04-01T10:00:00Z'));
  await session(image, root, [[0, 100]], new Date('2026-04-01T11:00:00Z'));
  await restore(s1);
  assert.equal(await sha256File(image), before);
  // Mounted again after the restore: a new session on top of the restored content.
  const s3 = await session(image, root, [[10_000, 300_000]], new Date('2026-04-01T12:00:00Z'));
  const plan = await restore(s1, { dryRun: true });
  assert.equal(plan.digestCheck, 'partial');
  assert.deepEqual(plan.sessionsApplied, [s3, s1]);
  await restore(s1);
  assert.equal(await sha256File(image), before);

  // Changed outside bdsnap after the restore: no session explains it, so only --force goes on.
  const fd = fs.openSync(image, 'r+');
  fs.writeSync(fd, Buffer.from('outside'), 0, 7, 4096);
  fs.closeSync(fd);
  await assert.rejects(restore(s1), isError('EMISMATCH', /was restored from .* has changed since/));
  await restore(s1, { force: true });
  assert.equal(await sha256File(image), before);
});

/** Turn a session into one of the first format: sha256 end digests, no digestAlgorithm in the manifest. */
function toSha256Session(sessionDir: string, image: string): void {
  const chunks = [...decodeDigests(fs.readFileSync(path.join(sessionDir, DIGESTS_FILE))).chunks];
  const content = fs.readFileSync(image);
  const digests = Buffer.concat(chunks.map((c) => createHash('sha256').update(content.subarray(c * CS, (c + 1) * CS)).digest()));
  fs.writeFileSync(path.join(sessionDir, DIGESTS_FILE), encodeDigestArrays(chunks, digests));
  const file = path.join(sessionDir, MANIFEST_FILE);
  const manifest = JSON.parse(fs.readFileSync(file, 'utf8')) as Record<string, unknown>;
  assert.equal(manifest.digestAlgorithm, 'crc32x8', 'new sessions record their digest algorithm');
  delete manifest.digestAlgorithm;
  fs.writeFileSync(file, JSON.stringify(manifest));
}

test('sessions with sha256 end digests (written before the algorithm was recorded) still verify, alone and chained with crc32x8 ones', async (t) => {
  const { image, root, before } = await setup(t);
  const s1 = await session(image, root, WRITES, new Date('2026-03-01T10:00:00Z'));
  toSha256Session(s1, image);
  const s2 = await session(image, root, [[50_000, 200_000]], new Date('2026-03-01T11:00:00Z'));
  const plan = await restore(s1, { dryRun: true });
  assert.deepEqual(plan.sessionsApplied, [s2, s1]);
  assert.equal(plan.digestCheck, 'verified');

  // Chunk 0 is touched by s1 only: the device is checked against s1's sha256 digest; chunk 7
  // (bytes 114688..) by s2 last: against its crc32x8 digest.
  for (const [offset, chunk] of [[0, 0], [120_000, 7]] as const) {
    const fd = fs.openSync(image, 'r+');
    const saved = Buffer.alloc(1);
    fs.readSync(fd, saved, 0, 1, offset);
    fs.writeSync(fd, Buffer.from([saved[0]! ^ 0x01]), 0, 1, offset);
    await assert.rejects(restore(s1), isError('EMISMATCH', new RegExp(`differ from its end digests: chunk ${chunk} \\(`)));
    fs.writeSync(fd, saved, 0, 1, offset);
    fs.closeSync(fd);
    await restamp(s2, image);
  }
  const done = await restore(s1);
  assert.equal(done.digestCheck, 'verified');
  assert.equal(await sha256File(image), before);
});
