/**
 * Snapshots of live devices through the real daemon and CLI: images exact under load
 * (read back with nbdcopy), one point in time across two devices, image writes kept away
 * from the device, overflow and extend, SIGKILL and restart, destroy under load, events,
 * and refusals of bad input.
 */

import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { NbdClient } from '../../src/nbd/client.js';
import { cleanupOf } from '../../testkit/cleanup.js';
import { TEST_PASSWORD, cli, daemonUri, ok, sandbox, startDaemon, type Sandbox } from '../../testkit/daemon.js';
import { makeImage } from '../../testkit/files.js';
import { needs } from '../../testkit/needs.js';
import { ORDERED_WRITER_SALTS } from './fixtures/ordered-writer.js';
import { highestOrderedWrite, passwdAndActivate, restoreOnlySession, startOrderedWriter } from './helpers.js';

const BLOCK = 4096;
const IMAGE_BYTES = 16 << 20;
const BLOCKS = IMAGE_BYTES / BLOCK;

interface Created {
  id: string;
  state: string;
  stallMs: number;
  images: Array<{ device: string; exportName: string; uri: string; sizeBytes: number }>;
}

function createSnapshot(box: Sandbox, devices: string[], extra: string[] = []): Created {
  return JSON.parse(ok(box, ['snapshot', 'create', ...devices, '--json', ...extra])) as Created;
}

/** Make the daemon serve idle devices (a snapshot taken and dropped registers them). */
function register(box: Sandbox, devices: string[]): void {
  ok(box, ['snapshot', 'destroy', createSnapshot(box, devices).id]);
}

function connect(box: Sandbox, exportName: string): Promise<NbdClient> {
  return NbdClient.connect({ socketPath: path.join(box.runDir, 'nbd.sock'), exportName });
}

/** nbdcopy of an export into a file; returns the bytes (or the failed process result). */
function copyOut(box: Sandbox, exportName: string): { status: number | null; data: Buffer | undefined; stderr: string } {
  const out = path.join(box.top, `copy-${randomBytes(4).toString('hex')}.img`);
  const r = spawnSync('nbdcopy', [daemonUri(box, exportName), out], { encoding: 'utf8', timeout: 60_000 });
  const data = r.status === 0 ? fs.readFileSync(out) : undefined;
  fs.rmSync(out, { force: true });
  return { status: r.status, data, stderr: r.stderr };
}

function mustCopy(box: Sandbox, exportName: string): Buffer {
  const r = copyOut(box, exportName);
  assert.equal(r.status, 0, `nbdcopy ${exportName}: ${r.stderr}`);
  return r.data as Buffer;
}

function randomImage(box: Sandbox, name: string, bytes = IMAGE_BYTES): string {
  return makeImage(path.join(box.top, name), bytes, (b) => randomBytes(b.length).copy(b));
}

/** A block stamped with a sequence number, so images show which writes they hold. */
function stamped(seq: number, salt: number): Buffer {
  const b = Buffer.alloc(BLOCK, salt & 0xff);
  b.writeBigUInt64LE(BigInt(seq), 0);
  b.writeUInt32LE(salt, 8);
  return b;
}

