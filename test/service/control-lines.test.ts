/**
 * A client accepts an error response exactly when its code is one of ours: the list of codes is
 * the one errors.ts keeps, not a copy.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { WIRE_ERRNO } from '../../src/errors.js';
import { parseResponse } from '../../src/service/control-lines.js';

test('parseResponse: every error code of errors.ts is accepted, any other string is not', () => {
  for (const code of Object.keys(WIRE_ERRNO)) {
    assert.deepEqual(parseResponse({ id: 1, ok: false, error: { code, message: 'm' } }), { id: 1, ok: false, error: { code, message: 'm' } });
  }
  for (const code of ['EFOO', 'eio', '', 'toString', '__proto__', 'hasOwnProperty']) {
    assert.equal(parseResponse({ id: 1, ok: false, error: { code, message: 'm' } }), undefined, code);
  }
});
