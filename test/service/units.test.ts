/**
 * The service's pure parts and file formats: the control line decoder (split at every byte,
 * random bytes, overlong lines), request validation, the password store and the registry.
 */

import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import fc from 'fast-check';
import { BdsnapError } from '../../src/errors.js';
import { PasswordStore } from '../../src/service/auth.js';
import { LineDecoder, requestSchema, type LineEvent } from '../../src/service/control-protocol.js';
import { SourceRefresh } from '../../src/service/instant-restore.js';
import { Registry, canonicalDevicePath, readRegistry } from '../../src/service/registry.js';
import { makeImage } from '../../testkit/files.js';

function tempDir(t: { after(fn: () => void): void }): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-unit-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

test('LineDecoder gives the same lines wherever the input is split', () => {
  const input = Buffer.from('{"a":1}\n\n{"b":"two"}\nthird line\n');
  const expected: LineEvent[] = [
    { kind: 'line', text: '{"a":1}' }, { kind: 'line', text: '' }, { kind: 'line', text: '{"b":"two"}' }, { kind: 'line', text: 'third line' },
  ];
  for (let i = 0; i <= input.length; i++) {
    for (let j = i; j <= input.length; j++) {
      const d = new LineDecoder(64);
      const events = [...d.push(input.subarray(0, i)), ...d.push(input.subarray(i, j)), ...d.push(input.subarray(j))];
      assert.deepEqual(events, expected, `split at ${i}, ${j}`);
    }
  }
});

test('LineDecoder reports an overlong line once, without holding it, and goes on after it', () => {
  const d = new LineDecoder(16);
  const events: LineEvent[] = [];
  events.push(...d.push(Buffer.from('short\n0123456789')));
  events.push(...d.push(Buffer.from('0123456789')));
  events.push(...d.push(Buffer.alloc(1 << 20, 0x41)));
  events.push(...d.push(Buffer.from('tail\nnext\n')));
  assert.deepEqual(events.map((e) => e.kind), ['line', 'oversized', 'line']);
  assert.deepEqual(events[2], { kind: 'line', text: 'next' });
});

test('LineDecoder: random chunks never throw and never yield a line over the cap', () => {
  fc.assert(fc.property(fc.array(fc.uint8Array({ maxLength: 200 }), { maxLength: 30 }), (chunks) => {
    const d = new LineDecoder(64);
    for (const c of chunks) {
      for (const e of d.push(Buffer.from(c))) {
        if (e.kind === 'line') assert.ok(Buffer.byteLength(e.text) <= 64 * 3);
      }
    }
  }));
});

test('request validation: exact shapes only', () => {
  const good = { id: 1, op: 'mount', device: '/a.img', mountpoint: '/mnt', type: 'ext4', options: 'ro,noatime' };
  assert.equal(requestSchema.safeParse(good).success, true);
  for (const bad of [
    { ...good, type: 'ext4; rm -rf /' },
    { ...good, options: '-o x' + ' y' },
    { ...good, id: -1 },
    { ...good, euid: 0 },
    { ...good, surprise: 1 },
    { id: 1, op: 'activate', device: '', password: 'x' },
    { id: 1, op: 'activate', device: '/a', password: 'x'.repeat(2000) },
    { id: 1, op: 'nope' },
  ]) {
    assert.equal(requestSchema.safeParse(bad).success, false, JSON.stringify(bad).slice(0, 80));
  }
});

test('PasswordStore: salted hash in a 0600 file, verify, change needs the current password, failures slowed', async (t) => {
  const dir = tempDir(t);
  const store = new PasswordStore(dir);
  assert.equal(await store.isSet(), false);
  await assert.rejects(store.set('short'), (e: BdsnapError) => e.code === 'EINVAL');
  await store.set('first password');
  const file = path.join(dir, 'password');
  assert.equal(fs.statSync(file).mode & 0o777, 0o600);
  const stored = JSON.parse(fs.readFileSync(file, 'utf8')) as { algorithm: string; N: number; salt: string; hash: string };
  assert.equal(stored.algorithm, 'scrypt');
  assert.ok(stored.N >= 1 << 14);
  assert.ok(!fs.readFileSync(file, 'utf8').includes('first password'));
  await store.verify('first password');

  const otherDir = tempDir(t);
  await new PasswordStore(otherDir).set('first password');
  const otherStored = JSON.parse(fs.readFileSync(path.join(otherDir, 'password'), 'utf8')) as { salt: string; hash: string };
  assert.notEqual(otherStored.salt, stored.salt, 'each hash has its own salt');
  assert.notEqual(otherStored.hash, stored.hash, 'the same password hashes differently under another salt');

  // The same password at a small cost (each hash carries its own), so the timings below are the
  // failure delays and not the scrypt run, which varies by more than their difference.
  writeScryptHash(dir, 'first password', 2 ** 10);
  const t0 = Date.now();
  await assert.rejects(store.verify('wrong password'), (e: BdsnapError) => e.code === 'EAUTH');
  const firstDelay = Date.now() - t0;
  const t1 = Date.now();
  await assert.rejects(store.verify('wrong again'), (e: BdsnapError) => e.code === 'EAUTH');
  const secondDelay = Date.now() - t1;
  assert.ok(firstDelay >= 240, `first failure delayed (${firstDelay} ms)`);
  assert.ok(secondDelay > firstDelay, `the delay grows (${firstDelay} then ${secondDelay} ms)`);

  await assert.rejects(store.set('second password'), (e: BdsnapError) => e.code === 'EAUTH');
  await assert.rejects(store.set('second password', 'not it at all'), (e: BdsnapError) => e.code === 'EAUTH');
  await store.set('second password', 'first password');
  await store.verify('second password');
  await assert.rejects(store.verify('first password'), (e: BdsnapError) => e.code === 'EAUTH');
  assert.deepEqual(fs.readdirSync(dir), ['password'], 'no temp file is left behind');
});

