/**
 * NBD over TLS: `bdsnap serve` as a real process, against real GnuTLS clients (nbdinfo,
 * nbdcopy, qemu-img, libnbd's Python binding) with x509 certificates made by openssl in the
 * test's directory and a PSK file written as psktool writes it, plus raw exchanges for what the
 * clients never do (STARTTLS twice, data sent behind STARTTLS).
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, execFileSync, spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import { promisify } from 'node:util';
import * as C from '../../src/nbd/constants.js';
import { tempDir, type TestContext } from '../nbd/helpers.js';
import { needs } from '../../testkit/needs.js';
import { BDSNAP_MAIN as MAIN } from '../../testkit/bdsnap-cli.js';
import { makeImage } from '../../testkit/files.js';
import { RawNbdClient } from '../helpers/raw-nbd.js';
import { startDaemon } from '../../testkit/daemon.js';
import { makePki, writePsk } from '../../testkit/tls.js';

const execFileAsync = promisify(execFile);
const CLIENT_TIMEOUT_MS = 20_000;
const IMAGE_BYTES = 4 * 1024 * 1024;

interface Serve {
  child: ChildProcess;
  stderr: () => string;
  exited: Promise<number | null>;
  port: number;
  socket: string;
  /** The image served (each server has its own: an image is served by one process at a time). */
  image: string;
}

/** `bdsnap serve` of a new image on a unix socket and a free loopback port, ready once it says "serving". */
async function serve(t: TestContext, dir: string, args: string[], listen = true): Promise<Serve> {
  const name = crypto.randomBytes(3).toString('hex');
  const socket = path.join(dir, `nbd-${name}.sock`);
  const image = path.join(dir, `disk-${name}.img`);
  makeImage(image, IMAGE_BYTES, 0);
  const tcp = listen ? ['--listen', '127.0.0.1:0'] : [];
  const child = spawn(process.execPath, [MAIN, 'serve', '--socket', socket, ...tcp, ...args, image], {
    cwd: dir, stdio: ['ignore', 'ignore', 'pipe'],
  });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  t.after(() => {
    if (child.exitCode === null) child.kill('SIGKILL');
  });
  const deadline = Date.now() + 10_000;
  let m: RegExpExecArray | null;
  while (!(m = /serving 1 export on [^\n]*?(?:tcp:127\.0\.0\.1:(\d+))?\n/.exec(err))) {
    if (child.exitCode !== null) throw new Error(`serve exited early: ${err}`);
    if (Date.now() > deadline) throw new Error(`serve not ready: ${err}`);
    await new Promise((res) => setTimeout(res, 20));
  }
  return { child, stderr: () => err, exited, port: Number(m[1] ?? 0), socket, image };
}

/** Run `bdsnap serve` expecting it to refuse: its exit code and stderr. */
async function serveRefused(dir: string, args: string[]): Promise<{ code: number | null; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [MAIN, 'serve', ...args, 'disk.img'], { cwd: dir, timeout: 10_000 }, (error, _stdout, stderr) => {
      resolve({ code: error ? (error as { code?: number }).code ?? null : 0, stderr });
    });
  });
}

/** nbdinfo's output (resolves) or its failure (rejects with stderr in the message). */
async function nbdinfo(uri: string): Promise<string> {
  try {
    const { stdout } = await execFileAsync('nbdinfo', [uri], { timeout: CLIENT_TIMEOUT_MS });
    return stdout;
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new Error(e.stderr || e.message);
  }
}

/**
 * libnbd's Python binding connecting with `tls` (DISABLE, ALLOW or REQUIRE): prints whether TLS
 * was negotiated, or the error.
 */
async function pythonLibnbd(port: number, tlsMode: string, setup: string): Promise<string> {
  const script = [
    'import nbd, sys',
    'h = nbd.NBD()',
    `h.set_tls(nbd.TLS_${tlsMode})`,
    setup,
    'try:',
    `    h.connect_tcp("127.0.0.1", "${port}")`,
    '    assert h.get_size() == ' + String(IMAGE_BYTES),
    '    print("tls" if h.get_tls_negotiated() else "plain")',
    'except nbd.Error as e:',
    '    print("refused:", e.string)',
  ].join('\n');
  const { stdout } = await execFileAsync('/usr/bin/python3', ['-c', script], { timeout: CLIENT_TIMEOUT_MS });
  return stdout.trim();
}

