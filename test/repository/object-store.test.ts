/** LocalDirStore's staged writes: published in batches in the background, failures reported. */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { LocalDirStore } from '../../src/repository/object-store.js';
import { makeTempDir } from '../../testkit/files.js';
import { storeContract } from './store-contract.js';

/** Temp files (names starting with '.') anywhere under `dir`. */
function tempFiles(dir: string): string[] {
  return fs.readdirSync(dir, { recursive: true, withFileTypes: true }).filter((e) => e.isFile() && e.name.startsWith('.')).map((e) => path.join(e.parentPath, e.name));
}

const name = (i: number): string => `pieces/${(i % 7).toString(16).padStart(2, '0')}/object-${i}`;

test('staged objects: many batches, all whole after commit, no temp file left', { timeout: 30_000 }, async (t) => {
  const dir = makeTempDir(t, 'bdsnap-store-');
  const store = new LocalDirStore(dir);
  const count = 700;
  for (let i = 0; i < count; i++) await store.stage(name(i), [Buffer.from(`head ${i} `), Buffer.alloc(100 + i, i & 255)]);
  await store.commit();
  assert.deepEqual(tempFiles(dir), []);
  const names = new Set(await store.names('pieces/'));
  assert.equal(names.size, count);
  for (const i of [0, 1, 127, 128, 129, 555, count - 1]) {
    assert.ok(names.has(name(i)));
    assert.deepEqual(await store.get(name(i)), Buffer.concat([Buffer.from(`head ${i} `), Buffer.alloc(100 + i, i & 255)]));
  }
});

test('a stage still being written when its batch is published is an object after commit', { timeout: 60_000 }, async (t) => {
  // A backup stages several packs at once; a batch may be published while one of them is still
  // being written. That one must go with a later batch, not be lost with the one it missed.
  const dir = makeTempDir(t, 'bdsnap-store-');
  const store = new LocalDirStore(dir);
  let n = 0;
  for (let trial = 0; trial < 4; trial++) {
    const big = store.stage(name(n++), Buffer.alloc(48 << 20, trial + 1));
    // 128 small objects make a batch, published at once, while the big one is being written.
    for (let i = 0; i < 128; i++) await store.stage(name(n++), Buffer.from(`object ${n}`));
    await big;
  }
  await store.commit();
  assert.deepEqual(tempFiles(dir), [], 'no staged object is left unpublished');
  assert.equal(new Set(await store.names('pieces/')).size, n);
});

test('a batch that fails to publish in the background fails the next stage or the commit, and discard leaves no temp file', { timeout: 30_000 }, async (t) => {
  const dir = makeTempDir(t, 'bdsnap-store-');
  const store = new LocalDirStore(dir);
  let i = 0;
  // Stage until a temp file exists, then remove one: the batch holding it cannot be published.
  await store.stage(name(i++), Buffer.from('first'));
  const victim = tempFiles(dir)[0];
  assert.ok(victim !== undefined, 'a staged object is a temp file until published');
  fs.rmSync(victim);
  let failure: unknown;
  try {
    for (; i < 2000; i++) await store.stage(name(i), Buffer.from(`object ${i}`));
    await store.commit();
  } catch (err) {
    failure = err;
  }
  assert.ok(failure instanceof Error, 'staging went on, and the commit succeeded, although a staged file was gone');
  assert.equal((failure as NodeJS.ErrnoException).code, 'ENOENT');
  await store.discard();
  assert.deepEqual(tempFiles(dir), [], 'the failed batch and what was staged after it are removed');
  // What failed was reported once: the store works again.
  await store.stage(name(5000), Buffer.from('after'));
  await store.commit();
  assert.deepEqual(await store.get(name(5000)), Buffer.from('after'));
});

storeContract('a local directory', async (t) => {
  const store = new LocalDirStore(path.join(makeTempDir(t, 'bdsnap-store-'), 'repo'));
  t.after(() => store.close());
  return store;
});