test('PasswordStore: new hashes at scrypt N=2^15, r=8, p=3; a hash made at the former p=1 still verifies', async (t) => {
  const dir = tempDir(t);
  const store = new PasswordStore(dir);
  await store.set('current password');
  const stored = JSON.parse(fs.readFileSync(path.join(dir, 'password'), 'utf8')) as { N: number; r: number; p: number };
  assert.deepEqual([stored.N, stored.r, stored.p], [2 ** 15, 8, 3]);
  writeScryptHash(dir, 'older password', 2 ** 15);
  await new PasswordStore(dir).verify('older password');
});

/** A password file as PasswordStore writes it, hashed at cost `N`. */
function writeScryptHash(dir: string, password: string, N: number): void {
  const salt = crypto.randomBytes(16);
  const hash = crypto.scryptSync(password, salt, 32, { N, r: 8, p: 1, maxmem: 256 * N * 8 + (1 << 20) });
  fs.writeFileSync(path.join(dir, 'password'), JSON.stringify({ algorithm: 'scrypt', N, r: 8, p: 1, salt: salt.toString('base64'), hash: hash.toString('base64') }), { mode: 0o600 });
}

test('PasswordStore: a corrupt password file is a clear error, not a pass', async (t) => {
  const dir = tempDir(t);
  fs.writeFileSync(path.join(dir, 'password'), '{"algorithm":"plain","password":"x"}');
  await assert.rejects(new PasswordStore(dir).verify('x'), (e: BdsnapError) => e.code === 'ECORRUPT');
});

test('Registry: canonical paths only, persisted atomically, survives a reload', async (t) => {
  const dir = tempDir(t);
  const image = path.join(dir, 'disk.img');
  makeImage(image, 4096, 0);
  fs.symlinkSync(image, path.join(dir, 'link'));
  assert.equal(await canonicalDevicePath(path.join(dir, 'link')), fs.realpathSync(image));
  await assert.rejects(canonicalDevicePath(dir), (e: BdsnapError) => e.code === 'EINVAL');
  await assert.rejects(canonicalDevicePath(path.join(dir, 'missing')), (e: BdsnapError) => e.code === 'ENOENT');
  await assert.rejects(canonicalDevicePath('/dev/null'), (e: BdsnapError) => e.code === 'EINVAL');

  const state = path.join(dir, 'state');
  fs.mkdirSync(state);
  const reg = await Registry.load(state);
  const dev = await canonicalDevicePath(image);
  await reg.register(dev);
  assert.equal(await reg.setActive(dev, true), true);
  assert.equal(await reg.setActive(dev, true), false);
  await reg.sessionStarted(dev, '/snap/s1');
  await reg.markDirtyOutsideSession(dev);
  assert.equal(fs.statSync(path.join(state, 'registry.json')).mode & 0o777, 0o600);

  const again = await Registry.load(state);
  const rec = again.get(dev);
  assert.equal(rec?.active, true);
  assert.equal(rec?.currentSession, '/snap/s1');
  assert.equal(rec?.dirtyOutsideSession, true);
  await again.sessionEnded(dev, '/snap/s1');
  assert.deepEqual((await readRegistry(state))[0]?.sessions, ['/snap/s1']);
  assert.equal((await readRegistry(state))[0]?.currentSession, null);

  fs.writeFileSync(path.join(state, 'registry.json'), '{"version":99}');
  await assert.rejects(Registry.load(state), (e: BdsnapError) => e.code === 'ECORRUPT');
});

test('SourceRefresh: whoever asks gets a reload begun after the ask, shared by those who ask meanwhile, never two at once', { timeout: 10_000 }, async () => {
  let begun = 0;
  let inFlight = 0;
  let most = 0;
  let release: (() => void) | undefined;
  const refresh = new SourceRefresh(async () => {
    begun++;
    inFlight++;
    most = Math.max(most, inFlight);
    await new Promise<void>((resolve) => (release = resolve));
    inFlight--;
  }, () => assert.fail('no reload fails here'));
  const first = refresh.run();
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(begun, 1, 'the first ask begins a reload');
  // Asked while it runs (say, a repair finished meanwhile): these need one that begins later.
  const second = refresh.run();
  const third = refresh.run();
  assert.equal(second, third, 'asks before the next reload begins share it');
  release!();
  assert.equal(await first, true);
  // Right after a reload (within the interval) an ask still gets its own, later one.
  const started = Date.now();
  const pending = second.then((ok) => ({ ok, afterMs: Date.now() - started }));
  const deadline = Date.now() + 3000;
  while (begun < 2 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 5));
  assert.equal(begun, 2, 'an ask made while a reload ran begins another one once it is over');
  release!();
  const got = await pending;
  assert.equal(got.ok, true, 'the later ask is answered by a reload, not refused for the interval');
  assert.equal(begun, 2, 'one reload for both later asks');
  assert.equal(most, 1, 'never two reloads at once');
  assert.ok(got.afterMs >= 400, `the second reload waited for the interval (${got.afterMs} ms)`);
  const none = new SourceRefresh(undefined, () => undefined);
  assert.equal(await none.run(), false, 'a source that cannot reload says so');
});
