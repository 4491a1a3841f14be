import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { tempDir } from './helpers.js';
import { BDSNAP_MAIN as MAIN } from '../../testkit/bdsnap-cli.js';
import { makeImage } from '../../testkit/files.js';
import { needs } from '../../testkit/needs.js';
import { cleanupOf } from '../../testkit/cleanup.js';


interface Run {
  status: number | null;
  stdout: string;
  stderr: string;
}

function bdsnap(args: string[], env: NodeJS.ProcessEnv = {}): Run {
  const r = spawnSync(process.execPath, [MAIN, ...args], { encoding: 'utf8', env: { ...process.env, ...env }, timeout: 30_000 });
  if (r.error) throw r.error;
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

function assertFails(r: Run, pattern: RegExp): void {
  assert.notEqual(r.status, 0, `expected failure, got stdout ${r.stdout}`);
  assert.match(r.stderr, pattern);
  assert.equal(r.stderr.trim().split('\n').length, 1, `one line on stderr, got: ${r.stderr}`);
}

test('sffs mkfs, write --image, cat --image and stat --image as real processes', (t) => {
  const dir = tempDir(t);
  const image = path.join(dir, 'image');

  const mk = bdsnap(['sffs', 'mkfs', image]);
  assert.equal(mk.status, 0, mk.stderr);
  assert.equal(fs.statSync(image).size, 409600);

  const cat0 = bdsnap(['sffs', 'cat', '--image', image]);
  assert.equal(cat0.status, 0, cat0.stderr);
  assert.equal(cat0.stdout, 'Wathever content you would like.\n');

  // Crosses from block 2 into block 3 after growing the file to 4093 bytes first.
  const fill = bdsnap(['sffs', 'write', '--image', image, '33', 'x'.repeat(4093 - 33)]);
  assert.equal(fill.status, 0, fill.stderr);
  const w = bdsnap(['sffs', 'write', '--image', '--json', image, '4093', 'crossing!']);
  assert.equal(w.status, 0, w.stderr);
  assert.deepEqual(JSON.parse(w.stdout), { offsetBytes: 4093, writtenBytes: 9, sizeBytes: 4102 });

  const cat1 = bdsnap(['sffs', 'cat', image, '--image']);
  assert.equal(cat1.stdout, `Wathever content you would like.\n${'x'.repeat(4060)}crossing!`);
  const bytes = fs.readFileSync(image);
  assert.equal(bytes.subarray(8192 + 4093, 8192 + 4102).toString(), 'crossing!');
  assert.equal(Number(bytes.readBigUInt64LE(4096 + 24)), 4102);

  const st = bdsnap(['sffs', 'stat', '--image', '--json', image]);
  assert.equal(st.status, 0, st.stderr);
  assert.deepEqual(JSON.parse(st.stdout), { sizeBytes: 4102, maxFileSizeBytes: 401408, deviceSizeBytes: 409600 });
  const stText = bdsnap(['sffs', 'stat', '--image', image]);
  assert.match(stText.stdout, /size 4102 bytes, max size 401408 bytes/);
});

test('sffs mkfs --blocks sets the image size', (t) => {
  const dir = tempDir(t);
  const image = path.join(dir, 'small');
  const r = bdsnap(['sffs', 'mkfs', '--blocks', '3', '--json', image]);
  assert.equal(r.status, 0, r.stderr);
  assert.deepEqual(JSON.parse(r.stdout), { image, sizeBytes: 12288, maxFileSizeBytes: 4096 });
  assert.equal(fs.statSync(image).size, 12288);
});

test('sffs errors are one clear line and a non-zero exit', (t) => {
  const dir = tempDir(t);
  const image = path.join(dir, 'image');
  assert.equal(bdsnap(['sffs', 'mkfs', '--blocks', '10', image]).status, 0);
  const untouched = fs.readFileSync(image);

  assertFails(bdsnap(['sffs', 'write', '--image', image, '100', 'hole']), /past the end of the file \(33 bytes\).*no holes/);
  assertFails(bdsnap(['sffs', 'write', '--image', image, '40000', 'x']), /past the max file size \(32768 bytes\)/);
  assertFails(bdsnap(['sffs', 'write', '--image', image, '-3', 'x']), /.+/);
  assertFails(bdsnap(['sffs', 'write', '--image', image, '1e3', 'x']), /offset must be a non-negative integer/);
  assert.deepEqual(fs.readFileSync(image), untouched, 'refused writes change nothing');

  assertFails(bdsnap(['sffs', 'mkfs', '--blocks', '2', path.join(dir, 'two')]), /at least 3/);
  assertFails(bdsnap(['sffs', 'mkfs', '--blocks', 'many', path.join(dir, 'two')]), /--blocks must be a non-negative integer/);

  const zeros = path.join(dir, 'zeros');
  makeImage(zeros, 40960, 0);
  assertFails(bdsnap(['sffs', 'cat', '--image', zeros]), /not a singlefilefs image/);
  assertFails(bdsnap(['sffs', 'cat', '--image', path.join(dir, 'missing')]), /cannot open|no such/i);

  const runDir = path.join(dir, 'run');
  fs.mkdirSync(runDir);
  assertFails(bdsnap(['sffs', 'cat', image], { BDSNAP_RUN_DIR: runDir }), new RegExp(`no daemon NBD socket at ${path.join(runDir, 'nbd.sock')}`));
  assertFails(bdsnap(['sffs', 'cat', '--run-dir', runDir, image]), /no daemon NBD socket/);
  assertFails(bdsnap(['sffs', 'cat', '--socket', path.join(dir, 'none.sock'), image]), /no NBD server socket/);
  assertFails(bdsnap(['sffs', 'cat', '--image', '--socket', path.join(dir, 'none.sock'), image]), /cannot be combined/);

  // Full file: a write that does not fit is reported as short, with what was written.
  const tiny = path.join(dir, 'tiny');
  assert.equal(bdsnap(['sffs', 'mkfs', '--blocks', '3', tiny]).status, 0);
  assertFails(bdsnap(['sffs', 'write', '--image', tiny, '4090', 'x'.repeat(1)]), /past the end of the file/);
  assert.equal(bdsnap(['sffs', 'write', '--image', tiny, '33', 'y'.repeat(4000)]).status, 0);
  assertFails(bdsnap(['sffs', 'write', '--image', tiny, '4033', 'z'.repeat(100)]), /only 63 of 100 bytes written/);
  assertFails(bdsnap(['sffs', 'write', '--image', tiny, '4096', 'z']), /only 0 of 1 bytes written/);
});

test('sffs mkfs run by root never formats through a name another user planted: a symlink to a file or a device, a file of theirs', (t) => {
  if (!needs(t, { root: true, tools: ['runuser', 'losetup'] })) return;
  const dir = tempDir(t);
  fs.chmodSync(dir, 0o755);
  const shared = path.join(dir, 'shared');
  fs.mkdirSync(shared);
  fs.chmodSync(shared, 0o1777);
  const asNobody = (...args: string[]): void => { execFileSync('runuser', ['-u', 'nobody', '--', ...args], { stdio: 'pipe' }); };

  // A symlink to a root-only file: the file was truncated and overwritten before the refusal.
  const secret = path.join(dir, 'root-only');
  fs.writeFileSync(secret, 'root only\n', { mode: 0o600 });
  const assertSecretKept = (): void => {
    const now = fs.readFileSync(secret);
    assert.ok(now.equals(Buffer.from('root only\n')), `the root-only file is untouched (it now has ${now.length} bytes)`);
  };
  const planted = path.join(shared, 'disk.img');
  asNobody('ln', '-s', secret, planted);
  const throughLink = bdsnap(['sffs', 'mkfs', planted]);
  assertSecretKept();
  assertFails(throughLink, /disk\.img leads to .*root-only through .*disk\.img, a link another user can replace \(.*belongs to uid \d+, who may rename it in .*shared\); give the real path/);

  // A symlink to a block device: its first three blocks were formatted.
  const backing = makeImage(path.join(dir, 'backing.img'), 64 * 4096, 0x5a);
  const loop = execFileSync('losetup', ['--find', '--show', backing], { encoding: 'utf8' }).trim();
  cleanupOf(t).after(() => execFileSync('losetup', ['-d', loop]));
  const toDevice = path.join(shared, 'dev.img');
  asNobody('ln', '-s', loop, toDevice);
  const throughDeviceLink = bdsnap(['sffs', 'mkfs', toDevice]);
  execFileSync('blockdev', ['--flushbufs', loop]);
  assert.ok(fs.readFileSync(backing).equals(Buffer.alloc(64 * 4096, 0x5a)), 'the device behind the link is untouched');
  assertFails(throughDeviceLink, /dev\.img leads to \/dev\/loop\d+ through .*, a link another user can replace/);

  // A file another user owns, or a second name of root's file: not overwritten.
  const theirs = path.join(shared, 'theirs.img');
  asNobody('sh', '-c', `echo theirs > ${theirs}`);
  const intoTheirs = bdsnap(['sffs', 'mkfs', theirs]);
  assert.equal(fs.statSync(theirs).size, 7, 'the other user\'s file is untouched');
  assertFails(intoTheirs, /belongs to uid \d+, not to this user/);
  const linked = path.join(shared, 'linked.img');
  fs.linkSync(secret, linked);
  assertFails(bdsnap(['sffs', 'mkfs', linked]), /has 2 names/);
  assertSecretKept();

  // A FIFO is refused at once, not waited on; a new name is made and formatted.
  const fifo = path.join(shared, 'fifo.img');
  execFileSync('mkfifo', [fifo]);
  assertFails(bdsnap(['sffs', 'mkfs', fifo]), /exists and is not a regular file/);
  const fresh = path.join(shared, 'fresh.img');
  const r = bdsnap(['sffs', 'mkfs', fresh]);
  assert.equal(r.status, 0, r.stderr);
  assert.equal(fs.statSync(fresh).size, 409600);
  assert.equal(bdsnap(['sffs', 'cat', '--image', fresh]).stdout, 'Wathever content you would like.\n');
});