test('an image holds exactly the device as it was at the take, under random writes in flight', { timeout: 120_000 }, async (t) => {
  const box = sandbox(t);
  // Enough blocks that the writes issued during the take (all of them allowed in or out of the
  // image) leave most blocks to be checked exactly.
  const DEVICE_BYTES = 64 << 20;
  const DEVICE_BLOCKS = DEVICE_BYTES / BLOCK;
  const device = randomImage(box, 'a.img', DEVICE_BYTES);
  const daemon = await startDaemon(t, { sandbox: box, password: false });
  // Active: the device is in a mount session too, and each keeps its own originals.
  passwdAndActivate(box, device, TEST_PASSWORD);
  const client = await connect(box, device);

  // Per block: the content acknowledged last before the take, and the writes that overlap the take.
  const before = fs.readFileSync(device);
  const lastAcked = new Map<number, Buffer>();
  const overlapping = new Map<number, Buffer[]>();
  let phase: 'before' | 'during' | 'after' = 'before';
  let running = true;
  let seq = 0;
  let issuedDuringTake = 0;
  // Each writer owns the blocks of its residue, so writes to one block never race each other.
  const WRITERS = 8;
  const writer = async (w: number): Promise<void> => {
    while (running) {
      const block = Math.floor(Math.random() * (DEVICE_BLOCKS / WRITERS)) * WRITERS + w;
      const data = stamped(++seq, block);
      const issuedIn = phase;
      if (issuedIn === 'during') issuedDuringTake++;
      await client.write(data, block * BLOCK);
      if (issuedIn === 'before' && phase === 'before') lastAcked.set(block, data);
      else if (issuedIn !== 'after') overlapping.set(block, [...(overlapping.get(block) ?? []), data]);
      // Paced, so the writes issued while the CLI starts up do not touch most blocks.
      await new Promise((r) => setTimeout(r, 2));
    }
  };
  const writers = Array.from({ length: WRITERS }, (_, w) => writer(w));
  await new Promise((r) => setTimeout(r, 300));
  // The CLI runs asynchronously, so the writers go on issuing writes while the snapshot is taken.
  phase = 'during';
  const created = await daemon.cli(['snapshot', 'create', device, '--json']);
  phase = 'after';
  const snap = JSON.parse(created.stdout) as Created;
  await new Promise((r) => setTimeout(r, 500));
  running = false;
  await Promise.all(writers);
  assert.equal(snap.images.length, 1);
  assert.equal(snap.images[0]?.exportName, `${device}@${snap.id}`);
  assert.ok(seq > 100, `the writer made progress (${seq} writes)`);
  assert.ok(issuedDuringTake > 0, `writes were issued while the snapshot was taken (${issuedDuringTake} of ${seq})`);
  t.diagnostic(`${issuedDuringTake} of ${seq} writes issued while the snapshot was taken`);

  const image = mustCopy(box, `${device}@${snap.id}`);
  assert.equal(image.length, DEVICE_BYTES);
  let checked = 0;
  for (let b = 0; b < DEVICE_BLOCKS; b++) {
    const got = image.subarray(b * BLOCK, (b + 1) * BLOCK);
    const base = lastAcked.get(b) ?? before.subarray(b * BLOCK, (b + 1) * BLOCK);
    const candidates = [base, ...(overlapping.get(b) ?? [])];
    assert.ok(candidates.some((c) => c.equals(got)), `block ${b} of the image is neither its content at the take nor a write in flight then`);
    if (!overlapping.has(b)) checked++;
  }
  assert.ok(checked > DEVICE_BLOCKS / 2, `most blocks had no write in flight at the take and were checked exactly (${checked} of ${DEVICE_BLOCKS})`);
  // The device holds the writes, the image does not.
  assert.notDeepEqual(fs.readFileSync(device), image);
  await client.close();
  ok(box, ['snapshot', 'destroy', snap.id]);
  // The session that ran beside the snapshot still restores the device as it was before it.
  restoreOnlySession(box);
  assert.deepEqual(fs.readFileSync(device), before, 'the session restored the device');
  assert.equal(copyOut(box, `${device}@${snap.id}`).status === 0, false, 'a destroyed image is no longer served');
});

