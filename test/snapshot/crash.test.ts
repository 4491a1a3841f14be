/**
 * A real process killed with SIGKILL while writing through a CowDevice: the session recovers
 * and restores the image to exactly its pre-session content.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { listSessions, recoverSession, restore } from '../../src/snapshot/index.js';
import { makeImage, sha256File } from '../../testkit/files.js';
import { killWhileWriting, tempDir } from './helpers.js';

const WRITER = fileURLToPath(new URL('./fixtures/crash-writer.js', import.meta.url));

async function killSessionWriter(image: string, root: string, chunkSize: number, durability: string, runMs: number): Promise<string> {
  const out = await killWhileWriting(WRITER, [image, root, String(chunkSize), durability], runMs);
  return out.split('\n')[0]!.replace(/^ready /, '');
}

for (const [durability, chunkSize, runMs] of [['process', 65536, 400], ['process', 4096, 150], ['strict', 16384, 300]] as const) {
  test(`SIGKILL while writing (${durability}, ${chunkSize / 1024} KiB chunks): recover and restore give the pre-session image`, async (t) => {
    const dir = tempDir(t, 'bdsnap-crash-');
    const image = makeImage(path.join(dir, 'disk.img'), 16 << 20, 'random', 1);
    const root = path.join(dir, 'snap');
    const before = await sha256File(image);
    const sessionDir = await killSessionWriter(image, root, chunkSize, durability, runMs);
    assert.notEqual(await sha256File(image), before, 'the writer changed the image');
    assert.equal((await listSessions(root))[0]?.state, 'active');
    const info = await recoverSession(sessionDir);
    assert.equal(info.state, 'interrupted');
    assert.ok(info.preservedChunks > 0);
    const summary = await restore(sessionDir);
    assert.equal(summary.digestCheck, 'partial');
    assert.match(summary.warnings.join('\n'), /interrupted/);
    assert.equal(await sha256File(image), before);
  });
}

test('SIGKILL, then restore straight away: the never-closed session is recovered by restore itself', async (t) => {
  const dir = tempDir(t, 'bdsnap-crash-');
  const image = makeImage(path.join(dir, 'disk.img'), 8 << 20, 'random', 2);
  const root = path.join(dir, 'snap');
  const before = await sha256File(image);
  const sessionDir = await killSessionWriter(image, root, 65536, 'process', 200);
  const plan = await restore(sessionDir, { dryRun: true });
  assert.match(plan.warnings.join('\n'), /never closed/);
  assert.equal((await listSessions(root))[0]?.state, 'active', 'a dry run changes nothing');
  await restore(sessionDir);
  assert.equal(await sha256File(image), before);
  assert.equal((await listSessions(root))[0]?.state, 'interrupted');
});
