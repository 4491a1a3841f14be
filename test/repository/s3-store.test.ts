/**
 * S3Store against a real radosgw: the ObjectStore contract, bucket creation, and the faults an
 * S3 server shows in the field (throttling with 503 SlowDown, connections reset), met through a
 * proxy in front of it: retried while they last, and once they stay, an error that names the
 * object and the reason.
 */

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { S3Store } from '../../src/repository/s3-store.js';
import { parseRepoLocation } from '../../src/repository/location.js';
import { FlakyProxy } from '../helpers/flaky-proxy.js';
import { newS3Store, rgwForFile } from '../helpers/rgw.js';
import { storeContract } from './store-contract.js';
import type { SkippableContext } from '../../testkit/needs.js';

const rgw = rgwForFile();

/** A store on a new bucket of its own (created), with the server's keys in the environment. */
async function newStore(t: SkippableContext & { after(fn: () => unknown): void }): Promise<S3Store | undefined> {
  const r = await rgw(t);
  return r ? newS3Store(r, t, 'some/prefix') : undefined;
}

/**
 * A store as newStore gives, and a second one on the same bucket reached through a proxy that
 * injects faults; `proxied` is the proxy's endpoint.
 */
async function proxiedStore(t: SkippableContext & { after(fn: () => unknown): void }, retryForMs: number) {
  const r = await rgw(t);
  if (!r) return undefined;
  const store = await newStore(t);
  if (!store) return undefined;
  const faulty = new FlakyProxy(Number(new URL(r.endpoint).port));
  const proxied = await faulty.listen();
  t.after(() => faulty.close());
  const at = parseRepoLocation(store.location);
  if (at.kind !== 's3') throw new Error('not s3');
  const through = new S3Store({ ...at, endpoint: proxied }, { retryForMs });
  t.after(() => through.close());
  return { store, faulty, proxied, at, through };
}

storeContract('S3 (radosgw)', (t) => newStore(t));

test('S3: a prefix keeps repositories apart in one bucket; keys of other tools are not listed', { timeout: 60_000 }, async (t) => {
  const r = await rgw(t);
  if (!r) return;
  Object.assign(process.env, r.env);
  const repo = r.newRepo('');
  const at = parseRepoLocation(repo);
  if (at.kind !== 's3') throw new Error('not s3');
  const whole = new S3Store(at);
  const a = new S3Store({ ...at, prefix: 'hosts/a/' });
  const b = new S3Store({ ...at, prefix: 'hosts/b/' });
  t.after(() => [whole, a, b].forEach((s) => s.close()));
  await whole.createBucket();
  await whole.createBucket();
  await a.put('config', Buffer.from('a'));
  await b.put('config', Buffer.from('b'));
  assert.deepEqual(await a.get('config'), Buffer.from('a'));
  assert.deepEqual(await a.names(''), ['config']);
  assert.deepEqual((await whole.names('')).sort(), ['hosts/a/config', 'hosts/b/config']);
});

test('S3: throttling (503 SlowDown) and reset connections are retried until they pass', { timeout: 60_000 }, async (t) => {
  const p = await proxiedStore(t, 30_000);
  if (!p) return;
  const { store, faulty, through } = p;
  await through.put('first', Buffer.from('reached'));

  for (const fault of ['slowdown', 'reset'] as const) {
    faulty.fault = fault;
    faulty.dropAll();
    // The faults stop after a while, from a timer the store cannot hold up.
    const healed = setTimeout(() => (faulty.fault = 'pass'), 1_500);
    const body = Buffer.alloc(300_000, fault.length);
    await Promise.all([through.put(`during-${fault}`, body), through.stage(`staged-${fault}`, body).then(() => through.commit())]);
    clearTimeout(healed);
    assert.ok(faulty.counts[fault] >= 2, `the store met ${faulty.counts[fault]} ${fault} connections`);
    assert.deepEqual(await store.get(`during-${fault}`), body);
    assert.deepEqual(await through.get(`staged-${fault}`), body);
  }
});

test('S3: a fault that stays fails with the object, the request and the reason', { timeout: 60_000 }, async (t) => {
  const p = await proxiedStore(t, 1_500);
  if (!p) return;
  const { store, faulty, proxied, at, through } = p;
  await through.put('pieces/ab/x', Buffer.from('x'));
  faulty.fault = 'slowdown';
  faulty.dropAll();
  await assert.rejects(through.get('pieces/ab/x'), (err: Error & { code?: string }) => {
    assert.equal(err.code, 'EIO');
    assert.match(err.message, /^S3 GET pieces\/ab\/x at s3:http:\/\/127\.0\.0\.1:\d+\/t-[0-9a-f]+\/some\/prefix failed: 503 SlowDown.*\(after \d+ attempts in [\d.]+ s\)$/);
    return true;
  });
  // The stored object is untouched; a store whose server is not there at all says so at once.
  assert.deepEqual(await store.get('pieces/ab/x'), Buffer.from('x'));
  await faulty.close();
  const gone = new S3Store({ ...at, endpoint: proxied });
  t.after(() => gone.close());
  const startedMs = Date.now();
  await assert.rejects(gone.stat('config'), /ECONNREFUSED/);
  assert.ok(Date.now() - startedMs < 5_000, 'an address that never answered is not waited for');
});

test('S3: wrong credentials are refused with the reason, never retried, never echoed', { timeout: 30_000 }, async (t) => {
  const store = await newStore(t);
  if (!store) return;
  const at = parseRepoLocation(store.location);
  if (at.kind !== 's3') throw new Error('not s3');
  const saved = process.env.AWS_SECRET_ACCESS_KEY;
  process.env.AWS_SECRET_ACCESS_KEY = 'not-the-secret-123';
  t.after(() => (process.env.AWS_SECRET_ACCESS_KEY = saved));
  const wrong = new S3Store(at);
  t.after(() => wrong.close());
  await assert.rejects(wrong.get('config'), (err: Error & { code?: string }) => {
    assert.equal(err.code, 'EPERM');
    assert.match(err.message, /403 SignatureDoesNotMatch/);
    assert.doesNotMatch(err.message, /not-the-secret/);
    return true;
  });
});