test('two devices: every pair of images shows a prefix of the write order', { timeout: 180_000 }, async (t) => {
  const box = sandbox(t);
  // Small blocks, many of them: the writer must not run out before the last take.
  const WRITE_BYTES = 512;
  const DEVICE_BYTES = 64 << 20;
  const a = makeImage(path.join(box.top, 'a.img'), DEVICE_BYTES, 0);
  const b = makeImage(path.join(box.top, 'b.img'), DEVICE_BYTES, 0);
  await startDaemon(t, { sandbox: box, password: false });
  register(box, [a, b]);
  // In its own process, so it goes on writing while the CLI takes the snapshot.
  const writer = await startOrderedWriter(t, box, a, b, WRITE_BYTES, DEVICE_BYTES / WRITE_BYTES);

  const seen: Array<{ before: number; a: number; b: number; after: number }> = [];
  for (let round = 0; round < 6; round++) {
    // Writing, and acknowledged for a while, when the take starts; paused while the images are read.
    const before = await writer.go(50);
    const snap = createSnapshot(box, [a, b]);
    const after = await writer.pause();
    const ha = highestOrderedWrite(mustCopy(box, `${a}@${snap.id}`), WRITE_BYTES, ORDERED_WRITER_SALTS.a);
    const hb = highestOrderedWrite(mustCopy(box, `${b}@${snap.id}`), WRITE_BYTES, ORDERED_WRITER_SALTS.b);
    seen.push({ before, a: ha, b: hb, after });
    const shown = JSON.stringify(seen.at(-1));
    assert.ok(after > before, `round ${round}: the writer went on writing while the snapshot was taken (${shown})`);
    assert.ok(ha === hb || ha === hb + 1, `round ${round}: A holds writes up to ${ha}, B up to ${hb}: not a prefix of the order (${shown})`);
    assert.ok(hb >= before, `round ${round}: a pair acknowledged before the take is missing from the images (${shown})`);
    assert.ok(ha <= after + 1, `round ${round}: the images hold writes issued after the take (${shown})`);
    ok(box, ['snapshot', 'destroy', snap.id]);
  }
  await writer.stop();
  t.diagnostic(`acknowledged before, images A and B, acknowledged after: ${seen.map((r) => `${r.before} ${r.a} ${r.b} ${r.after}`).join('; ')}`);
});

test('writes to an image change the image and never the device', { timeout: 60_000 }, async (t) => {
  const box = sandbox(t);
  const device = randomImage(box, 'a.img');
  const original = fs.readFileSync(device);
  await startDaemon(t, { sandbox: box, password: false });
  const snap = createSnapshot(box, [device]);
  const image = await connect(box, `${device}@${snap.id}`);
  const written = Buffer.alloc(3 * BLOCK + 512, 0x5a);
  await image.write(written, 5 * BLOCK + 512);
  await image.flush();
  const back = Buffer.alloc(written.length);
  await image.read(back, 5 * BLOCK + 512);
  await image.close();
  assert.deepEqual(back, written, 'the image reads back its own write');
  assert.deepEqual(fs.readFileSync(device), original, 'the device is untouched');
  const copy = mustCopy(box, `${device}@${snap.id}`);
  const expected = Buffer.from(original);
  written.copy(expected, 5 * BLOCK + 512);
  assert.deepEqual(copy, expected);
});

test('overflow with a tiny limit: the snapshot overflows, its image answers EIO, the device has every write; extend in time avoids it', { timeout: 90_000 }, async (t) => {
  const box = sandbox(t);
  const device = randomImage(box, 'a.img');
  await startDaemon(t, { sandbox: box, password: false });
  const small = createSnapshot(box, [device], ['--limit', '256K']);
  const roomy = createSnapshot(box, [device], ['--limit', '256K']);
  ok(box, ['snapshot', 'extend', roomy.id, '--limit', '64M']);
  const before = fs.readFileSync(device);
  const client = await connect(box, device);
  const fresh = randomBytes(2 << 20);
  await client.write(fresh, 1 << 20);
  await client.flush();
  await client.close();
  const expected = Buffer.from(before);
  fresh.copy(expected, 1 << 20);
  assert.deepEqual(fs.readFileSync(device), expected, 'the device holds exactly what was written');

  const info = JSON.parse(ok(box, ['snapshot', 'info', small.id, '--json'])) as { state: string; reason: string };
  assert.equal(info.state, 'overflowed', JSON.stringify(info));
  assert.notEqual(copyOut(box, `${device}@${small.id}`).status, 0, 'reading an overflowed image fails');
  const events = ok(box, ['events', '--json']).trim().split('\n').map((l) => JSON.parse(l) as { type: string; snapshot?: string });
  assert.ok(events.some((e) => e.type === 'snapshot-overflowed' && e.snapshot === small.id), 'an overflow event arrived');
  assert.deepEqual(mustCopy(box, `${device}@${roomy.id}`), before, 'the extended snapshot is still exact');
});

