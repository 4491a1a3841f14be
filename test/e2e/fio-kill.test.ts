/**
 * `bdsnap serve --snapshot-root` killed with SIGKILL while fio (engine nbd, libnbd inside)
 * is random-writing 4 KiB and 64 KiB blocks at depth 16: the session left on disk is still
 * 'active', recovery marks it 'interrupted', and restore gives back the exact pre-session
 * image (sha256). Whatever fio had acknowledged, or had merely sent, must not matter.
 */

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { readSessionInfo, recoverSession } from '../../src/snapshot/index.js';
import { CleanupStack } from '../../testkit/cleanup.js';
import { makeImage, makeTempDir, sha256File } from '../../testkit/files.js';
import { requireTool, run } from '../../testkit/process.js';
import { needs } from '../../testkit/needs.js';
import { BDSNAP_MAIN, settlesWithin, startServer } from '../../testkit/server.js';

const IMAGE_BYTES = 256 << 20;
const KILL_AFTER_MS = 2000;
const SESSION_LINE = /^bdsnap: session started: (.+)$/m;

interface Variant {
  durability: 'process' | 'strict';
  chunkSize: string;
  /** Recover in-process before restoring, or let `bdsnap restore` meet the 'active' leftover. */
  recoverFirst: boolean;
  /** Run restore a second time (it costs a full read of the touched chunks, so once is enough). */
  idempotenceCheck: boolean;
  fioSeed: number;
}

const VARIANTS: Variant[] = [
  { durability: 'process', chunkSize: '64K', recoverFirst: false, idempotenceCheck: true, fioSeed: 11 },
  { durability: 'strict', chunkSize: '64K', recoverFirst: true, idempotenceCheck: false, fioSeed: 22 },
  { durability: 'process', chunkSize: '4K', recoverFirst: true, idempotenceCheck: false, fioSeed: 33 },
];

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

interface RestoreJson {
  sessionsApplied: string[];
  chunks: number;
  digestCheck: string;
  alreadyRestored: boolean;
  warnings: string[];
}

/** One random master image per file run; each variant works on its own copy (a distinct inode). */
let masterDir = '';
let masterImage = '';
let masterSha = '';

before(async () => {
  masterDir = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-e2e-master-'));
  masterImage = path.join(masterDir, 'master.img');
  makeImage(masterImage, IMAGE_BYTES, 'random', 4242);
  masterSha = await sha256File(masterImage);
});

after(() => fs.rmSync(masterDir, { recursive: true, force: true }));

