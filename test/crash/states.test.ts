/** The crash-state builder itself, on small hand-made recordings. */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { Recording } from '../helpers/crash-recorder.js';
import { exploreCrashStates, namesNotDurableAt, unsyncedAtFlushAcks } from '../helpers/crash-states.js';

const root = '/r';

function contents(rec: Recording): Set<string> {
  const { states } = exploreCrashStates(rec, { maxStates: 1000, seed: 1 });
  return new Set(states.map((s) => [...s.tree].map(([p, c]) => `${p}=${c === null ? 'dir' : c.toString('latin1')}`).join(' ')));
}

test('unsynced writes of a file: every prefix, a torn last write, one lost out of order', () => {
  const a = Buffer.alloc(4096, 'a');
  const b = Buffer.alloc(8192, 'b');
  const rec: Recording = {
    roots: [root], initial: { dirs: [root], files: [{ path: '/r/f', id: 1, content: Buffer.alloc(0) }] },
    entries: [{ k: 'write', id: 1, position: 0, data: a }, { k: 'write', id: 1, position: 4096, data: b }],
  };
  const got = contents(rec);
  const f = (s: string): string => `/r=dir /r/f=${s}`;
  const A = 'a'.repeat(4096);
  const B = 'b'.repeat(4096);
  const Z = '\0'.repeat(4096);
  // Nothing, the first write, the second torn to either of its pages, both, the second without the first.
  assert.deepEqual([...got].sort(), ['', A, A + B, A + B + B, A + Z + B, Z + B + B].map(f).sort());
});

test('a synced write is always there; a name is lost until its directory is synced', () => {
  const rec: Recording = {
    roots: [root], initial: { dirs: [root], files: [] },
    entries: [
      { k: 'create', path: '/r/f', id: 1 }, { k: 'write', id: 1, position: 0, data: Buffer.from('x') }, { k: 'fsync', id: 1 },
      { k: 'mark', label: 'synced file' }, { k: 'dsync', dir: root },
    ],
  };
  const got = contents(rec);
  assert.deepEqual([...got].sort(), ['/r=dir', '/r=dir /r/f=', '/r=dir /r/f=x']);
  assert.deepEqual(namesNotDurableAt(rec, 4), ['create /r/f']);
  assert.deepEqual(namesNotDurableAt(rec, 5), []);
});

test('a flush answered before the device was synced is reported', () => {
  const rec: Recording = {
    roots: [root], initial: { dirs: [root], files: [{ path: '/r/d', id: 1, content: Buffer.alloc(0) }] },
    entries: [{ k: 'write', id: 1, position: 0, data: Buffer.from('x') }, { k: 'mark', label: 'flush' }, { k: 'fsync', id: 1 }, { k: 'mark', label: 'flush' }],
  };
  assert.deepEqual(unsyncedAtFlushAcks(rec, 1, (l) => l === 'flush'), ['flush']);
});

test('a seeded sample is the same for a seed and bounded', () => {
  const entries: Recording['entries'] = [];
  for (let i = 0; i < 12; i++) entries.push({ k: 'write', id: 1, position: i * 4096, data: Buffer.alloc(8192, i) });
  const rec: Recording = { roots: [root], initial: { dirs: [root], files: [{ path: '/r/f', id: 1, content: Buffer.alloc(0) }] }, entries };
  const one = exploreCrashStates(rec, { maxStates: 20, seed: 7 });
  const two = exploreCrashStates(rec, { maxStates: 20, seed: 7 });
  assert.ok(one.built > 20);
  assert.equal(one.states.length, 20);
  assert.deepEqual(one.states.map((s) => s.what), two.states.map((s) => s.what));
});