test('a snapshot survives SIGKILL of the daemon with writes in flight', { timeout: 120_000 }, async (t) => {
  const box = sandbox(t);
  const device = randomImage(box, 'a.img');
  const daemon = await startDaemon(t, { sandbox: box, password: false });
  const atTake = fs.readFileSync(device);
  const snap = createSnapshot(box, [device]);
  const client = await connect(box, device);
  let running = true;
  const writers = Array.from({ length: 8 }, async () => {
    while (running) {
      const block = Math.floor(Math.random() * BLOCKS);
      await client.write(randomBytes(BLOCK), block * BLOCK).catch(() => { running = false; });
    }
  });
  await new Promise((r) => setTimeout(r, 400));
  daemon.server.kill('SIGKILL');
  await Promise.all(writers);
  await client.close().catch(() => undefined);
  await daemon.server.stop();

  await startDaemon(t, { sandbox: box, password: false });
  const list = JSON.parse(ok(box, ['snapshot', 'list', '--json'])) as { snapshots: Array<{ id: string; state: string }> };
  assert.deepEqual(list.snapshots.map((s) => [s.id, s.state]), [[snap.id, 'ok']]);
  assert.deepEqual(mustCopy(box, `${device}@${snap.id}`), atTake, 'the image is still the device at the take');
});

test('destroy while a reader and a writer are busy: refused, then --force cuts the reader off; no hang, the device is intact', { timeout: 60_000 }, async (t) => {
  const box = sandbox(t);
  const device = randomImage(box, 'a.img');
  await startDaemon(t, { sandbox: box, password: false });
  const snap = createSnapshot(box, [device]);
  const writer = await connect(box, device);
  const reader = await connect(box, `${device}@${snap.id}`);
  const atTake = fs.readFileSync(device);
  const expected = Buffer.from(atTake);
  let running = true;
  let written = 0;
  const writes = (async () => {
    for (let i = 0; running; i++) {
      const data = randomBytes(BLOCK);
      const block = i % BLOCKS;
      await writer.write(data, block * BLOCK);
      data.copy(expected, block * BLOCK);
      written++;
    }
  })();
  // The reader checks every read against the device at the take, and stops at its first error.
  let destroying = false;
  let readsBeforeDestroy = 0;
  const wrongReads: number[] = [];
  let readError: { code: unknown; afterDestroy: boolean; message: string } | undefined;
  // The narrowing of an assert does not see the reader's assignment: read it through a call.
  const readFailure = (): typeof readError => readError;
  const reads = (async () => {
    const buf = Buffer.alloc(64 * 1024);
    for (let i = 0; running; i++) {
      const at = (i % (IMAGE_BYTES / buf.length)) * buf.length;
      try {
        await reader.read(buf, at);
      } catch (err) {
        readError = { code: (err as { code?: unknown }).code, afterDestroy: destroying, message: String(err) };
        return;
      }
      if (!buf.equals(atTake.subarray(at, at + buf.length))) wrongReads.push(at);
      if (!destroying) readsBeforeDestroy++;
    }
  })();
  const until = async (what: string, reached: () => boolean): Promise<void> => {
    while (!reached()) {
      if (readError) throw new Error(`${what}: the reader failed: ${readError.message}`);
      await new Promise((r) => setImmediate(r));
    }
  };
  try {
    await until('before the refusal', () => readsBeforeDestroy >= 20 && written >= 20);
    // The image has a client: refused, and the reads go on.
    const refused = cli(box, ['snapshot', 'destroy', snap.id]);
    assert.equal(refused.status, 1);
    assert.match(refused.stderr, new RegExp(`snapshot ${snap.id} is attached: .*@${snap.id} \\(1 NBD connection\\); disconnect the clients first or destroy with --force`));
    const readsBeforeRefusal = readsBeforeDestroy;
    await until('after the refusal', () => readsBeforeDestroy >= readsBeforeRefusal + 20);
    assert.equal(readError, undefined, 'a refused destroy leaves the image served');
    destroying = true;
    ok(box, ['snapshot', 'destroy', snap.id, '--force']);
    await reads;
  } finally {
    running = false;
    await Promise.allSettled([writes, reads]);
  }
  await Promise.all([writes, reads]);
  await writer.flush();
  await writer.close();
  await reader.close().catch(() => undefined);
  assert.ok(readsBeforeDestroy >= 40, `the image was read before the destroy (${readsBeforeDestroy} reads)`);
  assert.deepEqual(wrongReads, [], 'every read of the image gave the device as it was at the take');
  assert.ok(written > 0, 'the device was written while the image was read');
  // Cut off: the read in flight or the next one fails because the connection was closed.
  const failure = readFailure();
  assert.deepEqual(failure && { code: failure.code, afterDestroy: failure.afterDestroy }, { code: 'ESHUTDOWN', afterDestroy: true }, failure?.message ?? 'no read failed');
  assert.deepEqual(fs.readFileSync(device), expected, 'the device holds every write');
  const list = JSON.parse(ok(box, ['snapshot', 'list', '--json'])) as { snapshots: unknown[] };
  assert.deepEqual(list.snapshots, []);
  assert.deepEqual(fs.readdirSync(path.join(box.stateDir, 'snapshots')), [], 'its storage is gone');
});