function pythonWorks(): boolean {
  try {
    execFileSync('/usr/bin/python3', ['-c', 'import nbd'], { stdio: 'ignore', timeout: CLIENT_TIMEOUT_MS });
    return true;
  } catch {
    return false;
  }
}

function setupDir(t: TestContext): string {
  const dir = tempDir(t, 'bdsnap-tls-');
  makeImage(path.join(dir, 'disk.img'), IMAGE_BYTES, 0);
  return dir;
}

test('TLS with certificates, required: nbdinfo, nbdcopy and qemu-img get TLS; plaintext and an untrusting client are refused', async (t) => {
  if (!needs(t, { tools: ['openssl', 'nbdinfo', 'nbdcopy', 'qemu-img'] })) return;
  const dir = setupDir(t);
  const pki = makePki(dir);
  const s = await serve(t, dir, ['--tls-certificates', pki.server]);
  assert.match(s.stderr(), /TLS required: x509 certificates in /);
  assert.doesNotMatch(s.stderr(), /WARNING/);
  const uri = `nbds://127.0.0.1:${s.port}/?tls-certificates=${pki.trusting}`;
  assert.match(await nbdinfo(uri), /newstyle-fixed with TLS/);

  // A full copy in and out over TLS (nbdcopy uses several connections and requests in flight).
  const source = path.join(dir, 'source.img');
  fs.writeFileSync(source, crypto.randomBytes(IMAGE_BYTES));
  await execFileAsync('nbdcopy', [source, uri], { timeout: CLIENT_TIMEOUT_MS });
  const back = path.join(dir, 'back.img');
  await execFileAsync('nbdcopy', [uri, back], { timeout: CLIENT_TIMEOUT_MS });
  assert.ok(fs.readFileSync(back).equals(fs.readFileSync(source)));
  assert.ok(fs.readFileSync(s.image).equals(fs.readFileSync(source)));

  const { stdout: qemu } = await execFileAsync('qemu-img', ['info', '--output=json',
    '--object', `tls-creds-x509,id=tls0,endpoint=client,dir=${pki.trusting}`,
    '--image-opts', `driver=nbd,host=127.0.0.1,port=${s.port},tls-creds=tls0`], { timeout: CLIENT_TIMEOUT_MS });
  assert.equal((JSON.parse(qemu) as { 'virtual-size': number })['virtual-size'], IMAGE_BYTES);

  await assert.rejects(nbdinfo(`nbd://127.0.0.1:${s.port}/`), /opt_go|TLS/i, 'a plaintext client is refused');
  await assert.rejects(nbdinfo(`nbds://127.0.0.1:${s.port}/?tls-certificates=${pki.untrusting}`), /certificate|verif|handshake/i,
    'a client that does not trust the server certificate refuses it');
  assert.equal(s.child.exitCode, null);
});

test('TLS required: before STARTTLS every option gets NBD_REP_ERR_TLS_REQD and NBD_OPT_EXPORT_NAME closes', async (t) => {
  if (!needs(t, { tools: ['openssl'] })) return;
  const dir = setupDir(t);
  const pki = makePki(dir);
  const s = await serve(t, dir, ['--tls-certificates', pki.server]);
  const raw = await RawNbdClient.connect(s.socket);
  t.after(() => raw.destroy());
  for (const option of [C.NBD_OPT_LIST, C.NBD_OPT_STRUCTURED_REPLY]) {
    raw.sendOption(option);
    const reply = await raw.readOptionReply();
    assert.equal(reply.type, C.NBD_REP_ERR_TLS_REQD, `option ${option}`);
  }
  assert.equal((await raw.go('')).type, C.NBD_REP_ERR_TLS_REQD);
  raw.sendOption(C.NBD_OPT_EXPORT_NAME, Buffer.alloc(0));
  assert.equal(await raw.waitForEnd(), true, "EXPORT_NAME before TLS closes the connection");
});