for (const variant of VARIANTS) {
  const label = `${variant.durability} durability, ${variant.chunkSize} chunks`;
  test(`SIGKILL of bdsnap serve under fio random writes (${label}): restore gives back the exact image`, { timeout: 120_000 }, async (t) => {
    if (!needs(t, { tools: ['fio'] })) return;
    const cleanup = new CleanupStack(t);
    const dir = makeTempDir(cleanup, 'bdsnap-e2e-fio-');
    const image = path.join(dir, 'disk.img');
    fs.copyFileSync(masterImage, image);
    const originalSha = masterSha;
    const root = path.join(dir, 'snapshots');

    const server = await startServer(cleanup, {
      kind: 'bdsnap',
      images: [image],
      extraArgs: ['--snapshot-root', root, '--durability', variant.durability, '--chunk-size', variant.chunkSize],
    });
    const device = server.exportNames[0] as string;

    // fio's own runtime is far past the kill, so it is certainly writing when the server dies.
    const fio = spawn(requireTool('fio'), [
      '--name=kill', '--ioengine=nbd', `--uri=${server.uri(device)}`, '--rw=randwrite', '--bssplit=4k/50:64k/50',
      '--iodepth=16', `--size=${IMAGE_BYTES}`, '--time_based=1', '--runtime=60', `--randseed=${variant.fioSeed}`,
      '--norandommap=1',
    ], { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] }); // fio's state files go to the test's directory
    let fioOutput = '';
    fio.stdout.on('data', (b: Buffer) => (fioOutput += b.toString('utf8')));
    fio.stderr.on('data', (b: Buffer) => (fioOutput += b.toString('utf8')));
    const fioExit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
      fio.once('close', (code, signal) => resolve({ code, signal }));
    });
    cleanup.after(async () => {
      if (fio.exitCode === null && fio.signalCode === null) fio.kill('SIGKILL');
      await fioExit;
    });

    // The session directory appears with the first write; then let fio run for a while.
    const deadlineMs = Date.now() + 15_000;
    while (!SESSION_LINE.test(server.stderr())) {
      assert.ok(Date.now() < deadlineMs, `no session started within 15 s\n--- server ---\n${server.stderr()}\n--- fio ---\n${fioOutput}`);
      assert.equal(fio.exitCode, null, `fio ended before any session started:\n${fioOutput}`);
      await sleep(20);
    }
    const sessionDir = SESSION_LINE.exec(server.stderr())?.[1] as string;
    await sleep(KILL_AFTER_MS);
    assert.ok(fio.exitCode === null && fio.signalCode === null, `fio must still be writing when the server is killed:\n${fioOutput}`);
    process.kill(server.pid, 'SIGKILL');
    const serverExit = await server.waitForExit(10_000);
    assert.equal(serverExit?.signal, 'SIGKILL', `the server died by SIGKILL, not on its own: ${JSON.stringify(serverExit)}\n${server.stderr()}`);

    assert.ok(await settlesWithin(fioExit, 30_000), `fio did not notice the dead server within 30 s:\n${fioOutput}`);
    const fioEnd = await fioExit;
    assert.ok(fioEnd.code !== 0, `fio must end with errors once its server is gone, got ${JSON.stringify(fioEnd)}:\n${fioOutput}`);

    const leftover = await readSessionInfo(sessionDir);
    assert.equal(leftover.state, 'active', 'a killed server leaves the session open on disk');
    assert.equal(leftover.devicePath, device);
    assert.equal(leftover.durability, variant.durability);
    assert.notEqual(await sha256File(image), originalSha, 'fio changed the image before the kill');

    if (variant.recoverFirst) {
      const recovered = await recoverSession(sessionDir);
      assert.equal(recovered.state, 'interrupted');
      assert.ok(recovered.preservedChunks > 0, 'the recovered session holds originals');
      assert.ok(recovered.recovery !== undefined, 'recovery reports what it cut from the store');
    }

    const t0 = Date.now();
    const restored = await run(process.execPath, [BDSNAP_MAIN, 'restore', sessionDir, '--json'], { timeoutMs: 60_000 });
    const summary = JSON.parse(restored.stdout) as RestoreJson;
    assert.deepEqual(summary.sessionsApplied, [path.resolve(sessionDir)]);
    assert.equal(summary.digestCheck, 'partial', 'an interrupted session has no end digests to check');
    if (!variant.recoverFirst) {
      assert.ok(summary.warnings.some((w) => /never closed/.test(w)), `restore says it met an unclosed session: ${JSON.stringify(summary.warnings)}`);
    }

    const after = await readSessionInfo(sessionDir);
    assert.equal(after.state, 'interrupted', 'after restore the manifest says interrupted');
    assert.equal(summary.chunks, after.preservedChunks, 'every preserved chunk was written back');
    assert.equal(await sha256File(image), originalSha, 'the image is back to its pre-session content');

    // Idempotent: a second run finds the device already restored and writes nothing.
    t.diagnostic(`restore of ${summary.chunks} chunks: ${Date.now() - t0} ms (process start included)`);

    if (variant.idempotenceCheck) {
      // A second run finds the device already restored and writes nothing.
      const again = JSON.parse((await run(process.execPath, [BDSNAP_MAIN, 'restore', sessionDir, '--json'], { timeoutMs: 60_000 })).stdout) as RestoreJson;
      assert.equal(again.alreadyRestored, true);
      assert.equal(again.chunks, 0);
      assert.equal(await sha256File(image), originalSha);
    }
  });
}
