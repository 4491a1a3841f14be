/**
 * The top folders import downwards only: src/ is the product and imports none of the others;
 * testkit/ (processes, servers, the daemon, images, fuzz campaigns) serves both bench/ and
 * test/ and imports only src/; bench/ takes what it shares with the tests from testkit/, never
 * from test/; test/ sits on top (it also checks a bench's own tools, such as the floor server).
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { PROJECT_ROOT } from '../../testkit/bdsnap-cli.js';
import { importsOf, sourceFiles } from './imports.js';

/** What each top folder may import, besides itself. */
const MAY_IMPORT: Record<string, string[]> = {
  src: [],
  testkit: ['src'],
  bench: ['src', 'testkit'],
  test: ['src', 'testkit', 'bench'],
};

const topFolder = (file: string): string => path.relative(PROJECT_ROOT, file).split(path.sep)[0]!;

test('each top folder imports only the folders below it', () => {
  const wrong: string[] = [];
  for (const [folder, allowed] of Object.entries(MAY_IMPORT)) {
    const files = sourceFiles(path.join(PROJECT_ROOT, folder));
    assert.ok(files.length > 0, `${folder}/ has sources`);
    for (const file of files) {
      for (const target of importsOf(file)) {
        const to = topFolder(target);
        if (to !== folder && !allowed.includes(to)) {
          wrong.push(`${path.relative(PROJECT_ROOT, file)} -> ${path.relative(PROJECT_ROOT, target)}`);
        }
      }
    }
  }
  assert.deepEqual(wrong, []);
});
