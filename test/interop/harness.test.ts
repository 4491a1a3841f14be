/**
 * The test harness itself must fail loudly: a missing tool, a failing command and a server
 * that cannot start all end in an error that carries the evidence (output, stderr, status).
 * Also `bdsnap serve` given bad input: one clear line on stderr and a non-zero exit.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { CleanupStack } from '../../testkit/cleanup.js';
import { makeImage, makeTempDir, readRange, sha256, sha256File } from '../../testkit/files.js';
import { missingNeeds, needs } from '../../testkit/needs.js';
import { RunError, requireTool, run } from '../../testkit/process.js';
import { BDSNAP_MAIN, nbdUri, startServer } from '../../testkit/server.js';

test('the skip policy: a missing tool fails the test under CI and skips it elsewhere, with the reason', () => {
  assert.throws(() => requireTool('bdsnap-no-such-tool'), /required tool 'bdsnap-no-such-tool' is not installed/);
  assert.ok(requireTool('nbdinfo').endsWith('/nbdinfo'));
  const saved = process.env.CI;
  try {
    const skipped: string[] = [];
    const t = { skip: (message?: string) => skipped.push(message ?? '') };
    process.env.CI = 'true';
    assert.throws(() => needs(t, { tools: ['bdsnap-no-such-tool'] }), /needs the tool 'bdsnap-no-such-tool'.*under CI/);
    assert.throws(() => needs(t, { paths: ['/no/such/device'] }), /needs \/no\/such\/device/);
    assert.deepEqual(skipped, []);
    delete process.env.CI;
    assert.equal(needs(t, { tools: ['bdsnap-no-such-tool', 'nbdinfo'], paths: ['/'] }), false);
    assert.deepEqual(skipped, ["needs the tool 'bdsnap-no-such-tool'"]);
    assert.equal(needs(t, { tools: ['nbdinfo'] }), true);
    assert.deepEqual(missingNeeds({ root: true }), process.getuid?.() === 0 ? [] : ['root']);
  } finally {
    if (saved === undefined) delete process.env.CI;
    else process.env.CI = saved;
  }
});

test('run returns output and throws with stdout, stderr and status on failure', async () => {
  const ok = await run('sh', ['-c', 'echo out; echo err >&2']);
  assert.equal(ok.stdout, 'out\n');
  assert.equal(ok.stderr, 'err\n');
  assert.equal(ok.exitCode, 0);
  await assert.rejects(run('sh', ['-c', 'echo visible-out; echo visible-err >&2; exit 3']), (err: unknown) => {
    assert.ok(err instanceof RunError);
    assert.match(err.message, /exit 3/);
    assert.match(err.message, /visible-out/);
    assert.match(err.message, /visible-err/);
    assert.equal(err.result.exitCode, 3);
    return true;
  });
  await assert.rejects(run('sleep', ['5'], { timeoutMs: 200 }), /timed out after 200 ms/);
  assert.equal((await run('sh', ['-c', 'exit 4'], { allowFailure: true })).exitCode, 4);
  assert.equal((await run('cat', [], { input: 'piped' })).stdout, 'piped');
});

test('images have the promised pattern and sha256 sees every byte', async (t) => {
  const dir = makeTempDir(t);
  const image = path.join(dir, 'p.img');
  makeImage(image, 3 * 4096 + (1 << 20), 'blocks');
  assert.equal(readRange(image, 2 * 4096, 4).readUInt32LE(0), 2);
  assert.equal(readRange(image, 2 * 4096 + 4, 1)[0], 3);
  const digest = await sha256File(image);
  assert.equal(digest, sha256(fs.readFileSync(image)));
  const fd = fs.openSync(image, 'r+');
  fs.writeSync(fd, Buffer.from([0xff]), 0, 1, 5000);
  fs.closeSync(fd);
  assert.notEqual(await sha256File(image), digest);
  const a = path.join(dir, 'a.img');
  const b = path.join(dir, 'b.img');
  makeImage(a, 1 << 20, 'random', 1);
  makeImage(b, 1 << 20, 'random', 2);
  assert.notEqual(await sha256File(a), await sha256File(b));
  assert.throws(() => makeImage(path.join(dir, 'bad.img'), 1000), /multiple of 4096/);
});

test('nbdUri puts an absolute export name after the third slash and escapes it', () => {
  assert.equal(nbdUri('/run/x.sock'), 'nbd+unix:///?socket=%2Frun%2Fx.sock');
  assert.equal(nbdUri('/s', '/a b/c.img'), 'nbd+unix:////a%20b/c.img?socket=%2Fs');
});

test('a server that cannot start fails fast with its stderr in the message', async (t) => {
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup);
  const missing = path.join(dir, 'missing.img');
  await assert.rejects(startServer(cleanup, { images: [missing] }), (err: unknown) => {
    assert.match(String(err), /NBD server did not start/);
    assert.match(String(err), /missing\.img/, 'the server named the bad image');
    return true;
  });
});

test('bdsnap serve with bad input: one clear line on stderr, non-zero exit, no crash', async (t) => {
  const dir = makeTempDir(t);
  const image = path.join(dir, 'ok.img');
  makeImage(image, 1 << 20, 'blocks');
  const cases: { args: string[]; pattern: RegExp }[] = [
    { args: ['serve', '--socket', path.join(dir, 's1'), path.join(dir, 'nope.img')], pattern: /nope\.img/ },
    { args: ['serve', '--socket', path.join(dir, 's2'), dir], pattern: /./ },
    { args: ['serve', '--socket', path.join(dir, 's3'), image, image], pattern: /twice|already/ },
    { args: ['serve', '--listen', 'not-a-port', image], pattern: /listen/ },
    { args: ['serve', '--socket', path.join(dir, 'no-such-dir', 's4'), image], pattern: /./ },
    { args: ['serve'], pattern: /image/ },
  ];
  for (const { args, pattern } of cases) {
    const result = await run(process.execPath, [BDSNAP_MAIN, ...args], { allowFailure: true, timeoutMs: 15_000 });
    const shown = `${args.join(' ')}: exit ${result.exitCode}\n${result.stderr}`;
    assert.ok(result.exitCode !== null && result.exitCode !== 0, `fails: ${shown}`);
    assert.match(result.stderr, pattern, shown);
    assert.doesNotMatch(result.stderr, /\n\s+at .+:\d+:\d+/, `no stack trace: ${shown}`);
    assert.equal(result.stderr.trim().split('\n').length <= 2, true, `one clear line: ${shown}`);
  }
});
