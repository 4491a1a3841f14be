import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { z } from 'zod';
import { BdsnapError } from '../../src/errors.js';
import { parseJson, readJsonFile, tryParseJson } from '../../src/stored-json.js';

const schema = z.object({ devices: z.array(z.object({ path: z.string() })) });
const describe = (problem: string): string => `registry is damaged: ${problem}`;

function corrupt(pattern: RegExp): (err: unknown) => boolean {
  return (err) => err instanceof BdsnapError && err.code === 'ECORRUPT' && pattern.test(err.message);
}

test('stored JSON: a value that matches comes back; what does not parse or match is ECORRUPT naming the place', () => {
  assert.deepEqual(parseJson('{"devices":[{"path":"/a"}]}', schema, describe), { devices: [{ path: '/a' }] });
  assert.deepEqual(parseJson(Buffer.from('{"devices":[]}'), schema, describe), { devices: [] });
  assert.throws(() => parseJson('{"devices": [', schema, describe), corrupt(/^registry is damaged: not valid JSON \(/));
  assert.throws(() => parseJson('{"devices":[{"path":7}]}', schema, describe), corrupt(/^registry is damaged: devices\.0\.path: /));
  assert.throws(() => parseJson('[]', schema, describe), corrupt(/^registry is damaged: \(root\): /));
  assert.equal(tryParseJson('{"devices": 1}', schema), undefined);
  assert.equal(tryParseJson('nope', schema), undefined);
});

test('stored JSON files: absent is undefined, damaged is ECORRUPT, unreadable is EIO', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'stored-json-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'registry.json');
  assert.equal(await readJsonFile(file, schema, describe), undefined);
  fs.writeFileSync(file, '{"devices":[{"path":"/b"}]}');
  assert.deepEqual(await readJsonFile(file, schema, describe), { devices: [{ path: '/b' }] });
  fs.writeFileSync(file, '{"devi');
  await assert.rejects(readJsonFile(file, schema, describe), corrupt(/not valid JSON/));
  await assert.rejects(readJsonFile(dir, schema, describe), (err: unknown) => err instanceof BdsnapError && err.code === 'EIO');
});
