/**
 * The ObjectStore contract, one suite for every backend (a local directory, S3): what the
 * repository relies on. `make` gives a fresh, empty store for one test, or undefined when the
 * test was skipped for lack of its backend.
 */

import assert from 'node:assert/strict';
import { test, type TestContext } from 'node:test';
import type { ObjectStore } from '../../src/repository/object-store.js';

export type MakeStore = (t: TestContext) => Promise<ObjectStore | undefined>;

async function code(p: Promise<unknown>): Promise<string | undefined> {
  try {
    await p;
    return undefined;
  } catch (err) {
    return (err as { code?: string }).code;
  }
}

export function storeContract(backend: string, make: MakeStore): void {
  const T = { timeout: 60_000 };

  test(`${backend}: put, get whole and by range, stat, replace`, T, async (t) => {
    const store = await make(t);
    if (!store) return;
    await store.put('config', [Buffer.from('hello '), Buffer.from('world')]);
    assert.deepEqual(await store.get('config'), Buffer.from('hello world'));
    assert.deepEqual(await store.get('config', { offsetBytes: 6, lengthBytes: 5 }), Buffer.from('world'));
    assert.deepEqual(await store.get('config', { offsetBytes: 0, lengthBytes: 0 }), Buffer.alloc(0));
    const info = await store.stat('config');
    assert.equal(info?.sizeBytes, 11);
    assert.ok(Math.abs((info?.modifiedMs ?? 0) - Date.now()) < 120_000, `modified ${info?.modifiedMs}`);
    await store.put('config', Buffer.from('new'));
    assert.deepEqual(await store.get('config'), Buffer.from('new'));
  });

  test(`${backend}: absent objects, short ranges, size bounds and bad names are refused with their codes`, T, async (t) => {
    const store = await make(t);
    if (!store) return;
    assert.equal(await store.stat('nothing'), undefined);
    assert.equal(await code(store.get('nothing')), 'ENOENT');
    assert.equal(await code(store.get('dir/nothing', { offsetBytes: 0, lengthBytes: 4 })), 'ENOENT');
    await store.put('obj', Buffer.alloc(1000, 7));
    assert.equal(await code(store.get('obj', { maxBytes: 999 })), 'ECORRUPT');
    assert.equal((await store.get('obj', { maxBytes: 1000 })).length, 1000);
    assert.equal(await code(store.get('obj', { offsetBytes: 990, lengthBytes: 20 })), 'EINVAL');
    for (const bad of ['../x', '.hidden', 'a//b', '', 'a/../b', '/abs']) assert.equal(await code(store.put(bad, Buffer.from('x'))), 'EINVAL', bad);
    await store.delete('nothing');
  });

  test(`${backend}: list and names by prefix, delete`, T, async (t) => {
    const store = await make(t);
    if (!store) return;
    const names = ['backups/b1', 'backups/b2', 'pieces/ab/one', 'pieces/ab/two', 'pieces/cd/three', 'locks/l1'];
    for (const [i, n] of names.entries()) await store.put(n, Buffer.alloc(i + 1));
    const sorted = (xs: string[]): string[] => [...xs].sort();
    assert.deepEqual(sorted(await store.names('pieces/')), ['pieces/ab/one', 'pieces/ab/two', 'pieces/cd/three']);
    assert.deepEqual(sorted(await store.names('pieces/ab/')), ['pieces/ab/one', 'pieces/ab/two']);
    assert.deepEqual(sorted(await store.names('backups/b')), ['backups/b1', 'backups/b2']);
    assert.deepEqual(sorted(await store.names('')), sorted(names));
    const listed = await store.list('backups/');
    assert.deepEqual(listed.map((o) => [o.name, o.sizeBytes]).sort(), [['backups/b1', 1], ['backups/b2', 2]]);
    await store.delete('pieces/ab/one');
    assert.deepEqual(sorted(await store.names('pieces/')), ['pieces/ab/two', 'pieces/cd/three']);
    assert.equal(await store.removeIncomplete(Date.now()), 0);
  });

  test(`${backend}: staged objects are all there, whole, after commit`, T, async (t) => {
    const store = await make(t);
    if (!store) return;
    const name = (i: number): string => `pieces/${(i % 5).toString(16).padStart(2, '0')}/object-${i}`;
    const count = 300;
    for (let i = 0; i < count; i++) await store.stage(name(i), [Buffer.from(`head ${i} `), Buffer.alloc(100 + i, i & 255)]);
    await store.commit();
    const names = new Set(await store.names('pieces/'));
    assert.equal(names.size, count);
    for (const i of [0, 1, 127, 128, 199, count - 1]) {
      assert.deepEqual(await store.get(name(i)), Buffer.concat([Buffer.from(`head ${i} `), Buffer.alloc(100 + i, i & 255)]));
    }
    await store.discard();
  });
}
