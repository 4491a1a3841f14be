/**
 * fio's nbd engine writes with checksums and reads everything back (--verify=crc32c),
 * random 4 KiB and sequential 1 MiB at queue depth 16: many requests in flight on one
 * connection, completed out of order, must all land where they were aimed.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { CleanupStack } from '../../testkit/cleanup.js';
import { makeImage, makeTempDir } from '../../testkit/files.js';
import { runFio } from '../../testkit/fio.js';
import { needs } from '../../testkit/needs.js';
import { startServer } from '../../testkit/server.js';

const IMAGE_BYTES = 32 << 20;

for (const { rw, blockSizeBytes } of [
  { rw: 'randwrite', blockSizeBytes: 4096 },
  { rw: 'write', blockSizeBytes: 1 << 20 },
]) {
  test(`fio nbd engine: ${rw} ${blockSizeBytes / 1024} KiB, depth 16, verified with crc32c`, { timeout: 180_000 }, async (t) => {
    if (!needs(t, { tools: ['fio'] })) return;
    const cleanup = new CleanupStack(t);
    const dir = makeTempDir(cleanup);
    const image = path.join(dir, 'fio.img');
    makeImage(image, IMAGE_BYTES, 'blocks');
    const server = await startServer(cleanup, { images: [image] });
    const result = await runFio({ uri: server.uri(image), rw, blockSizeBytes, ioDepth: 16, sizeBytes: IMAGE_BYTES, verify: 'crc32c' });
    assert.equal(result.error, 0, `fio job error:\n${result.stderr}`);
    assert.doesNotMatch(result.stderr, /verify|bad magic|crc32c/i, `fio reported a verification problem:\n${result.stderr}`);
    // One pass writes the whole region, and the verify phase reads all of it back.
    assert.equal(result.write.ioBytes, IMAGE_BYTES, 'every block written');
    assert.equal(result.read.ioBytes, IMAGE_BYTES, 'every block read back and verified');
    assert.equal(server.running(), true, server.stderr());
  });
}
