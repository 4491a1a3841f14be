/**
 * No module of src/ imports itself back through others: a cycle (type-only imports included,
 * since they tie the modules' meanings together just the same) makes neither side readable
 * alone and its load order fragile. Reads the TypeScript sources, not dist/, where type-only
 * imports are gone.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { PROJECT_ROOT } from '../../testkit/bdsnap-cli.js';
import { importsOf, sourceFiles } from './imports.js';

const SRC = path.join(PROJECT_ROOT, 'src');

/** Each cycle found by a depth-first walk, as the list of files around it. */
export function findCycles(graph: Map<string, string[]>): string[][] {
  const cycles: string[][] = [];
  const state = new Map<string, 'open' | 'done'>();
  const stack: string[] = [];
  const visit = (node: string): void => {
    state.set(node, 'open');
    stack.push(node);
    for (const next of graph.get(node) ?? []) {
      const s = state.get(next);
      if (s === 'open') cycles.push([...stack.slice(stack.indexOf(next)), next]);
      else if (s === undefined) visit(next);
    }
    stack.pop();
    state.set(node, 'done');
  };
  for (const node of [...graph.keys()].sort()) if (!state.has(node)) visit(node);
  return cycles;
}

test('the walk finds a cycle when there is one', () => {
  const graph = new Map([['a', ['b']], ['b', ['c']], ['c', ['a']], ['d', ['a']]]);
  assert.deepEqual(findCycles(graph), [['a', 'b', 'c', 'a']]);
  assert.deepEqual(findCycles(new Map([['a', ['b']], ['b', []]])), []);
});

test('no import cycle among the modules of src/', () => {
  const files = sourceFiles(SRC);
  assert.ok(files.length > 50, `the sources are found (${files.length} files under ${SRC})`);
  const graph = new Map(files.map((f) => [f, importsOf(f)]));
  const cycles = findCycles(graph).map((c) => c.map((f) => path.relative(SRC, f)).join(' -> '));
  assert.deepEqual(cycles, []);
});
