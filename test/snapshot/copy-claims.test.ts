/**
 * CopyClaims: the copies in flight of a copy-before-write layer, held as runs. Checked against
 * a model of one claim per chunk: every chunk that needs a copy is copied exactly once, a
 * request waits for every copy covering its chunks (its own and others'), runs respect their
 * size bound, and a settled copy releases its chunks before any waiter resumes.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { CopyClaims } from '../../src/snapshot/copy-claims.js';

interface Started {
  first: number;
  last: number;
  settle: () => void;
  fail: () => void;
}

/** Claims with copies the test settles by hand; `preserved` is what a settled copy marks. */
function harness(): { claims: CopyClaims; started: Started[]; preserved: Set<number>; claim: (first: number, last: number, maxRun?: number) => Promise<void>[] } {
  const claims = new CopyClaims();
  const started: Started[] = [];
  const preserved = new Set<number>();
  const claim = (first: number, last: number, maxRun = 64): Promise<void>[] => claims.claim(first, last, maxRun, (c) => !preserved.has(c), (a, b) => new Promise<void>((resolve, reject) => {
    started.push({
      first: a,
      last: b,
      settle: () => {
        for (let c = a; c <= b; c++) preserved.add(c);
        resolve();
      },
      fail: () => reject(new Error('copy failed')),
    });
  }));
  return { claims, started, preserved, claim };
}

test('a request claims the runs it needs, skips preserved chunks and splits runs at the bound', () => {
  const { claims, started, preserved, claim } = harness();
  preserved.add(5);
  const waits = claim(0, 12, 4);
  assert.deepEqual(started.map((s) => [s.first, s.last]), [[0, 3], [4, 4], [6, 9], [10, 12]]);
  assert.equal(waits.length, 4);
  for (const c of [0, 3, 4, 6, 12]) assert.ok(claims.has(c), `chunk ${c} is claimed`);
  assert.equal(claims.has(5), false, 'a preserved chunk is not claimed');
  assert.equal(claims.has(13), false);
  assert.equal(claims.get(7), waits[2]);
  assert.ok(claims.overlaps(5, 6));
  assert.equal(claims.overlaps(13, 20), false);
  assert.equal(claims.promises().length, 4);
});

test('a racing request waits once for each copy in flight and copies only what nobody copies', async () => {
  const { claims, started, claim } = harness();
  const first = claim(4, 7);
  assert.equal(started.length, 1);
  const second = claim(0, 10);
  // 0..3 new, 4..7 in flight (waited for once), 8..10 new.
  assert.deepEqual(started.map((s) => [s.first, s.last]), [[4, 7], [0, 3], [8, 10]]);
  assert.equal(second.length, 3);
  assert.ok(second.includes(first[0]!));
  let resumed = false;
  const waiter = Promise.all(second).then(() => {
    resumed = true;
    // Released before any waiter resumes.
    assert.equal(claims.overlaps(0, 10), false);
  });
  for (const s of started) s.settle();
  await waiter;
  assert.ok(resumed);
  assert.deepEqual(claims.promises(), []);
});

test('a failed copy releases its chunks, so that a later request claims them again', async () => {
  const { claims, started, claim } = harness();
  const [p] = claim(0, 3);
  started[0]!.fail();
  await assert.rejects(p!, /copy failed/);
  assert.equal(claims.has(2), false);
  claim(2, 2);
  assert.deepEqual(started.map((s) => [s.first, s.last]), [[0, 3], [2, 2]]);
});

test('model: requests in any order copy each needed chunk once and wait for every copy of their chunks', async () => {
  const request = fc.tuple(fc.integer({ min: 0, max: 40 }), fc.integer({ min: 0, max: 12 }), fc.boolean());
  await fc.assert(fc.asyncProperty(fc.array(request, { minLength: 1, maxLength: 25 }), fc.integer({ min: 1, max: 8 }), async (requests, maxRun) => {
    const { claims, started, preserved, claim } = harness();
    const copiesOf = new Map<number, number>();
    for (const [first, length, settleNow] of requests) {
      const last = first + length;
      const before = started.length;
      const waits = claim(first, last, maxRun);
      for (const s of started.slice(before)) {
        assert.ok(s.last - s.first + 1 <= maxRun, 'a run respects the bound');
        for (let c = s.first; c <= s.last; c++) copiesOf.set(c, (copiesOf.get(c) ?? 0) + 1);
      }
      // Every chunk of the request is preserved or claimed, and the request waits for each claim.
      for (let c = first; c <= last; c++) {
        const inFlight = claims.get(c);
        assert.ok(preserved.has(c) || inFlight !== undefined, `chunk ${c} is covered`);
        if (inFlight !== undefined) assert.ok(waits.includes(inFlight), `the request waits for the copy of chunk ${c}`);
      }
      assert.equal(new Set(waits).size, waits.length, 'each copy is waited for once');
      if (settleNow) {
        for (const s of started.splice(0)) s.settle();
        await Promise.resolve();
        await Promise.resolve();
      }
    }
    for (const [chunk, n] of copiesOf) assert.equal(n, 1, `chunk ${chunk} copied ${n} times`);
  }), { numRuns: 300 });
});
