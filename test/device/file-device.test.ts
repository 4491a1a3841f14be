import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { performance } from 'node:perf_hooks';
import os from 'node:os';
import path from 'node:path';
import { EXTENT_HOLE, EXTENT_ZERO } from '../../src/device/block-device.js';
import { FileDevice } from '../../src/device/file-device.js';
import { SyncIoPolicy, BACKOFF_MS, SLOW_FLOOR_MS, SLOW_MS_PER_MIB } from '../../src/device/sync-io-policy.js';
import { loadLibc } from '../../src/host/libc.js';
import { BdsnapError } from '../../src/errors.js';
import { needs } from '../../testkit/needs.js';
import { makeImage } from '../../testkit/files.js';

function tempDir(t: { after: (fn: () => void) => void }): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-filedev-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

test('FileDevice reads back what it wrote and refuses ranges past the end', async (t) => {
  const dir = tempDir(t);
  const image = path.join(dir, 'a.img');
  makeImage(image, 1 << 20, 0);
  const dev = await FileDevice.open(image);
  t.after(() => dev.close());
  assert.equal(dev.size, 1 << 20);
  const data = Buffer.alloc(8192, 0xab);
  await dev.write(data, 4096, { fua: true });
  const back = Buffer.alloc(8192);
  await dev.read(back, 4096);
  assert.deepEqual(back, data);
  await dev.zero(4096, 4096);
  await dev.read(back, 4096);
  assert.equal(back.subarray(0, 4096).every((b) => b === 0), true);
  assert.equal(back.subarray(4096).every((b) => b === 0xab), true);
  await assert.rejects(dev.write(data, (1 << 20) - 4096), (e: unknown) => e instanceof BdsnapError && e.code === 'ENOSPC');
  await assert.rejects(dev.read(back, (1 << 20) - 4096), (e: unknown) => e instanceof BdsnapError && e.code === 'EINVAL');
});

test('extents: holes of a sparse file are holes that read as zeroes; data written later is data', async (t) => {
  const dir = tempDir(t);
  const image = path.join(dir, 'sparse.img');
  const KiB = 1024;
  fs.writeFileSync(image, '');
  fs.truncateSync(image, 1024 * KiB);
  const dev = await FileDevice.open(image);
  t.after(() => dev.close());
  assert.deepEqual(await dev.extents(0, dev.size), [{ length: 1024 * KiB, flags: EXTENT_HOLE | EXTENT_ZERO }]);
  await dev.write(Buffer.alloc(64 * KiB, 1), 256 * KiB);
  // Not yet written back: data in the page cache is data all the same.
  assert.deepEqual(await dev.extents(0, dev.size), [
    { length: 256 * KiB, flags: EXTENT_HOLE | EXTENT_ZERO }, { length: 64 * KiB, flags: 0 }, { length: 704 * KiB, flags: EXTENT_HOLE | EXTENT_ZERO },
  ]);
  // A range inside one kind, and one that starts in data.
  assert.deepEqual(await dev.extents(260 * KiB, 8 * KiB), [{ length: 8 * KiB, flags: 0 }]);
  assert.deepEqual(await dev.extents(300 * KiB, 40 * KiB), [{ length: 20 * KiB, flags: 0 }, { length: 20 * KiB, flags: EXTENT_HOLE | EXTENT_ZERO }]);
  const back = Buffer.alloc(4 * KiB, 0xff);
  await dev.read(back, 512 * KiB);
  assert.ok(back.every((b) => b === 0), 'a hole reads as zeroes');
});

test('a second open of the same image fails with EBUSY until the first is closed', async (t) => {
  const dir = tempDir(t);
  const image = path.join(dir, 'b.img');
  makeImage(image, 65536, 0);
  const first = await FileDevice.open(image);
  await assert.rejects(FileDevice.open(image), (e: unknown) => e instanceof BdsnapError && e.code === 'EBUSY' && /already open/.test(e.message));
  // A hard link is the same file: still refused.
  fs.linkSync(image, path.join(dir, 'link.img'));
  await assert.rejects(FileDevice.open(path.join(dir, 'link.img')), (e: unknown) => e instanceof BdsnapError && e.code === 'EBUSY');
  await first.close();
  const second = await FileDevice.open(image);
  await second.close();
});

test('opening a directory or a missing path says what is wrong', async (t) => {
  const dir = tempDir(t);
  await assert.rejects(FileDevice.open(dir), (e: unknown) => e instanceof BdsnapError && e.code === 'EINVAL');
  await assert.rejects(FileDevice.open(path.join(dir, 'nope.img')), (e: unknown) => e instanceof BdsnapError && e.code === 'ENOENT');
});

