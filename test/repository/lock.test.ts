/**
 * Repository locks of this host are judged by their process: gone means dead at once, and a
 * process /proc cannot tell about keeps its lock (by age), so a prune never breaks the lock of
 * a create that may still be running.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { LocalDirStore, createBackup, type ObjectInfo } from '../../src/backup/index.js';
import { LOCKS_PREFIX, PACKS_PREFIX } from '../../src/repository/format.js';
import { HELD_MARGIN_MS, RepoLock, listLocks } from '../../src/repository/lock.js';
import { BdsnapError } from '../../src/errors.js';
import { fillRandom, makeTempDir } from '../../testkit/files.js';
import { readBootId } from '../../src/host/device-stamp.js';
import { initRepo } from '../backup/helpers.js';

/** A pid that named a process a moment ago and names none now (spawnSync reaps its child). */
function exitedPid(): number {
  const pid = spawnSync('true').pid;
  assert.ok(pid !== undefined && pid > 0);
  return pid;
}

async function storeWithCreateLock(t: test.TestContext, pid: number, bootId: string | null = readBootId()): Promise<LocalDirStore> {
  const dir = makeTempDir(t, 'bdsnap-lock-');
  const store = new LocalDirStore(path.join(dir, 'repo'));
  t.after(() => store.close());
  const body = { kind: 'create', host: os.hostname(), pid, processStart: '12345', createdAt: new Date().toISOString(), ...(bootId === null ? {} : { bootId }) };
  await store.put(`${LOCKS_PREFIX}0001.create`, Buffer.from(`${JSON.stringify(body)}\n`));
  return store;
}

test('a lock whose process /proc cannot tell about counts as live, and a prune is refused saying why', async (t) => {
  const pid = exitedPid();
  const store = await storeWithCreateLock(t, pid);
  // A procfs whose stat of that pid cannot be read (a directory where the file should be).
  const proc = makeTempDir(t, 'bdsnap-fake-proc-');
  fs.mkdirSync(path.join(proc, String(pid), 'stat'), { recursive: true });
  const [lock] = await listLocks(store, { proc });
  assert.equal(lock?.state, 'live');
  assert.match(lock?.unchecked ?? '', /cannot be told/);
  await assert.rejects(RepoLock.acquire(store, 'prune', { proc }), (e: unknown) => {
    assert.ok(e instanceof BdsnapError);
    assert.equal(e.code, 'EBUSY');
    assert.match(e.message, /a backup is being created .*pid \d+ still runs cannot be told/);
    return true;
  });
  assert.deepEqual((await listLocks(store, { proc })).map((l) => l.name), [`${LOCKS_PREFIX}0001.create`], 'the refused prune left no lock of its own');
});

test('a prune refused by an instant restore\'s lock says so, and what to do', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-lock-');
  const store = new LocalDirStore(path.join(dir, 'repo'));
  t.after(() => store.close());
  const restore = await RepoLock.acquire(store, 'create', { purpose: 'instant-restore' });
  try {
    await assert.rejects(RepoLock.acquire(store, 'prune'), (e: unknown) => {
      assert.ok(e instanceof BdsnapError);
      assert.equal(e.code, 'EBUSY');
      assert.match(e.message, new RegExp(`^an instant restore reads .* \\(${restore.name}, pid ${process.pid} on ${os.hostname()}\\): .*prune once it is complete`));
      return true;
    });
    // A create beside it is no conflict.
    const create = await RepoLock.acquire(store, 'create');
    await create.release();
  } finally {
    await restore.release();
  }
});

test('a prune refused by the lock of a served or copied backup says which, not that a backup is being created', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-lock-');
  const store = new LocalDirStore(path.join(dir, 'repo'));
  t.after(() => store.close());
  const expected = { 'serve': /^a backup of .* is being served .*prune once 'bdsnap backup serve' has stopped$/, 'copy-from': /^a backup copy reads from .*when the copy is done$/, 'copy-to': /^a backup copy writes into .*when the copy is done$/ } as const;
  for (const [purpose, pattern] of Object.entries(expected) as Array<[keyof typeof expected, RegExp]>) {
    const held = await RepoLock.acquire(store, 'create', { purpose });
    try {
      await assert.rejects(RepoLock.acquire(store, 'prune'), (e: unknown) => {
        assert.ok(e instanceof BdsnapError);
        assert.equal(e.code, 'EBUSY');
        assert.match(e.message, pattern, purpose);
        assert.ok(e.message.includes(held.name), e.message);
        return true;
      });
    } finally {
      await held.release();
    }
  }
});

test('a lock whose process is gone is dead, and a prune goes ahead', async (t) => {
  const store = await storeWithCreateLock(t, exitedPid());
  const [lock] = await listLocks(store);
  assert.equal(lock?.state, 'dead');
  assert.equal(lock?.unchecked, undefined);
  const prune = await RepoLock.acquire(store, 'prune');
  await prune.release();
});

