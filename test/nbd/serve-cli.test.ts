/** `bdsnap serve` as a real process, probed by real NBD clients (nbdinfo, nbdsh) and by NbdClient. */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, execFileSync, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { NbdClient } from '../../src/nbd/client.js';
import { tempDir, type TestContext } from './helpers.js';
import { needs } from '../../testkit/needs.js';
import { BDSNAP_MAIN as MAIN } from '../../testkit/bdsnap-cli.js';
import { makeImage } from '../../testkit/files.js';
import { startServer } from '../../testkit/server.js';

const execFileAsync = promisify(execFile);

interface Running {
  child: ChildProcess;
  stderr: () => string;
  exited: Promise<number | null>;
}

function startServe(t: TestContext, args: string[], cwd: string, env: NodeJS.ProcessEnv = process.env): Running {
  const child = spawn(process.execPath, [MAIN, 'serve', ...args], { cwd, stdio: ['ignore', 'pipe', 'pipe'], env });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  t.after(() => {
    if (child.exitCode === null) child.kill('SIGKILL');
  });
  return { child, stderr: () => err, exited };
}

async function waitReady(r: Running, timeoutMs = 10000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  while (!/serving/.test(r.stderr())) {
    if (r.child.exitCode !== null) throw new Error(`serve exited early: ${r.stderr()}`);
    if (Date.now() > deadline) throw new Error(`serve not ready: ${r.stderr()}`);
    await new Promise((res) => setTimeout(res, 20));
  }
  return r.stderr();
}

test('bdsnap serve: nbdinfo --json sees the export under its real path; SIGTERM exits 0', async (t) => {
  if (!needs(t, { tools: ['nbdinfo', 'nbdsh'] })) return;
  const dir = tempDir(t, 'bdsnap-serve-');
  const image = path.join(dir, 'disk.img');
  makeImage(image, 3 * 1024 * 1024, 0);
  const sock = path.join(dir, 'nbd.sock');
  const r = startServe(t, ['--socket', sock, 'disk.img'], dir);
  const line = await waitReady(r);
  assert.match(line, new RegExp(`^bdsnap: serving 1 export on unix:${sock}\\n$`));
  const { stdout } = await execFileAsync('nbdinfo', ['--json', `nbd+unix:///?socket=${sock}`]);
  const info = JSON.parse(stdout) as { protocol: string; structured: boolean; exports: Array<Record<string, unknown>> };
  assert.equal(info.protocol, 'newstyle-fixed');
  assert.equal(info.structured, true);
  const e = info.exports[0]!;
  assert.equal(e['export-name'], fs.realpathSync(image));
  assert.equal(e['export-size'], 3 * 1024 * 1024);
  assert.equal(e['is_read_only'], false);
  assert.equal(e['can_multi_conn'], true);
  assert.deepEqual(e['contexts'], ['base:allocation']);
  assert.equal(e['block_size_minimum'], 512);

  // nbdsh (the system python has its bindings) writes through the export by name; the bytes land in the file.
  const script = `h.pwrite(b"bdsnap!!" * 64, 4096); h.flush(); print(h.pread(512, 4096) == b"bdsnap!!" * 64)`;
  const { stdout: ok } = await execFileAsync('nbdsh', ['-u', `nbd+unix:///${fs.realpathSync(image)}?socket=${sock}`, '-c', script], {
    env: { ...process.env, PATH: `/usr/bin:${process.env.PATH ?? ''}` },
  });
  assert.equal(ok.trim(), 'True');
  assert.equal(fs.readFileSync(image).toString('latin1', 4096, 4096 + 16), 'bdsnap!!bdsnap!!');

  // A second server of the same image is refused with a clear message.
  const second = startServe(t, ['--socket', path.join(dir, 'other.sock'), image], dir);
  assert.equal(await second.exited, 1);
  assert.match(second.stderr(), /^bdsnap: .*is already open by process \d+: .*else stop that process$/m);

  r.child.kill('SIGTERM');
  assert.equal(await r.exited, 0);
  assert.equal(fs.existsSync(sock), false, 'the socket file is removed');
});

