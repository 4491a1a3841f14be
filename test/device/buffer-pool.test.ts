/**
 * BufferPool keeps a handful of sizes: random lengths must not fill it with buffers of sizes
 * nobody asks for again, while the sizes in use stay pooled.
 */

import assert from 'node:assert/strict';
import { test } from 'node:test';
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