/** A plaintext handshake by hand on the unix socket, up to the reply of one STARTTLS. */
class StartTlsClient {
  readonly socket: net.Socket;
  #buffered = Buffer.alloc(0);
  #waiter: (() => void) | undefined;
  #closed = false;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.on('data', (d: Buffer) => this.#push(d));
    socket.on('close', () => {
      this.#closed = true;
      this.#waiter?.();
    });
  }

  static async connect(socketPath: string): Promise<StartTlsClient> {
    const socket = net.createConnection(socketPath);
    await new Promise((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    const c = new StartTlsClient(socket);
    await c.read(18);
    socket.write(Buffer.from([0, 0, 0, C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES]));
    return c;
  }

  #push(d: Buffer): void {
    this.#buffered = Buffer.concat([this.#buffered, d]);
    this.#waiter?.();
  }

  /** `n` bytes, or undefined if the server closed first. */
  async read(n: number, timeoutMs = CLIENT_TIMEOUT_MS): Promise<Buffer | undefined> {
    const deadline = Date.now() + timeoutMs;
    while (this.#buffered.length < n) {
      if (this.#closed) return undefined;
      if (Date.now() > deadline) throw new Error('no reply');
      await new Promise<void>((resolve) => {
        this.#waiter = resolve;
        setTimeout(resolve, 100);
      });
    }
    const out = this.#buffered.subarray(0, n);
    this.#buffered = this.#buffered.subarray(n);
    return out;
  }

  /** Switch to reading from `stream` (a TLS socket over ours). */
  follow(stream: tls.TLSSocket): void {
    stream.on('data', (d: Buffer) => this.#push(d));
    stream.on('close', () => {
      this.#closed = true;
      this.#waiter?.();
    });
  }
}

function option(type: number, extra: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.alloc(16);
  header.writeBigUInt64BE(C.IHAVEOPT, 0);
  header.writeUInt32BE(type, 8);
  header.writeUInt32BE(0, 12);
  return Buffer.concat([header, extra]);
}

async function replyType(c: StartTlsClient, timeoutMs?: number): Promise<number | undefined> {
  const header = await c.read(20, timeoutMs);
  if (header === undefined) return undefined;
  const rest = await c.read(header.readUInt32BE(16));
  if (rest === undefined) return undefined;
  return header.readUInt32BE(12);
}

test('STARTTLS: twice is NBD_REP_ERR_INVALID over TLS; bytes sent behind it close the connection; with TLS off it is NBD_REP_ERR_POLICY', async (t) => {
  if (!needs(t, { tools: ['openssl'] })) return;
  const dir = setupDir(t);
  const pki = makePki(dir);
  const s = await serve(t, dir, ['--tls-certificates', pki.server]);

  const c = await StartTlsClient.connect(s.socket);
  t.after(() => c.socket.destroy());
  c.socket.write(option(C.NBD_OPT_STARTTLS));
  assert.equal(await replyType(c), C.NBD_REP_ACK);
  const secure = tls.connect({ socket: c.socket, ca: fs.readFileSync(path.join(pki.trusting, 'ca-cert.pem')), servername: 'localhost' });
  await new Promise((resolve, reject) => secure.once('secureConnect', resolve).once('error', reject));
  c.follow(secure);
  secure.write(option(C.NBD_OPT_STARTTLS));
  assert.equal(await replyType(c), C.NBD_REP_ERR_INVALID);
  secure.write(option(C.NBD_OPT_LIST));
  assert.equal(await replyType(c), C.NBD_REP_SERVER, 'options go on over TLS');
  secure.destroy();

  // A client that pushes plaintext behind STARTTLS, before the reply, is cut off at once: well
  // before the handshake deadline (10 s), which would close it anyway.
  const eager = await StartTlsClient.connect(s.socket);
  t.after(() => eager.socket.destroy());
  eager.socket.write(Buffer.concat([option(C.NBD_OPT_STARTTLS), option(C.NBD_OPT_LIST)]));
  assert.equal(await replyType(eager, 5000), undefined);

  // Without TLS, STARTTLS is refused by policy and the client may go on in plaintext.
  const plain = await serve(t, dir, [], false);
  const p = await StartTlsClient.connect(plain.socket);
  t.after(() => p.socket.destroy());
  p.socket.write(option(C.NBD_OPT_STARTTLS));
  assert.equal(await replyType(p), C.NBD_REP_ERR_POLICY);
  p.socket.write(option(C.NBD_OPT_LIST));
  assert.equal(await replyType(p), C.NBD_REP_SERVER);
});

test('TLS with a PSK: nbdinfo and qemu-img connect as alice; a wrong key or an unknown user is refused', async (t) => {
  if (!needs(t, { tools: ['nbdinfo', 'qemu-img'] })) return;
  const dir = setupDir(t);
  const psk = path.join(dir, 'keys.psk');
  const key = crypto.randomBytes(32).toString('hex');
  writePsk(psk, { alice: key, bob: crypto.randomBytes(32).toString('hex') });
  const s = await serve(t, dir, ['--tls-psk', psk]);
  assert.match(s.stderr(), /TLS required: PSK from .*2 identities/);
  assert.match(await nbdinfo(`nbds://alice@127.0.0.1:${s.port}/?tls-psk-file=${psk}`), /newstyle-fixed with TLS/);

  const qemuDir = path.join(dir, 'qemu-psk');
  fs.mkdirSync(qemuDir);
  writePsk(path.join(qemuDir, 'keys.psk'), { alice: key });
  const { stdout: qemu } = await execFileAsync('qemu-img', ['info', '--output=json',
    '--object', `tls-creds-psk,id=tls0,endpoint=client,dir=${qemuDir},username=alice`,
    '--image-opts', `driver=nbd,host=127.0.0.1,port=${s.port},tls-creds=tls0`], { timeout: CLIENT_TIMEOUT_MS });
  assert.equal((JSON.parse(qemu) as { 'virtual-size': number })['virtual-size'], IMAGE_BYTES);

  const wrong = path.join(dir, 'wrong.psk');
  writePsk(wrong, { alice: crypto.randomBytes(32).toString('hex') });
  await assert.rejects(nbdinfo(`nbds://alice@127.0.0.1:${s.port}/?tls-psk-file=${wrong}`), /handshake|alert|TLS/i);
  const stranger = path.join(dir, 'stranger.psk');
  writePsk(stranger, { mallory: key });
  await assert.rejects(nbdinfo(`nbds://mallory@127.0.0.1:${s.port}/?tls-psk-file=${stranger}`), /handshake|alert|TLS/i);
  await assert.rejects(nbdinfo(`nbd://127.0.0.1:${s.port}/`), /opt_go|TLS/i);
  assert.equal(s.child.exitCode, null);
});

test('--tls-verify-peer: a client certificate signed by the CA is demanded', async (t) => {
  if (!needs(t, { tools: ['openssl', 'nbdinfo'] })) return;
  const dir = setupDir(t);
  const pki = makePki(dir);
  const s = await serve(t, dir, ['--tls-certificates', pki.server, '--tls-verify-peer']);
  assert.match(await nbdinfo(`nbds://127.0.0.1:${s.port}/?tls-certificates=${pki.client}`), /newstyle-fixed with TLS/);
  await assert.rejects(nbdinfo(`nbds://127.0.0.1:${s.port}/?tls-certificates=${pki.trusting}`), /.+/, 'no client certificate');
  await assert.rejects(nbdinfo(`nbds://127.0.0.1:${s.port}/?tls-certificates=${pki.rogueClient}`), /.+/, 'a certificate of another CA');
  assert.equal(s.child.exitCode, null);
});

test('--tls-verify-peer trusts only a CA file no other user can change: a CA of theirs would let their own client certificates in', async (t) => {
  if (!needs(t, { root: true, tools: ['openssl', 'nbdinfo'] })) return;
  const dir = setupDir(t);
  const pki = makePki(dir);
  const rogueCa = path.join(dir, 'pki', 'rogue-cert.pem');
  // Their ca-cert.pem, holding their CA, which signed the client certificate they hold.
  const theirs = path.join(dir, 'their-ca');
  fs.cpSync(pki.server, theirs, { recursive: true });
  fs.copyFileSync(rogueCa, path.join(theirs, 'ca-cert.pem'));
  fs.chownSync(path.join(theirs, 'ca-cert.pem'), 65534, 65534);
  const started = await serve(t, dir, ['--tls-certificates', theirs, '--tls-verify-peer']).catch((err: unknown) => err as Error);
  if (!(started instanceof Error)) {
    const letIn = await nbdinfo(`nbds://127.0.0.1:${started.port}/?tls-certificates=${pki.rogueClient}&tls-verify-peer=false`).then(() => true, () => false);
    assert.fail(`served with their CA${letIn ? ', and their client certificate was let in' : ''}`);
  }
  assert.match(started.message, /exited early: bdsnap: .*their-ca\/ca-cert\.pem is owned by uid 65534, who could change it/);
  // Root's, but writable by everyone.
  const open = path.join(dir, 'open-ca');
  fs.cpSync(pki.server, open, { recursive: true });
  fs.chmodSync(path.join(open, 'ca-cert.pem'), 0o666);
  const openStarted = await serveRefused(dir, ['--socket', path.join(dir, 'open.sock'), '--listen', '127.0.0.1:0', '--tls-certificates', open, '--tls-verify-peer']);
  assert.equal(openStarted.code, 1, openStarted.stderr);
  assert.match(openStarted.stderr, /open-ca\/ca-cert\.pem can be written by other users \(mode 666\), who could choose whom it trusts/);
  // Without --tls-verify-peer the CA decides nothing, and is not held to this.
  const s = await serve(t, dir, ['--tls-certificates', open]);
  assert.match(await nbdinfo(`nbds://127.0.0.1:${s.port}/?tls-certificates=${pki.trusting}`), /newstyle-fixed with TLS/);
});

test('libnbd (Python) with TLS disabled, allowed and required, against servers with TLS off, on and required', async (t) => {
  if (!needs(t, { tools: ['openssl'] })) return;
  if (!pythonWorks()) {
    assert.ok(!process.env.CI, 'libnbd Python binding (python3-libnbd) is missing');
    t.skip('needs python3-libnbd');
    return;
  }
  const dir = setupDir(t);
  const pki = makePki(dir);
  const certs = `h.set_tls_certificates("${pki.trusting}")`;
  const results = async (port: number): Promise<string[]> => [
    await pythonLibnbd(port, 'DISABLE', ''),
    await pythonLibnbd(port, 'ALLOW', certs),
    await pythonLibnbd(port, 'REQUIRE', certs),
  ];

  const required = await serve(t, dir, ['--tls-certificates', pki.server]);
  const [disabled, allowed, demanded] = await results(required.port);
  assert.match(disabled!, /^refused/);
  assert.equal(allowed, 'tls');
  assert.equal(demanded, 'tls');

  const optional = await serve(t, dir, ['--tls', 'on', '--tls-certificates', pki.server, '--insecure-tcp']);
  assert.match(optional.stderr(), /WARNING: plain TCP .*TLS optional/);
  assert.deepEqual(await results(optional.port), ['plain', 'tls', 'tls']);

  const off = await serve(t, dir, ['--insecure-tcp']);
  const [offDisabled, offAllowed, offDemanded] = await results(off.port);
  assert.equal(offDisabled, 'plain');
  assert.equal(offAllowed, 'plain');
  assert.match(offDemanded!, /^refused/);
});

test('bdsnap serve checks its TLS settings and files before serving, each fault in one line', async (t) => {
  if (!needs(t, { tools: ['openssl'] })) return;
  const dir = setupDir(t);
  const pki = makePki(dir);
  const refused = async (args: string[], pattern: RegExp): Promise<void> => {
    const r = await serveRefused(dir, ['--socket', path.join(dir, 'x.sock'), ...args]);
    assert.equal(r.code, 1, `${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, pattern);
    assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  };
  await refused(['--listen', '0', '--tls', 'on', '--tls-certificates', pki.server], /refusing plain TCP .*--tls on a client may skip TLS/);
  await refused(['--tls', 'require'], /--tls require needs --tls-certificates DIR or --tls-psk FILE/);
  await refused(['--tls', 'maybe'], /bad --tls "maybe"/);
  await refused(['--tls-verify-peer', '--tls-psk', path.join(dir, 'none.psk')], /--tls-verify-peer needs --tls-certificates/);
  await refused(['--tls-certificates', pki.trusting], /server-cert\.pem does not exist/);

  const missingCa = path.join(dir, 'no-ca');
  fs.cpSync(pki.server, missingCa, { recursive: true });
  fs.rmSync(path.join(missingCa, 'ca-cert.pem'));
  await refused(['--tls-certificates', missingCa, '--tls-verify-peer'], /ca-cert\.pem does not exist/);

  const openKey = path.join(dir, 'open-key');
  fs.cpSync(pki.server, openKey, { recursive: true });
  fs.chmodSync(path.join(openKey, 'server-key.pem'), 0o644);
  await refused(['--tls-certificates', openKey], /server-key\.pem is open to other users \(mode 644\).*chmod 600/);

  const badKey = path.join(dir, 'bad-key');
  fs.cpSync(pki.server, badKey, { recursive: true });
  fs.writeFileSync(path.join(badKey, 'server-key.pem'), 'not a key\n', { mode: 0o600 });
  await refused(['--tls-certificates', badKey], /server-key\.pem is not a usable private key/);

  const otherKey = path.join(dir, 'other-key');
  fs.cpSync(pki.server, otherKey, { recursive: true });
  fs.copyFileSync(path.join(pki.client, 'client-key.pem'), path.join(otherKey, 'server-key.pem'));
  await refused(['--tls-certificates', otherKey], /cannot be used \(does server-key\.pem belong to server-cert\.pem\?\)/);

  const psk = path.join(dir, 'bad.psk');
  fs.writeFileSync(psk, `alice:${'ab'.repeat(16)}\n\nbob:xyz\n`, { mode: 0o600 });
  await refused(['--tls-psk', psk], /bad\.psk line 3: the key of "bob" is not an even number of hex digits/);
  fs.writeFileSync(psk, 'just-a-name\n', { mode: 0o600 });
  await refused(['--tls-psk', psk], /bad\.psk line 1: expected username:hexkey/);
  fs.writeFileSync(psk, `alice:${'ab'.repeat(16)}\n`, { mode: 0o640 });
  fs.chmodSync(psk, 0o640);
  await refused(['--tls-psk', psk], /bad\.psk is open to other users \(mode 640\)/);
  await refused(['--tls-psk', path.join(dir, 'none.psk')], /none\.psk does not exist/);
  await refused(['--tls-psk', psk, '--tls-certificates', pki.server], /exclude each other/);
});

test('bdsnap daemon --listen with a PSK serves registered devices over TLS only; its unix socket stays plaintext', async (t) => {
  if (!needs(t, { tools: ['nbdinfo'] })) return;
  const dir = setupDir(t);
  const image = path.join(dir, 'disk.img');
  const psk = path.join(dir, 'keys.psk');
  writePsk(psk, { alice: crypto.randomBytes(32).toString('hex') });

  const refused = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
    execFile(process.execPath, [MAIN, 'daemon', '--run-dir', path.join(dir, 'run0'), '--state-dir', path.join(dir, 'state0'),
      '--snapshot-root', path.join(dir, 'snap0'), '--listen', '127.0.0.1:0'], { timeout: 10_000 }, (error, _stdout, stderr) => {
      resolve({ code: error ? (error as { code?: number }).code ?? null : 0, stderr });
    });
  });
  assert.equal(refused.code, 1);
  assert.match(refused.stderr, /refusing plain TCP on 127\.0\.0\.1:0: without TLS .*every registered device/);

  const daemon = await startDaemon(t, { activate: [image], logLevel: 'info', extraArgs: ['--listen', '127.0.0.1:0', '--tls-psk', psk] });
  const listening = daemon.logLines().find((l) => l.event === 'nbd-listening');
  assert.equal(listening?.tls, 'require');
  const port = Number(listening.port);
  const exportName = fs.realpathSync(image);
  assert.match(await nbdinfo(`nbds://alice@127.0.0.1:${port}/${exportName}?tls-psk-file=${psk}`), /newstyle-fixed with TLS/);
  await assert.rejects(nbdinfo(`nbd://127.0.0.1:${port}/${exportName}`), /opt_go|TLS/i);
  assert.match(await nbdinfo(`nbd+unix:///${exportName}?socket=${path.join(daemon.runDir, 'nbd.sock')}`), /without TLS/);
});