test('a block device (loop) reports its size from sysfs', async (t) => {
  if (!needs(t, { root: true, tools: ['losetup'] })) return;
  const { execFileSync } = await import('node:child_process');
  const dir = tempDir(t);
  const image = path.join(dir, 'c.img');
  makeImage(image, 3 << 20, 0);
  const loop = execFileSync('losetup', ['-f', '--show', image], { encoding: 'utf8' }).trim();
  t.after(() => execFileSync('losetup', ['-d', loop]));
  const dev = await FileDevice.open(loop);
  try {
    assert.equal(dev.size, 3 << 20);
    await dev.write(Buffer.alloc(4096, 7), 0, { fua: true });
  } finally {
    await dev.close();
  }
  assert.equal(fs.readFileSync(image)[0], 7);
});

test('close() waits for requests in flight, refuses new ones, and no late write reaches a reused descriptor', async (t) => {
  const dir = tempDir(t);
  const image = path.join(dir, 'c.img');
  const SIZE = 64 << 20;
  makeImage(image, SIZE, 'zero');
  // Large transfers on the thread pool, so they are still in flight when close() starts.
  const dev = await FileDevice.open(image, { syncIo: new SyncIoPolicy(64 * 1024, 0) });
  const pattern = Buffer.alloc(1 << 20, 0x77);
  const settled: string[] = [];
  const requests: Array<Promise<unknown>> = [];
  for (let k = 0; k < 32; k++) {
    const offset = (k % 60) * (1 << 20);
    const op = k % 3 === 0 ? dev.read(Buffer.alloc(1 << 20), offset) : k % 3 === 1 ? dev.write(pattern, offset) : dev.zero(offset + (1 << 20), 2 << 20);
    requests.push(op.then(() => settled.push(`ok ${k}`), (err: unknown) => settled.push(`failed ${k}: ${String(err)}`)));
  }
  requests.push(dev.flush().then(() => settled.push('flush')));
  assert.ok(dev.requestsInFlight > 0, 'requests are in flight when close() starts');
  const closing = dev.close().then(() => settled.push('closed'));
  await assert.rejects(dev.write(pattern, 0), (e: unknown) => e instanceof BdsnapError && e.code === 'ESHUTDOWN', 'a write after close() started');
  await assert.rejects(dev.read(Buffer.alloc(512), 0), (e: unknown) => e instanceof BdsnapError && e.code === 'ESHUTDOWN', 'a read after close() started');
  await assert.rejects(dev.flush(), (e: unknown) => e instanceof BdsnapError && e.code === 'ESHUTDOWN');
  await closing;
  // The process reuses the lowest free descriptor: the next open very likely gets the old number.
  const victim = path.join(dir, 'victim');
  fs.writeFileSync(victim, 'untouched');
  const fd = fs.openSync(victim, 'r+');
  t.after(() => fs.closeSync(fd));
  await Promise.all(requests);
  assert.equal(settled.at(-1), 'closed', `close() resolved after every request settled: ${settled.join(', ')}`);
  assert.equal(settled.filter((s) => s.startsWith('failed')).length, 0, `requests started before close() all succeeded: ${settled.join(', ')}`);
  assert.equal(dev.requestsInFlight, 0);
  await new Promise((resolve) => setTimeout(resolve, 50));
  assert.equal(fs.readFileSync(victim, 'utf8'), 'untouched', 'no late write landed on the reused descriptor');
  // The lock went with the close: the image opens again.
  const again = await FileDevice.open(image);
  await again.close();
});

test('startWriteback runs off the event loop, counts as a request until it is done, and only hints', async (t) => {
  const libc = loadLibc();
  assert.ok(libc, 'koffi (an optional dependency, installed by npm ci) binds libc here');
  const dir = tempDir(t);
  const image = path.join(dir, 'w.img');
  makeImage(image, 16 << 20, 'zero');
  const fd = fs.openSync(image, 'r+');
  t.after(() => fs.closeSync(fd));
  fs.writeSync(fd, Buffer.alloc(8 << 20, 0x5a), 0, 8 << 20, 0);
  assert.equal(await libc.startWriteback(fd, 0, 8 << 20), true);
  assert.equal(await libc.startWriteback(fd, 0, 0), false, 'an empty range asks for nothing');
  assert.equal(await libc.startWriteback(-1, 0, 4096), false, 'a failure is an answer, not a throw');
  const dev = await FileDevice.open(path.join(dir, 'w.img'), { shared: true });
  await dev.write(Buffer.alloc(1 << 20, 1), 0);
  dev.startWriteback(0, 1 << 20);
  assert.equal(dev.requestsInFlight, 1, 'the hint is in flight, so close() waits for it');
  await dev.close();
  assert.equal(dev.requestsInFlight, 0);
});