test('destroy is refused while an NBD client holds an image, shown by snapshot info, and goes through once it disconnects', { timeout: 60_000 }, async (t) => {
  const box = sandbox(t);
  const device = randomImage(box, 'a.img', 1 << 20);
  await startDaemon(t, { sandbox: box, password: false });
  const snap = createSnapshot(box, [device]);
  const reader = await connect(box, `${device}@${snap.id}`);
  cleanupOf(t).after(() => reader.close().catch(() => undefined));
  const info = JSON.parse(ok(box, ['snapshot', 'info', snap.id, '--json'])) as { images: Array<{ connections: number; mountpoint: string | null }> };
  assert.deepEqual(info.images.map((i) => [i.connections, i.mountpoint]), [[1, null]]);
  assert.match(ok(box, ['snapshot', 'info', snap.id]), /1 NBD connection\n/);
  const refused = cli(box, ['snapshot', 'destroy', snap.id]);
  assert.equal(refused.status, 1);
  assert.equal(refused.stderr.trim().split('\n').length, 1, refused.stderr);
  assert.match(refused.stderr, /is attached: .*--force/);
  const buf = Buffer.alloc(4096);
  await reader.read(buf, 0);
  assert.deepEqual(buf, fs.readFileSync(device).subarray(0, 4096), 'the image still reads after the refusal');
  await reader.close();
  // Right after the client has gone: destroy waits for its connection to be let go.
  ok(box, ['snapshot', 'destroy', snap.id]);
  assert.deepEqual((JSON.parse(ok(box, ['snapshot', 'list', '--json'])) as { snapshots: unknown[] }).snapshots, []);
});

test('bad input is refused with one clear line and changes nothing', { timeout: 60_000 }, async (t) => {
  const box = sandbox(t);
  const device = randomImage(box, 'a.img', 1 << 20);
  await startDaemon(t, { sandbox: box, password: false });
  const refuse = (args: string[], pattern: RegExp): void => {
    const r = cli(box, args);
    assert.notEqual(r.status, 0, `bdsnap ${args.join(' ')} should fail`);
    assert.match(r.stderr, pattern);
    assert.equal(r.stderr.trim().split('\n').length, 1, `one line: ${r.stderr}`);
  };
  refuse(['snapshot', 'create', path.join(box.top, 'missing.img')], /missing\.img/);
  refuse(['snapshot', 'create', device, device], /named twice/);
  refuse(['snapshot', 'create', device, '--storage', path.join(box.top, 'nowhere')], /does not exist/);
  refuse(['snapshot', 'info', 'zzzz9999'], /no snapshot zzzz9999/);
  refuse(['snapshot', 'destroy', 'zzzz9999'], /no snapshot zzzz9999/);
  refuse(['snapshot', 'create', device, '--limit', 'lots'], /bad --limit/);
  const list = JSON.parse(ok(box, ['snapshot', 'list', '--json'])) as { snapshots: unknown[] };
  assert.deepEqual(list.snapshots, [], 'no snapshot was left behind');

  const snap = createSnapshot(box, [device]);
  const client = await connect(box, device);
  await client.write(randomBytes(512 * 1024), 0);
  await client.close();
  refuse(['snapshot', 'extend', snap.id, '--limit', '64K'], /limit|below|used/i);
  refuse(['snapshot', 'extend', snap.id], /--limit|--storage/);
  const info = JSON.parse(ok(box, ['snapshot', 'info', snap.id, '--json'])) as { state: string; storage: { limitBytes: number | null } };
  assert.equal(info.state, 'ok');
  assert.equal(info.storage.limitBytes, null, 'the failed extend changed nothing');
});