test('bdsnap serve --read-only --listen PORT --insecure-tcp, two images, empty name selects the first', async (t) => {
  const dir = tempDir(t, 'bdsnap-serve-');
  const a = path.join(dir, 'a.img');
  const b = path.join(dir, 'b.img');
  makeImage(a, 65536, 1);
  makeImage(b, 131072, 2);
  const r = startServe(t, ['--read-only', '--listen', '0', '--insecure-tcp', a, b], dir);
  const line = await waitReady(r);
  const m = /serving 2 exports on tcp:127\.0\.0\.1:(\d+)/.exec(line);
  assert.ok(m, line);
  const port = Number(m[1]);
  assert.match(line, new RegExp(`^bdsnap: WARNING: plain TCP on 127\\.0\\.0\\.1:${port}, .*every local user can connect and read the images$`, 'm'));
  const first = await NbdClient.connect({ host: '127.0.0.1', port });
  assert.equal(first.exportName, a);
  assert.equal(first.size, 65536);
  assert.ok(first.readOnly);
  await assert.rejects(first.write(Buffer.alloc(512), 0), (e: unknown) => (e as { code?: string }).code === 'EPERM');
  const second = await NbdClient.connect({ host: '127.0.0.1', port, exportName: b });
  const buf = Buffer.alloc(512);
  await second.read(buf, 0);
  assert.ok(buf.every((x) => x === 2));
  await first.close();
  await second.close();
  r.child.kill('SIGINT');
  assert.equal(await r.exited, 0);
  assert.ok(fs.readFileSync(a).every((x) => x === 1));
});

test('bdsnap serve --listen without --insecure-tcp is refused: anyone who can connect could read and write the image', async (t) => {
  const dir = tempDir(t, 'bdsnap-serve-');
  const image = path.join(dir, 'disk.img');
  makeImage(image, 65536, 1);
  for (const [listen, who] of [['0', /every local user/], ['0.0.0.0:0', /every host that can reach 0\.0\.0\.0 \(and every local user\)/]] as const) {
    const r = startServe(t, ['--listen', listen, image], dir);
    assert.equal(await r.exited, 1);
    const lines = r.stderr().trimEnd().split('\n');
    assert.equal(lines.length, 1, r.stderr());
    assert.match(lines[0]!, /^bdsnap: refusing plain TCP on .*without TLS .*give --tls-certificates DIR or --tls-psk FILE.*--insecure-tcp/);
    assert.match(lines[0]!, who);
  }
});

test('bdsnap serve --snapshot-root refuses a directory another user made or may write, as the daemon does; a new one is made private', async (t) => {
  if (!needs(t, { root: true, tools: ['runuser'] })) return;
  const dir = tempDir(t, 'bdsnap-serve-');
  fs.chmodSync(dir, 0o711);
  const image = path.join(dir, 'disk.img');
  makeImage(image, 65536, 1);
  const shared = path.join(dir, 'shared');
  fs.mkdirSync(shared);
  fs.chmodSync(shared, 0o1777);
  // Exited (with its code), or serving: a refused root must stop it before it serves.
  const outcome = async (root: string): Promise<{ code: number | null | 'serving'; stderr: string }> => {
    const r = startServe(t, ['--socket', path.join(dir, `${path.basename(root)}.sock`), '--snapshot-root', root, image], dir);
    const serving = (async () => {
      while (!/serving/.test(r.stderr()) && r.child.exitCode === null) await new Promise((res) => setTimeout(res, 20));
      return 'serving' as const;
    })();
    const code = await Promise.race([r.exited, serving]);
    if (code === 'serving') {
      r.child.kill('SIGTERM');
      await r.exited;
    }
    return { code, stderr: r.stderr() };
  };

  // Sessions there hold the image's original content, which a restore writes back.
  const theirs = path.join(shared, 'theirs');
  execFileSync('runuser', ['-u', 'nobody', '--', 'mkdir', '-m', '777', theirs]);
  const refused = await outcome(theirs);
  assert.equal(refused.code, 1, refused.stderr);
  assert.match(refused.stderr, /^bdsnap: --snapshot-root: .*theirs is owned by uid \d+, not by this user/);
  assert.deepEqual(fs.readdirSync(theirs), [], 'no session was made there');

  const open = path.join(shared, 'open');
  fs.mkdirSync(open, { mode: 0o755 });
  fs.chmodSync(open, 0o755);
  const openRefused = await outcome(open);
  assert.equal(openRefused.code, 1, openRefused.stderr);
  assert.match(openRefused.stderr, /^bdsnap: --snapshot-root: .*open is open to other users \(mode 755\)/);

  const fresh = path.join(shared, 'fresh');
  const served = await outcome(fresh);
  assert.equal(served.code, 'serving', served.stderr);
  assert.equal(fs.statSync(fresh).mode & 0o777, 0o700);
});

