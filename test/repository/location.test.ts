/** REPO spellings: what is a directory, what is an S3 bucket, and what is refused. */

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { parseRepoLocation } from '../../src/repository/location.js';

test('REPO: directories and s3: URLs are parsed; other schemes and malformed s3: are refused', () => {
  const accepted: Array<[string, ReturnType<typeof parseRepoLocation>]> = [
    ['/backups/r1', { kind: 'local', dir: '/backups/r1' }],
    ['repo', { kind: 'local', dir: 'repo' }],
    ['./sftp:x', { kind: 'local', dir: './sftp:x' }],
    ['s3:http://127.0.0.1:40080/bucket', { kind: 's3', endpoint: 'http://127.0.0.1:40080', bucket: 'bucket', prefix: '' }],
    ['s3:https://s3.example.net/backups/bdsnap/web1/', { kind: 's3', endpoint: 'https://s3.example.net', bucket: 'backups', prefix: 'bdsnap/web1/' }],
    ['s3:HTTP://Host:9000/my.bucket-1/p', { kind: 's3', endpoint: 'http://host:9000', bucket: 'my.bucket-1', prefix: 'p/' }],
  ];
  for (const [spec, want] of accepted) assert.deepEqual(parseRepoLocation(spec), want, spec);
  const refused: Array<[string, RegExp]> = [
    ['sftp:user@host:/srv', /"sftp:" repositories are not supported/],
    ['rest:http://host/', /"rest:" repositories are not supported/],
    ['b2:bucket', /"b2:" repositories are not supported/],
    ['http://host/bucket', /"http:" repositories are not supported/],
    ['s3:host/bucket', /names its server with http:\/\/ or https:\/\//],
    ['s3:http://host/', /the bucket is missing/],
    ['s3:http://host/UPPER', /not a valid bucket name/],
    ['s3:http://host/ab', /not a valid bucket name/],
    ['s3:http://host/bucket/.hidden', /the prefix/],
    ['s3:http://host/bucket/a/../b', /segments are not allowed/],
    ['s3:http://host/./bucket', /segments are not allowed/],
    ['s3:http://k:s@host/bucket', /credentials never go in the URL/],
    ['s3:http://host/bucket?versionId=1', /no query or fragment/],
    ['', /empty --repo/],
  ];
  for (const [spec, why] of refused) {
    assert.throws(() => parseRepoLocation(spec), (err: Error & { code?: string }) => {
      assert.equal(err.code, 'EINVAL', spec);
      assert.match(err.message, why, spec);
      assert.doesNotMatch(err.message, /k:s@/, 'a password in the URL is not repeated');
      return true;
    }, spec);
  }
});
