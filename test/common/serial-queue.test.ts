import assert from 'node:assert/strict';
import { test } from 'node:test';
import { KeyedQueue, SerialQueue } from '../../src/serial-queue.js';

/** A task that finishes only when released, recording when it starts and ends. */
function gate(log: string[], name: string): { task: () => Promise<string>; release: () => void } {
  let release!: () => void;
  const released = new Promise<void>((resolve) => (release = resolve));
  return { task: async () => { log.push(`${name} start`); await released; log.push(`${name} end`); return name; }, release };
}

test('a serial queue runs one task at a time in order, and a failure does not stop the next', async () => {
  const queue = new SerialQueue();
  const log: string[] = [];
  const a = gate(log, 'a');
  const first = queue.run(a.task);
  const failed = queue.run(async () => { log.push('b'); throw new Error('b failed'); });
  const third = queue.run(async () => { log.push('c'); return 'c'; });
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual(log, ['a start'], 'nothing starts before the task ahead has settled');
  a.release();
  assert.equal(await first, 'a');
  await assert.rejects(failed, /b failed/);
  assert.equal(await third, 'c');
  await queue.idle();
  assert.deepEqual(log, ['a start', 'a end', 'b', 'c']);
});

test('a keyed queue orders the tasks of one key and lets other keys run meanwhile', async () => {
  const queue = new KeyedQueue();
  const log: string[] = [];
  const x1 = gate(log, 'x1');
  const first = queue.run('x', x1.task);
  const second = queue.run('x', async () => { log.push('x2'); return 'x2'; });
  assert.equal(await queue.run('y', async () => { log.push('y1'); return 'y1'; }), 'y1');
  assert.deepEqual(log, ['x1 start', 'y1'], 'y ran while x1 held key x');
  x1.release();
  assert.deepEqual([await first, await second], ['x1', 'x2']);
  assert.deepEqual(log, ['x1 start', 'y1', 'x1 end', 'x2']);
});
