/** `bdsnap restore` as a real process: exit codes, one-line stderr, --json, --dry-run, --output. */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { FileDevice } from '../../src/device/file-device.js';
import { CowDevice, type RestoreSummary } from '../../src/snapshot/index.js';
import { makeImage, sha256File } from '../../testkit/files.js';
import { tempDir } from './helpers.js';
import { BDSNAP_MAIN as MAIN } from '../../testkit/bdsnap-cli.js';


function bdsnap(args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [MAIN, ...args], { encoding: 'utf8', timeout: 60000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

async function makeSession(dir: string): Promise<{ image: string; sessionDir: string; before: string }> {
  const image = makeImage(path.join(dir, 'disk.img'), 2 << 20, 'random', 1);
  const before = await sha256File(image);
  const dev = await FileDevice.open(image);
  try {
    // 64 KiB chunks: 300,000 bytes at 12,345 touch chunks 0..4 (5 chunks, 327,680 bytes).
    const cow = CowDevice.create(dev, { devicePath: image, snapshotRoot: path.join(dir, 'snap'), chunkSize: 65536, deviceIdentity: { ...dev.identity } });
    await cow.write(randomBytes(300_000), 12345);
    const summary = await cow.close();
    return { image, sessionDir: summary!.sessionDir, before };
  } finally {
    await dev.close();
  }
}

test('bdsnap restore: --dry-run, --json, --output, the restore itself and an idempotent re-run', async (t) => {
  const dir = tempDir(t);
  const { image, sessionDir, before } = await makeSession(dir);
  const changed = await sha256File(image);

  const dry = bdsnap(['restore', sessionDir, '--dry-run']);
  assert.equal(dry.status, 0, dry.stderr);
  assert.match(dry.stdout, /plan: restore .* to the start of/);
  assert.match(dry.stdout, /chunks: 5, bytes: 327680/);
  assert.equal(await sha256File(image), changed);

  const output = path.join(dir, 'copy.img');
  const copy = bdsnap(['restore', sessionDir, '--output', output, '--json']);
  assert.equal(copy.status, 0, copy.stderr);
  const copySummary = JSON.parse(copy.stdout) as RestoreSummary;
  assert.equal(copySummary.targetPath, output);
  assert.equal(copySummary.bytes, 327680);
  assert.equal(await sha256File(output), before);
  assert.equal(await sha256File(image), changed);

  const real = bdsnap(['restore', sessionDir]);
  assert.equal(real.status, 0, real.stderr);
  assert.match(real.stdout, /restored .* sessions applied: 1, chunks: 5, bytes: 327680/s);
  assert.equal(real.stderr, '', 'no progress bar when stderr is not a terminal');
  assert.equal(await sha256File(image), before);

  const again = bdsnap(['restore', sessionDir, '--json']);
  assert.equal(again.status, 0, again.stderr);
  assert.equal((JSON.parse(again.stdout) as RestoreSummary).alreadyRestored, true);
  // A dry run says what the real run would write now: nothing.
  const dryAgain = bdsnap(['restore', sessionDir, '--dry-run', '--json']);
  assert.equal(dryAgain.status, 0, dryAgain.stderr);
  const planned = JSON.parse(dryAgain.stdout) as RestoreSummary;
  assert.deepEqual([planned.alreadyRestored, planned.chunks, planned.bytes], [true, 0, 0]);
});

test('bdsnap restore failures: exit 1 with one line on stderr; usage errors exit 2', async (t) => {
  const dir = tempDir(t);
  const { image, sessionDir } = await makeSession(dir);
  fs.appendFileSync(image, Buffer.alloc(4096));
  const mismatch = bdsnap(['restore', sessionDir]);
  assert.equal(mismatch.status, 1);
  assert.equal(mismatch.stdout, '');
  assert.match(mismatch.stderr, /^bdsnap: .* is 2101248 bytes but session .* recorded 2097152 bytes\n$/);

  const missing = bdsnap(['restore', path.join(dir, 'no-such-session')]);
  assert.equal(missing.status, 1);
  assert.match(missing.stderr, /^bdsnap: .*no such session directory\n$/);

  const usage = bdsnap(['restore']);
  assert.equal(usage.status, 2);
  assert.match(usage.stderr, /missing required argument/);
});