test('large transfers run synchronously while they stay fast, and go to the thread pool for a while after a slow one', () => {
  const MiB = 1 << 20;
  const policy = new SyncIoPolicy(64 * 1024, 4 * MiB);
  assert.equal(policy.sync(4096, 0), true);
  assert.equal(policy.sync(MiB, 0), true);
  assert.equal(policy.sync(8 * MiB, 0), false, 'above the large limit: always the thread pool');
  policy.record(MiB, SLOW_MS_PER_MIB * 0.5, 10);
  assert.equal(policy.sync(MiB, 10), true, 'a fast copy changes nothing');
  policy.record(MiB / 4, SLOW_FLOOR_MS * 0.9, 11);
  assert.equal(policy.sync(MiB, 11), true, 'nor a short stall below the floor');
  policy.record(4096, 50, 20);
  assert.equal(policy.sync(MiB, 20), true, 'a slow small transfer changes nothing');
  policy.record(2 * MiB, SLOW_FLOOR_MS + SLOW_MS_PER_MIB * 2.5, 100);
  assert.equal(policy.sync(MiB, 100), false);
  assert.equal(policy.sync(MiB, 100 + BACKOFF_MS - 1), false, 'backed off after a slow one');
  assert.equal(policy.sync(4096, 101), true, 'small transfers stay synchronous');
  assert.equal(policy.sync(MiB, 100 + BACKOFF_MS), true, 'and back once the back-off is over');
  // run() hands back the transfer's result and its failure, and times only large transfers.
  const fresh = new SyncIoPolicy(64 * 1024, 4 * MiB);
  assert.equal(fresh.run(MiB, () => 'done'), 'done');
  assert.throws(() => fresh.run(MiB, () => {
    throw new Error('EIO here');
  }), /EIO here/);
  const stallMs = SLOW_FLOOR_MS + SLOW_MS_PER_MIB + 2;
  const stall = (): void => {
    for (const until = performance.now() + stallMs; performance.now() < until;);
  };
  fresh.run(4096, stall);
  assert.equal(fresh.sync(MiB, performance.now()), true, 'a slow small transfer is not timed');
  fresh.run(MiB, stall);
  assert.equal(fresh.sync(MiB, performance.now()), false, 'a slow large one backs off');
  const off = new SyncIoPolicy(0, 0);
  assert.equal(off.sync(512, 0), false, '0 turns synchronous transfers off');
  // A clone counts as one transfer of at most the large limit, and never as a small one when it is not.
  assert.equal(policy.cloneBytes(4096), 4096);
  assert.equal(policy.cloneBytes(48 * MiB), 4 * MiB);
  const noLarge = new SyncIoPolicy(64 * 1024, 0);
  assert.equal(noLarge.sync(noLarge.cloneBytes(MiB), 0), false, 'large transfers off: large clones too');
});

test('large writes have a limit of their own: on the thread pool while large reads and clones of the same size stay synchronous', async (t) => {
  const MiB = 1 << 20;
  const dir = tempDir(t);
  const image = path.join(dir, 'p.img');
  makeImage(image, 8 * MiB, 'zero');
  const policy = new SyncIoPolicy(64 * 1024, 4 * MiB, 0);
  const dev = await FileDevice.open(image, { syncIo: policy });
  t.after(() => dev.close());
  // A request on the thread pool is in flight when the call returns; a synchronous one is done.
  const write = dev.write(Buffer.alloc(MiB, 0x3c), 0);
  assert.equal(dev.requestsInFlight, 1, 'a 1 MiB write is on the thread pool');
  await write;
  const small = dev.write(Buffer.alloc(64 * 1024, 0x3d), 2 * MiB);
  assert.equal(dev.requestsInFlight, 0, 'a small write stays synchronous');
  await small;
  const back = Buffer.alloc(MiB);
  const read = dev.read(back, 0);
  assert.equal(dev.requestsInFlight, 0, 'a 1 MiB read stays synchronous');
  await read;
  assert.equal(back.every((b) => b === 0x3c), true);
  assert.equal(policy.syncWrite(MiB, undefined, 0), false);
  assert.equal(policy.sync(MiB, 0), true, 'reads and clones keep the large limit');
  assert.equal(policy.syncWrite(64 * 1024, undefined, 0), true);
  const old = new SyncIoPolicy(64 * 1024, 4 * MiB);
  assert.equal(old.syncWrite(MiB, undefined, 0), true, 'by default large writes are synchronous, as large reads are');
  old.record(MiB, SLOW_FLOOR_MS + SLOW_MS_PER_MIB * 2, 10);
  assert.equal(old.syncWrite(MiB, undefined, 11), false, 'under the same back-off as other large transfers');
});