test('bdsnap serve: its unix socket is born private, and a link put in its place as it starts is not followed', { timeout: 60_000 }, async (t) => {
  if (!needs(t, { root: true, tools: ['runuser', 'strace'] })) return;
  const dir = tempDir(t, 'bdsnap-serve-');
  fs.chmodSync(dir, 0o711);
  const image = path.join(dir, 'disk.img');
  makeImage(image, 65536, 1);
  // A directory another user can write (as a careless --socket may name), and a root file there.
  const theirs = path.join(dir, 'theirs');
  fs.mkdirSync(theirs, { mode: 0o755 });
  execFileSync('chown', ['nobody', theirs]);
  const victim = path.join(dir, 'victim');
  fs.writeFileSync(victim, 'root\n');
  fs.chmodSync(victim, 0o4755);
  const socketPath = path.join(theirs, 'nbd.sock');
  // Each bind returns 2 s late: the window between the socket file appearing and what serve
  // does with it next, held open; under umask 0, as a root shell may have.
  const child = spawn('sh', ['-c', 'umask 000; exec strace -f -qq -o /dev/null -e trace=bind -e inject=bind:delay_exit=2000000 "$@"', 'sh',
    process.execPath, MAIN, 'serve', '--socket', socketPath, image], { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.once('close', (code) => resolve(code)));
  t.after(() => {
    if (child.exitCode === null) child.kill('SIGKILL');
  });
  let born: fs.Stats | undefined;
  for (const deadline = Date.now() + 30_000; born === undefined && Date.now() < deadline && child.exitCode === null;) {
    born = fs.lstatSync(socketPath, { throwIfNoEntry: false });
    if (born === undefined) await new Promise((res) => setTimeout(res, 10));
  }
  assert.ok(born?.isSocket(), `the socket appeared: ${stderr}`);
  assert.equal(born!.mode & 0o777, 0o600, 'nobody but its owner can connect, even in the first instant');
  execFileSync('runuser', ['-u', 'nobody', '--', 'sh', '-c', `mv ${socketPath} ${theirs}/moved.sock && ln -s ${victim} ${socketPath}`]);
  const code = await exited;
  assert.equal(fs.statSync(victim).mode & 0o7777, 0o4755, 'the file the link points at keeps its mode');
  assert.equal(code, 1, stderr);
  assert.match(stderr, /nbd\.sock was replaced by another file as the server started/);
});

test('bdsnap serve: bad arguments give one clear line and a non-zero exit', async (t) => {
  const dir = tempDir(t, 'bdsnap-serve-');
  const missing = startServe(t, ['--socket', path.join(dir, 's.sock'), path.join(dir, 'missing.img')], dir);
  assert.equal(await missing.exited, 1);
  assert.match(missing.stderr(), /^bdsnap: cannot open .*missing\.img/);
  fs.writeFileSync(path.join(dir, 'x.img'), Buffer.alloc(4096));
  const badListen = startServe(t, ['--listen', 'nowhere:99999', 'x.img'], dir);
  assert.equal(await badListen.exited, 1);
  assert.match(badListen.stderr(), /^bdsnap: bad --listen "nowhere:99999"/);
});

test('bdsnap serve: a unix-socket connection gets the larger send buffer, so a 1 MiB reply leaves in one write', { timeout: 30_000 }, async (t) => {
  if (!needs(t, { tools: ['ss'] })) return;
  const dir = tempDir(t);
  const image = path.join(dir, 'disk.img');
  makeImage(image, 4 << 20, 'blocks');
  const server = await startServer(t, { kind: 'bdsnap', images: [image] });
  const client = await NbdClient.connect({ socketPath: server.socketPath, exportName: fs.realpathSync(image) });
  t.after(() => client.close());
  await client.read(Buffer.alloc(1 << 20), 0);
  // The kernel doubles what setsockopt asks for, within net.core.wmem_max.
  const wmemMax = Number(fs.readFileSync('/proc/sys/net/core/wmem_max', 'utf8'));
  const expected = 2 * Math.min(4 << 20, wmemMax);
  const { stdout } = await promisify(execFile)('ss', ['-xmpH']);
  // One socket per line (some versions put skmem on an indented continuation line).
  const serverSockets = stdout.replace(/\n\s+/g, ' ').split('\n').filter((line) => line.includes(`pid=${server.pid},`) && /\bESTAB\b/.test(line));
  const sizes = serverSockets.map((line) => Number(/tb(\d+)/.exec(line)?.[1]));
  assert.ok(sizes.length >= 1, `no connected socket of the server (pid ${server.pid}) in ss -xmp:\n${stdout}`);
  assert.ok(sizes.includes(expected), `the server's connection has send buffers ${sizes.join(', ')}, expected ${expected}`);
});

/** Threads of a process (each worker thread is at least one). */
function threadCount(pid: number): number {
  return fs.readdirSync(`/proc/${pid}/task`).length;
}

test('bdsnap serve: plain images are served on worker threads; nbdcopy -C 4 into the image lands whole, and a second copy reads it back', { timeout: 60_000 }, async (t) => {
  if (!needs(t, { tools: ['nbdcopy'] })) return;
  const dir = tempDir(t, 'bdsnap-serve-threads-');
  const image = path.join(dir, 'disk.img');
  const source = path.join(dir, 'source.img');
  const back = path.join(dir, 'back.img');
  makeImage(image, 16 * 1024 * 1024, 'blocks');
  makeImage(source, 16 * 1024 * 1024, 'random');
  const threadsOf = async (count: string | undefined): Promise<{ r: Running; threads: number; sock: string }> => {
    const sock = path.join(dir, `nbd-${count ?? 'default'}.sock`);
    const env = { ...process.env, BDSNAP_NBD_THREADS: count };
    if (count === undefined) delete env.BDSNAP_NBD_THREADS;
    const r = startServe(t, ['--socket', sock, image], dir, env);
    await waitReady(r);
    return { r, threads: threadCount(r.child.pid!), sock };
  };
  const one = await threadsOf('1');
  one.r.child.kill('SIGTERM');
  assert.equal(await one.r.exited, 0);

  // By default, one per core (at most 4).
  const cores = Math.min(os.availableParallelism(), 4);
  const byDefault = await threadsOf(undefined);
  if (cores > 1) assert.ok(byDefault.threads >= one.threads + cores, `${cores} worker threads by default: ${byDefault.threads} threads against ${one.threads} with none`);
  byDefault.r.child.kill('SIGTERM');
  assert.equal(await byDefault.r.exited, 0, byDefault.r.stderr());

  const three = await threadsOf('3');
  assert.ok(three.threads >= one.threads + 3, `3 worker threads: ${three.threads} threads against ${one.threads} with none`);
  const uri = `nbd+unix:///?socket=${three.sock}`;
  await execFileAsync('nbdcopy', ['-C', '4', source, uri]);
  await execFileAsync('nbdcopy', ['-C', '4', uri, back]);
  assert.ok(fs.readFileSync(back).equals(fs.readFileSync(source)), 'what 4 connections wrote reads back through 4 connections');
  three.r.child.kill('SIGTERM');
  assert.equal(await three.r.exited, 0, three.r.stderr());
  assert.ok(fs.readFileSync(image).equals(fs.readFileSync(source)), 'and it is in the file after the server stopped');
});

test('bdsnap serve: each serving thread warms up on a scratch image of its own in TMPDIR, gone before the first client; one that cannot warm up serves anyway', { timeout: 60_000 }, async (t) => {
  const dir = tempDir(t, 'bdsnap-serve-warm-');
  const image = makeImage(path.join(dir, 'disk.img'), 4 * 1024 * 1024, 'random');
  const content = fs.readFileSync(image);
  const tmp = path.join(dir, 'tmp');
  fs.mkdirSync(tmp);
  const serveWith = async (env: Record<string, string>, name: string): Promise<Running> => {
    const sock = path.join(dir, `${name}.sock`);
    const r = startServe(t, ['--socket', sock, image], dir, { ...process.env, BDSNAP_NBD_THREADS: '2', ...env });
    await waitReady(r);
    // The image is served as it is: nothing of the warm-up reached it.
    const client = await NbdClient.connect({ socketPath: sock, timeoutMs: 10_000 });
    const read = Buffer.alloc(content.length);
    await client.read(read, 0);
    await client.close();
    assert.ok(read.equals(content), 'the image reads back as it was made');
    r.child.kill('SIGTERM');
    assert.equal(await r.exited, 0, r.stderr());
    return r;
  };

  // Each thread that serves connections warms up: the two workers, or the main thread alone.
  for (const [threads, dirs] of [['2', 2], ['1', 1]] as const) {
    const made: string[] = [];
    const watcher = fs.watch(tmp, (_event, name) => {
      if (name !== null && !made.includes(name)) made.push(name);
    });
    t.after(() => watcher.close());
    const warmed = await serveWith({ TMPDIR: tmp, BDSNAP_NBD_THREADS: threads }, `warm-${threads}`);
    watcher.close();
    assert.equal(made.filter((n) => n.startsWith('bdsnap-warm-')).length, dirs, `BDSNAP_NBD_THREADS=${threads}: one scratch directory per serving thread: ${made.join(', ')}`);
    assert.deepEqual(fs.readdirSync(tmp), [], 'the scratch directories are gone');
    assert.doesNotMatch(warmed.stderr(), /warning/);
    assert.ok(fs.readFileSync(image).equals(content), 'the image is unchanged');
  }

  const cold = await serveWith({ TMPDIR: path.join(dir, 'missing') }, 'cold');
  assert.equal(cold.stderr().match(/^bdsnap: warning: a server thread could not warm up \(.*ENOENT.*\); it serves, slower for its first clients$/gm)?.length, 2, cold.stderr());

  const off = await serveWith({ TMPDIR: path.join(dir, 'missing'), BDSNAP_NBD_WARM_UP: '0' }, 'off');
  assert.doesNotMatch(off.stderr(), /warm up/, 'BDSNAP_NBD_WARM_UP=0: no warm-up tried');
});

test('bdsnap serve --snapshot-root refuses an image another process writes or a loop device holds (their writes would go around the sessions); plain serve still serves it', { timeout: 60_000 }, async (t) => {
  if (!needs(t, { root: true, tools: ['losetup'] })) return;
  const dir = tempDir(t, 'bdsnap-serve-writer-');
  const image = path.join(dir, 'disk.img');
  makeImage(image, 1 << 20, 1);
  // Its exit code, or null once it serves (then stopped).
  const exitOf = async (args: string[]): Promise<{ code: number | null; stderr: string }> => {
    const r = startServe(t, ['--socket', path.join(dir, 'x.sock'), ...args, image], dir);
    const served = await waitReady(r, 15_000).then(() => true, () => false);
    if (served) {
      r.child.kill('SIGTERM');
      await r.exited;
      return { code: null, stderr: r.stderr() };
    }
    return { code: await r.exited, stderr: r.stderr() };
  };
  const writer = spawn('sh', ['-c', 'exec 3<>"$1"; echo ready; exec sleep 60', 'sh', image], { stdio: ['ignore', 'pipe', 'ignore'] });
  t.after(() => void writer.kill('SIGKILL'));
  await new Promise((resolve) => writer.stdout!.once('data', resolve));
  const refused = await exitOf(['--snapshot-root', path.join(dir, 'root')]);
  assert.equal(refused.code, 1, refused.stderr);
  assert.match(refused.stderr, new RegExp(`^bdsnap: ${image} is open for writing by pid ${writer.pid} \\(sleep\\); stop that process first`, 'm'));
  const plain = await exitOf([]);
  assert.equal(plain.code, null, `plain serve serves it: ${plain.stderr}`);
  const gone = new Promise((resolve) => writer.once('exit', resolve));
  writer.kill('SIGKILL');
  await gone;

  const loop = execFileSync('losetup', ['-f', '--show', image], { encoding: 'utf8' }).trim();
  t.after(() => void execFileAsync('losetup', ['-d', loop]).catch(() => undefined));
  const behindLoop = await exitOf(['--snapshot-root', path.join(dir, 'root')]);
  assert.equal(behindLoop.code, 1, behindLoop.stderr);
  assert.match(behindLoop.stderr, new RegExp(`${image} is the backing file of ${loop}; detach it first`));
});
