/**
 * Every grading scenario of the course through `bdsnap serve --snapshot-root` as a real
 * process: the mount's writes go over NBD (the in-process client for most scenarios, one
 * `bdsnap sffs write --socket` process per write for some, several at once for the
 * concurrent one), the server is stopped (ending the session durably), and `bdsnap restore`
 * gives back the image byte for byte. With 4 KiB chunks the session's preserved chunks are
 * exactly the device blocks the scenario changes: nothing missed, nothing copied for nothing.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { SingleFileFs } from '../../src/fs/singlefilefs/file.js';
import { connectNbd } from '../../src/fs/singlefilefs/nbd.js';
import { INDEX_FILE, decodeIndex } from '../../src/snapshot/format.js';
import { listSessions } from '../../src/snapshot/index.js';
import { CleanupStack } from '../../testkit/cleanup.js';
import { makeTempDir, sha256, sha256File } from '../../testkit/files.js';
import { run } from '../../testkit/process.js';
import { BDSNAP_MAIN, startServer } from '../../testkit/server.js';
import { GRADING_SCENARIOS, assertScenarioOutcome, prepareScenarioImage, sffsCliWriter, type SingleFileWriter } from '../sffs/scenarios.js';

const CHUNK_BYTES = 4096;

/** Scenarios whose writes run as real `bdsnap sffs write --socket` processes; the rest in-process. */
const THROUGH_CLI = new Set(['first block', 'write at 4093 crossing into the next block and growing the file', 'several writers at once']);

interface RestoreJson {
  sessionsApplied: string[];
  chunks: number;
  digestCheck: string;
}

for (const scenario of GRADING_SCENARIOS) {
  const how = THROUGH_CLI.has(scenario.name) ? 'sffs write processes' : 'in-process NBD client';
  test(`bdsnap serve --snapshot-root, ${how}: ${scenario.name}; restore gives back the image`, { timeout: 60_000 }, async (t) => {
    const cleanup = new CleanupStack(t);
    const dir = makeTempDir(cleanup, 'bdsnap-e2e-sffs-');
    const image = path.join(dir, 'sffs.img');
    const root = path.join(dir, 'snapshots');
    const before = await prepareScenarioImage(image, scenario);
    const beforeSha = sha256(before);

    const server = await startServer(cleanup, {
      kind: 'bdsnap',
      images: [image],
      extraArgs: ['--snapshot-root', root, '--chunk-size', String(CHUNK_BYTES)],
    });
    const device = server.exportNames[0] as string;

    if (THROUGH_CLI.has(scenario.name)) {
      await scenario.run(sffsCliWriter(['--socket', server.socketPath], image));
    } else {
      const nbd = await connectNbd({ socketPath: server.socketPath, exportName: device });
      try {
        const mounted: SingleFileFs = await SingleFileFs.open(nbd);
        const writer: SingleFileWriter = mounted;
        await scenario.run(writer);
        await mounted.flush();
      } finally {
        await nbd.close();
      }
    }

    const stopped = await server.stop();
    assert.deepEqual(stopped, { exitCode: 0, signal: null, killed: false }, `serve stops cleanly on SIGTERM:\n${server.stderr()}`);

    const sessions = await listSessions(root);
    if (scenario.changedBlocks.length === 0) {
      assert.deepEqual(sessions, [], 'a mount that modifies nothing leaves no session directory');
      assert.doesNotMatch(server.stderr(), /session started/);
      assert.equal(await sha256File(image), beforeSha, 'the image is untouched');
      return;
    }

    await assertScenarioOutcome(scenario, image, before);
    assert.equal(sessions.length, 1, `one session for the whole time the image was served: ${JSON.stringify(sessions.map((s) => s.dir))}`);
    const session = sessions[0]!;
    assert.match(server.stderr(), new RegExp(`^bdsnap: session started: ${escapeRegExp(session.dir)}$`, 'm'));
    assert.match(server.stderr(), new RegExp(`^bdsnap: session ended: ${escapeRegExp(session.dir)}$`, 'm'));
    assert.equal(session.state, 'complete');
    assert.equal(session.devicePath, device);
    assert.equal(session.chunkSize, CHUNK_BYTES);
    assert.equal(session.preservedChunks, scenario.changedBlocks.length, 'manifest: one preserved chunk per changed block');
    assert.equal(session.preservedBytes, scenario.changedBlocks.length * CHUNK_BYTES);
    assert.equal(session.digestedChunks, scenario.changedBlocks.length, 'manifest: an end digest per preserved chunk');
    const index = decodeIndex(fs.readFileSync(path.join(session.dir, INDEX_FILE)));
    assert.deepEqual([...index.keys()].sort((a, b) => a - b), scenario.changedBlocks, 'the preserved chunks are exactly the changed blocks');

    const restored = await run(process.execPath, [BDSNAP_MAIN, 'restore', session.dir, '--json'], { timeoutMs: 30_000 });
    const summary = JSON.parse(restored.stdout) as RestoreJson;
    assert.deepEqual(summary.sessionsApplied, [session.dir]);
    assert.equal(summary.chunks, scenario.changedBlocks.length);
    assert.equal(summary.digestCheck, 'verified', 'the end digests of a cleanly stopped session match the image');
    assert.equal(await sha256File(image), beforeSha, 'restore gives back the image as it was before the session');
  });
}

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}