test('a large write with requests queued behind it goes to the thread pool only while queuedWritesOnPool says so', async (t) => {
  const MiB = 1 << 20;
  let lone = true;
  const policy = new SyncIoPolicy(64 * 1024, 4 * MiB, 4 * MiB, () => lone);
  let asked = 0;
  const queued = (answer: boolean) => (): boolean => {
    asked++;
    return answer;
  };
  assert.equal(policy.syncWrite(MiB, queued(true), 0), false, 'queued, one connection: on the pool');
  assert.equal(policy.syncWrite(MiB, queued(false), 0), true, 'nothing queued (a client at depth one): synchronous');
  assert.equal(asked, 2);
  assert.equal(policy.syncWrite(64 * 1024, queued(true), 0), true, 'small writes stay synchronous');
  lone = false;
  assert.equal(policy.syncWrite(MiB, queued(true), 0), true, 'several connections: synchronous');
  assert.equal(asked, 2, 'neither a small write nor one on a server with several connections asks what is queued');
  // Through a device: the hint reaches the policy from write().
  lone = true;
  const image = path.join(tempDir(t), 'q.img');
  makeImage(image, 2 * MiB, 'zero');
  const dev = await FileDevice.open(image, { syncIo: policy });
  t.after(() => dev.close());
  const onPool = dev.write(Buffer.alloc(MiB, 1), 0, { queued: () => true });
  assert.equal(dev.requestsInFlight, 1, 'the queued write is on the thread pool');
  await onPool;
  const alone = dev.write(Buffer.alloc(MiB, 2), MiB);
  assert.equal(dev.requestsInFlight, 0, 'the write nothing waits behind is done on this thread');
  await alone;
});

test('a symbolic link is not followed, and expectIdentity refuses any other file under the name', async (t) => {
  const dir = tempDir(t);
  const image = path.join(dir, 'c.img');
  makeImage(image, 65536, 0);
  const other = path.join(dir, 'other.img');
  makeImage(other, 65536, 0);
  fs.symlinkSync(image, path.join(dir, 'link.img'));
  await assert.rejects(FileDevice.open(path.join(dir, 'link.img')), (e: unknown) => e instanceof BdsnapError && e.code === 'EPERM' && /symbolic link/.test(e.message));
  const st = fs.statSync(image);
  const identity = { kind: 'file' as const, dev: st.dev, ino: st.ino, rdev: st.rdev };
  const dev = await FileDevice.open(image, { expectIdentity: identity });
  await dev.close();
  fs.renameSync(other, image);
  await assert.rejects(FileDevice.open(image, { expectIdentity: identity }), (e: unknown) => e instanceof BdsnapError && e.code === 'EPERM' && /no longer the file/.test(e.message));
});

test('writeNow writes on the calling thread where write() would, says false (and writes nothing) where it would not, and throws what write() rejects with', async (t) => {
  const MiB = 1 << 20;
  const dir = tempDir(t);
  const image = path.join(dir, 'n.img');
  makeImage(image, 4 * MiB, 'zero');
  const dev = await FileDevice.open(image, { syncIo: new SyncIoPolicy(64 * 1024, 4 * MiB, 0) });
  t.after(() => dev.close());
  assert.equal(dev.writeNow(Buffer.alloc(4096, 0x5a), 8192), true);
  const back = fs.readFileSync(image).subarray(8192, 8192 + 4096);
  assert.equal(back.every((b) => b === 0x5a), true, 'written before writeNow returned');
  assert.equal(dev.writeNow(Buffer.alloc(MiB, 0x77), 0), false, 'a large write goes to the thread pool under this policy');
  const first = Buffer.alloc(1);
  await dev.read(first, 0);
  assert.equal(first[0], 0, 'nothing was written');
  assert.throws(() => dev.writeNow(Buffer.alloc(4096), 4 * MiB - 2048), (e: unknown) => e instanceof BdsnapError && e.code === 'ENOSPC');
  const readOnly = await FileDevice.open(image, { readOnly: true, shared: true });
  t.after(() => readOnly.close());
  assert.throws(() => readOnly.writeNow(Buffer.alloc(4096), 0), (e: unknown) => e instanceof BdsnapError && e.code === 'EPERM');
});