/** The syncs (fdatasync, fsync) of `file` that process `pid` makes while `action` runs, seen by strace (`-y` names each descriptor's file). */
async function syncsOfFileDuring(pid: number, file: string, traceFile: string, action: () => Promise<unknown> | unknown): Promise<string[]> {
  const strace = spawn('strace', ['-f', '-y', '-e', 'trace=fdatasync,fsync', '-o', traceFile, '-p', String(pid)], { stdio: ['ignore', 'ignore', 'pipe'] });
  const exited = new Promise((resolve) => strace.once('exit', resolve));
  try {
    // strace says on stderr when it holds every thread of the process.
    await new Promise<void>((resolve, reject) => {
      let said = '';
      const timer = setTimeout(() => reject(new Error(`strace did not attach: ${said}`)), 10_000);
      strace.stderr.on('data', (chunk: Buffer) => {
        said += chunk.toString('utf8');
        if (/attached/.test(said)) {
          clearTimeout(timer);
          setTimeout(resolve, 200);
        }
      });
    });
    await action();
  } finally {
    strace.kill('SIGINT');
    await exited;
  }
  return fs.readFileSync(traceFile, 'utf8').split('\n').filter((l) => /\b(fdatasync|fsync)\(\d+</.test(l) && l.includes(`<${file}>`) && /= 0$/.test(l));
}

/**
 * The device syncs the daemon makes while `snapshot create` runs, and, first, while a client's
 * FLUSH is answered: that one must show, or the tracing saw nothing.
 */
async function deviceSyncsDuringCreate(t: TestContext, durability: 'process' | 'strict'): Promise<{ take: string[]; clientFlush: string[] } | undefined> {
  if (!needs(t, { tools: ['strace'] })) return undefined;
  const box = sandbox(t);
  const image = makeImage(path.join(box.top, 'a.img'), IMAGE_BYTES, 'random', 41);
  const daemon = await startDaemon(t, { sandbox: box, password: false, durability });
  register(box, [image]);
  // A client keeps the device open (as writers do): the take then opens nothing, and what it
  // syncs is the barrier's own doing. It leaves writes in the page cache for a flush to find.
  const real = fs.realpathSync(image);
  const client = await connect(box, real);
  cleanupOf(t).after(() => client.close());
  const write = async (): Promise<void> => {
    for (let i = 0; i < 16; i++) await client.write(randomBytes(BLOCK), i * 7 * BLOCK);
  };
  await write();
  const clientFlush = await syncsOfFileDuring(daemon.server.pid, real, path.join(box.top, 'flush.strace'), () => client.flush());
  await write();
  let created: Created | undefined;
  const take = await syncsOfFileDuring(daemon.server.pid, real, path.join(box.top, 'take.strace'), () => {
    created = createSnapshot(box, [image]);
  });
  if (created !== undefined) ok(box, ['snapshot', 'destroy', created.id]);
  return { take, clientFlush };
}

test('snapshot create flushes the device before it returns where the change map survives a power loss (strict)', { timeout: 60_000 }, async (t) => {
  const syncs = await deviceSyncsDuringCreate(t, 'strict');
  if (syncs === undefined) return;
  assert.ok(syncs.take.length >= 1, `the device was synced ${syncs.take.length} times during the take`);
});

test('snapshot create holds writers for no device flush where the change map is reset after a power loss anyway (process)', { timeout: 60_000 }, async (t) => {
  const syncs = await deviceSyncsDuringCreate(t, 'process');
  if (syncs === undefined) return;
  assert.notDeepEqual(syncs.clientFlush, [], 'strace sees the device synced for a client\'s FLUSH');
  assert.deepEqual(syncs.take, [], 'no fdatasync of the device during the take');
});
