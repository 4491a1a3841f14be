/**
 * BufferPool keeps a handful of sizes: random lengths must not fill it with buffers of sizes
 * nobody asks for again, while the sizes in use stay pooled.
 */

import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { BufferPool } from '../../src/device/buffer-pool.js';
import { InFlightBudget } from '../../src/nbd/in-flight-budget.js';

test('a pool fed 1,000 different sizes keeps only the most recently used ones', () => {
  const pool = new BufferPool(64 << 20);
  const common = pool.get(1 << 20);
  pool.put(common);
  for (let i = 0; i < 1000; i++) {
    pool.put(pool.get(4096 + i * 512));
    // The size a client keeps asking for stays the most recently used.
    if (i % 10 === 0) pool.put(pool.get(1 << 20));
  }
  assert.ok(pool.pooledBytes <= 16 * (1 << 20), `pooled ${pool.pooledBytes} bytes`);
  assert.equal(pool.get(1 << 20), common, 'the size in use is still pooled');
});

test('the pool keeps and drops the same buffers as a least-recently-used model of it, whatever the order of gets and puts', () => {
  // The model moves a size to the end on every get that finds it, as the pool did before it
  // skipped the move for the size already there.
  const sizes = fc.constantFrom(...Array.from({ length: 20 }, (_, i) => 512 * (i + 1)));
  fc.assert(fc.property(fc.array(fc.record({ put: fc.boolean(), size: sizes }), { maxLength: 300 }), fc.integer({ min: 4096, max: 64 * 1024 }), (ops, cap) => {
    const pool = new BufferPool(cap);
    const free = new Map<number, Buffer[]>();
    let pooled = 0;
    const held: Buffer[] = [];
    for (const op of ops) {
      if (op.put) {
        const b = held.pop() ?? Buffer.allocUnsafeSlow(op.size);
        pool.put(b);
        if (b.length > cap) continue;
        let list = free.get(b.length);
        if (list) {
          if (pooled + b.length > cap) continue;
        } else {
          while (free.size > 0 && (free.size >= 16 || pooled + b.length > cap)) {
            const [size, dropped] = free.entries().next().value as [number, Buffer[]];
            pooled -= size * dropped.length;
            free.delete(size);
          }
          list = [];
          free.set(b.length, list);
        }
        list.push(b);
        pooled += b.length;
      } else {
        const got = pool.get(op.size);
        const list = free.get(op.size);
        const expected = list?.pop();
        if (expected) {
          pooled -= op.size;
          free.delete(op.size);
          free.set(op.size, list!);
        }
        assert.equal(got.length, op.size);
        if (expected) assert.equal(got, expected, 'the buffer the model has pooled comes back');
        else assert.ok(![...free.values()].some((l) => l.includes(got)), 'a new buffer when the model has none');
        held.push(got);
      }
      assert.equal(pool.pooledBytes, pooled);
    }
  }), { numRuns: 300 });
});

test('the in-flight budget says once that a burst is over', () => {
  let overs = 0;
  const budget = new InFlightBudget(100, { bytes: 40, over: () => overs++ });
  assert.equal(budget.acquire(30, () => undefined), true);
  budget.release(30);
  assert.equal(overs, 0, 'no burst yet');
  budget.charge(50);
  budget.release(30);
  assert.equal(overs, 0, 'still above a quarter of the burst');
  budget.release(15);
  assert.equal(overs, 1);
  budget.release(5);
  assert.equal(overs, 1, 'once per burst');
});