test('a lock of another machine with this hostname (another boot id) is judged by its age, not by a pid of this machine', async (t) => {
  assert.notEqual(readBootId(), '', 'this machine has a boot id');
  const store = await storeWithCreateLock(t, exitedPid(), '00000000-0000-4000-8000-000000000000');
  const [lock] = await listLocks(store);
  assert.equal(lock?.state, 'live');
  await assert.rejects(RepoLock.acquire(store, 'prune'), { code: 'EBUSY' });
  // Older locks recorded no boot id: judged by age too.
  const old = await storeWithCreateLock(t, exitedPid(), null);
  assert.equal((await listLocks(old))[0]?.state, 'live');
});

test('a holder that went longer than HELD_MARGIN_MS without a refresh, or whose lock was removed, is told it lost the lock', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-lock-');
  const store = new LocalDirStore(path.join(dir, 'repo'));
  t.after(() => store.close());
  t.mock.timers.enable({ apis: ['Date'], now: Date.now() });
  const lock = await RepoLock.acquire(store, 'create');
  await lock.assertHeld('this backup', 'run it again');
  // Stalled (no refresh ran) for longer than the margin: a prune may have judged it stale.
  t.mock.timers.setTime(Date.now() + HELD_MARGIN_MS + 1000);
  await assert.rejects(lock.assertHeld('this backup', 'run it again'), { code: 'EBUSY', message: /this backup's lock .* was taken over \(it was not refreshed for \d+ s/ });
  await lock.release();

  const second = await RepoLock.acquire(store, 'create');
  await store.delete(second.name);
  await assert.rejects(second.assertHeld('this backup', 'run it again'), { code: 'EBUSY', message: /was taken over \(it was removed from the repository\)/ });
  await second.release().catch(() => undefined);
});

test('a prune that stalled past the margin after listing the pieces stops before deleting any', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-lock-');
  const stall = { armed: false };
  // The stall lands while prune lists the packs (where the pieces are), after it took its lock.
  class StallingStore extends LocalDirStore {
    override async list(prefix: string): Promise<ObjectInfo[]> {
      const out = await super.list(prefix);
      if (stall.armed && prefix === PACKS_PREFIX) t.mock.timers.setTime(Date.now() + HELD_MARGIN_MS + 1000);
      return out;
    }
  }
  const store = new StallingStore(path.join(dir, 'repo'));
  t.after(() => store.close());
  const repo = await initRepo(store, { pieceSizeBytes: 64 * 1024 });
  const data = Buffer.alloc(256 * 1024);
  fillRandom(data, 4);
  const made = await createBackup(repo, [{ device: '/dev/a', sizeBytes: data.length, changed: null, why: 'test', read: async (target, o) => void data.copy(target, 0, o, o + target.length) }]);
  await repo.forget([made.id]);
  const before = (await repo.storedPieceNames()).size;
  assert.equal(before, 4);
  t.mock.timers.enable({ apis: ['Date'], now: Date.now() });
  stall.armed = true;
  await assert.rejects(repo.prune(), { code: 'EBUSY', message: /^this prune's lock .* was taken over \(it was not refreshed .*\); a backup may have started counting on pieces it would delete; stopped; run prune again$/ });
  stall.armed = false;
  assert.equal((await repo.storedPieceNames()).size, before, 'no piece deleted');
  const s = await repo.prune();
  assert.equal(s.deletedPieces, before);
});

test('a create\'s lock reads only prune locks: other creates\' locks, its own included, cost it no read (on S3 each is a round trip)', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-lock-');
  const store = new LocalDirStore(path.join(dir, 'repo'));
  t.after(() => store.close());
  const others = await Promise.all([0, 1, 2].map(() => RepoLock.acquire(store, 'create')));
  const read: string[] = [];
  const get = store.get.bind(store);
  t.after(() => (store.get = get));
  store.get = (name, options) => {
    read.push(name);
    return get(name, options);
  };
  const lock = await RepoLock.acquire(store, 'create', { purpose: 'instant-restore' });
  assert.equal(read.length, 0, `no lock was read, but ${read.join(', ')}`);
  // A prune's lock is still read, and keeps a create out.
  store.get = get;
  for (const l of [...others, lock]) await l.release();
  const prune = await RepoLock.acquire(store, 'prune');
  store.get = (name, options) => {
    read.push(name);
    return get(name, options);
  };
  await assert.rejects(RepoLock.acquire(store, 'create'), (e: unknown) => e instanceof BdsnapError && e.code === 'EBUSY' && /a prune is running/.test(e.message));
  assert.deepEqual(read, [prune.name]);
  await prune.release();
});
