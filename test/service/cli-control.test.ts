/**
 * The control plane through the real CLI and a real daemon: passwords, activation messages,
 * root-only access (socket permission and the daemon's own peer check), and requests that
 * are malformed or oversized.
 */

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { test } from 'node:test';
import { AS_NOBODY, BDSNAP_MAIN, bdsnapForOtherUsers } from '../../testkit/bdsnap-cli.js';
import { TEST_PASSWORD, cli, ok, sandbox, startDaemon, type Sandbox } from '../../testkit/daemon.js';
import { makeImage } from '../../testkit/files.js';
import { needs } from '../../testkit/needs.js';

function status(box: Sandbox): { devices: Array<{ device: string; active: boolean }> } {
  return JSON.parse(ok(box, ['status', '--json'])) as { devices: Array<{ device: string; active: boolean }> };
}

test('passwd, activate and deactivate: right and wrong passwords, messages for no-op changes', async (t) => {
  const box = sandbox(t);
  await startDaemon(t, { sandbox: box, password: false });
  const image = makeImage(path.join(box.top, 'disk.img'), 1 << 20, 0);

  const noPassword = cli(box, ['activate', image, '--password-stdin'], `${TEST_PASSWORD}\n`);
  assert.notEqual(noPassword.status, 0);
  assert.match(noPassword.stderr, /no service password is set/);

  assert.equal(ok(box, ['passwd', '--password-stdin'], `${TEST_PASSWORD}\n`).trim(), 'service password set');
  const stored = fs.readFileSync(path.join(box.stateDir, 'password'), 'utf8');
  assert.ok(!stored.includes(TEST_PASSWORD), 'the password file must not hold the password');
  assert.equal(fs.statSync(path.join(box.stateDir, 'password')).mode & 0o777, 0o600);

  const started = Date.now();
  const wrong = cli(box, ['activate', image, '--password-stdin'], 'not the password\n');
  assert.equal(wrong.status, 1);
  assert.equal(wrong.stderr.trim(), 'bdsnap: wrong service password');
  assert.ok(Date.now() - started >= 200, 'a failed attempt is slowed down');
  assert.equal(status(box).devices.length, 0, 'a refused activation registers nothing');

  assert.match(ok(box, ['activate', image, '--password-stdin'], `${TEST_PASSWORD}\n`), /^activated /);
  assert.match(ok(box, ['activate', image, '--password-stdin'], `${TEST_PASSWORD}\n`), /is already active/);
  assert.deepEqual(status(box).devices.map((d) => [d.device, d.active]), [[fs.realpathSync(image), true]]);

  const wrongDeactivate = cli(box, ['deactivate', image, '--password-stdin'], 'nope nope nope\n');
  assert.equal(wrongDeactivate.status, 1);
  assert.equal(status(box).devices[0]?.active, true);
  assert.match(ok(box, ['deactivate', image, '--password-stdin'], `${TEST_PASSWORD}\n`), /^deactivated /);
  assert.match(ok(box, ['deactivate', image, '--password-stdin'], `${TEST_PASSWORD}\n`), /is not active/);

  // Changing the password needs the current one.
  const noCurrent = cli(box, ['passwd', '--password-stdin'], 'another password\n');
  assert.notEqual(noCurrent.status, 0);
  assert.match(noCurrent.stderr, /current one/);
  const badCurrent = cli(box, ['passwd', '--password-stdin'], 'wrong current\nanother password\n');
  assert.notEqual(badCurrent.status, 0);
  assert.equal(ok(box, ['passwd', '--password-stdin'], `${TEST_PASSWORD}\nanother password\n`).trim(), 'service password changed');
  assert.equal(cli(box, ['activate', image, '--password-stdin'], `${TEST_PASSWORD}\n`).status, 1);
  assert.equal(cli(box, ['activate', image, '--password-stdin'], 'another password\n').status, 0);
});

test('a device path must be a regular file or a block device', async (t) => {
  const box = sandbox(t);
  await startDaemon(t, { sandbox: box, password: false });
  ok(box, ['passwd', '--password-stdin'], `${TEST_PASSWORD}\n`);
  const dirRefused = cli(box, ['activate', box.top, '--password-stdin'], `${TEST_PASSWORD}\n`);
  assert.equal(dirRefused.status, 1);
  assert.match(dirRefused.stderr, /neither a regular image file nor a block device/);
  const missing = cli(box, ['activate', path.join(box.top, 'nope.img'), '--password-stdin'], `${TEST_PASSWORD}\n`);
  assert.equal(missing.status, 1);
  assert.match(missing.stderr, /no such device/);
  // A mount onto a missing mount point is refused before the device is registered.
  const other = makeImage(path.join(box.top, 'other.img'), 1 << 20, 0);
  const noMountpoint = cli(box, ['mount', other, path.join(box.top, 'no-such-dir')]);
  assert.equal(noMountpoint.status, 1);
  assert.match(noMountpoint.stderr, /mount point .* does not exist; create it first/);
  assert.deepEqual(status(box).devices, []);
  // A symlink is registered under its canonical target.
  const image = makeImage(path.join(box.top, 'real.img'), 1 << 20, 0);
  fs.symlinkSync(image, path.join(box.top, 'link.img'));
  ok(box, ['activate', path.join(box.top, 'link.img'), '--password-stdin'], `${TEST_PASSWORD}\n`);
  assert.deepEqual(status(box).devices.map((d) => d.device), [fs.realpathSync(image)]);
});

test('a non-root caller is refused even with the right password', async (t) => {
  if (!needs(t, { root: true, tools: ['setpriv'] })) return;
  const box = sandbox(t);
  const daemon = await startDaemon(t, { sandbox: box, password: false });
  ok(box, ['passwd', '--password-stdin'], `${TEST_PASSWORD}\n`);
  const image = makeImage(path.join(box.top, 'disk.img'), 1 << 20, 0);
  fs.chmodSync(image, 0o666);
  // nobody runs its own copy of the program: the checkout may sit in a private directory.
  const publicMain = bdsnapForOtherUsers(t);
  const probe = cli(box, ['--help'], '', AS_NOBODY, publicMain);
  assert.equal(probe.status, 0, `nobody must be able to load the program: ${probe.stderr}`);

  // First line: the socket's permissions keep nobody out before the daemon sees anything.
  assert.equal(fs.statSync(box.runDir).mode & 0o777, 0o700);
  assert.equal(fs.statSync(path.join(box.runDir, 'control.sock')).mode & 0o777, 0o600);
  const asNobody = cli(box, ['activate', image, '--password-stdin'], `${TEST_PASSWORD}\n`, AS_NOBODY, publicMain);
  assert.equal(asNobody.status, 1, asNobody.stderr);
  assert.match(asNobody.stderr, /permission denied.*need root/);
  assert.equal(status(box).devices.length, 0);

  // Open the socket's permissions: the daemon's own check (the kernel's SO_PEERCRED) refuses.
  fs.chmodSync(box.runDir, 0o755);
  fs.chmodSync(path.join(box.runDir, 'control.sock'), 0o666);
  const viaCli = cli(box, ['activate', image, '--password-stdin'], `${TEST_PASSWORD}\n`, AS_NOBODY, publicMain);
  assert.equal(viaCli.status, 1, viaCli.stderr);
  assert.match(viaCli.stderr, /permission denied: bdsnap control operations need root/);
  // The log line may reach us a moment later (pino writes asynchronously).
  const named = (): boolean => daemon.logLines().some((l) => l.event === 'control-refused' && l.euid === 65534 && typeof l.peerPid === 'number' && l.peerPid > 0);
  for (let i = 0; i < 100 && !named(); i++) await new Promise((r) => setTimeout(r, 20));
  assert.ok(named(), `the daemon names the caller: ${JSON.stringify(daemon.logLines())}`);

  // Speaking the protocol by hand changes nothing: a request has no uid to claim, and one
  // that tries is malformed.
  const script = `
    const s = require('node:net').connect(process.argv[1]);
    const lines = [{ id: 1, op: 'activate', device: process.argv[2], password: process.argv[3] }, { id: 2, euid: 0, op: 'status' }];
    s.on('connect', () => s.write(lines.map((l) => JSON.stringify(l) + '\\n').join('')));
    let text = '';
    s.on('data', (d) => { text += d; if (text.split('\\n').length > 2) { process.stdout.write(text); s.end(); } });`;
  const raw = spawnSync(AS_NOBODY[0], [...AS_NOBODY.slice(1), process.execPath, '-e', script, path.join(box.runDir, 'control.sock'), image, TEST_PASSWORD],
    { encoding: 'utf8', timeout: 20000 });
  const answers = raw.stdout.trim().split('\n').map((l) => JSON.parse(l) as { id: number; ok: boolean; error?: { code: string } });
  assert.deepEqual(answers.map((a) => [a.id, a.ok, a.error?.code]), [[1, false, 'EPERM'], [2, false, 'EINVAL']], raw.stderr);
  assert.equal(status(box).devices.length, 0, 'nothing was activated');
});

/** Send raw lines on the control socket and collect `count` answers. */
async function rawExchange(socketPath: string, payload: Buffer | string, count: number): Promise<Array<Record<string, unknown>>> {
  const socket = net.connect(socketPath);
  const answers: Array<Record<string, unknown>> = [];
  let buffered = '';
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { socket.destroy(); reject(new Error(`only ${answers.length} answers: ${JSON.stringify(answers)}`)); }, 20000);
    socket.on('connect', () => socket.write(payload));
    socket.on('data', (d: Buffer) => {
      buffered += d.toString();
      let nl: number;
      while ((nl = buffered.indexOf('\n')) >= 0) {
        answers.push(JSON.parse(buffered.slice(0, nl)) as Record<string, unknown>);
        buffered = buffered.slice(nl + 1);
      }
      if (answers.length >= count) {
        clearTimeout(timer);
        socket.end();
        resolve(answers);
      }
    });
    socket.on('error', reject);
  });
}

test('malformed and oversized control requests get error answers and the daemon lives on', async (t) => {
  const box = sandbox(t);
  const daemon = await startDaemon(t, { sandbox: box, password: false });
  const sock = path.join(box.runDir, 'control.sock');
  const lines = [
    'this is not json',
    '{"id":1}',
    '{"id":2,"op":"activate","device":5,"password":"x"}',
    '{"id":3,"op":"format-disk"}',
    '{"id":4,"op":"status","extra":true}',
    '[]',
    'null',
    '{"id":5,"op":"mount","device":"/x","mountpoint":"/y","options":"ro,exec /bin/sh"}',
  ];
  const answers = await rawExchange(sock, `${lines.join('\n')}\n`, lines.length);
  assert.equal(answers.length, lines.length);
  for (const a of answers) {
    assert.equal(a.ok, false, JSON.stringify(a));
    assert.equal((a.error as { code: string }).code, 'EINVAL');
  }
  assert.deepEqual(answers.map((a) => a.id), [null, 1, 2, 3, 4, null, null, 5]);

  // 100 KiB in one line: refused without being held whole; the next line on the same connection works.
  const huge = `{"id":6,"op":"ping","pad":"${'x'.repeat(100 * 1024)}"}\n{"id":7,"op":"ping"}\n`;
  const [tooLong, ping] = await rawExchange(sock, huge, 2);
  assert.equal(tooLong?.ok, false);
  assert.match((tooLong?.error as { message: string }).message, /too long/);
  assert.equal(ping?.ok, true);
  assert.equal(ping?.id, 7);

  // Random bytes, a half line and a dropped connection.
  const junk = Buffer.from(Array.from({ length: 4096 }, (_, i) => (i * 7919) % 256));
  const [junkAnswer] = await rawExchange(sock, Buffer.concat([junk, Buffer.from('\n')]), 1);
  assert.equal(junkAnswer?.ok, false, JSON.stringify(junkAnswer));
  assert.equal((junkAnswer?.error as { code: string } | undefined)?.code, 'EINVAL', JSON.stringify(junkAnswer));
  const half = net.connect(sock);
  await new Promise<void>((resolve) => half.on('connect', () => { half.write('{"id":8,"op":"st'); half.destroy(); resolve(); }));

  assert.ok(daemon.server.running(), 'the daemon is still running');
  assert.match(ok(box, ['status']), /no devices registered/);
  assert.equal((await daemon.server.stop()).exitCode, 0, 'SIGTERM ends the daemon with exit code 0');
  assert.ok(!fs.existsSync(sock), 'the socket is removed at exit');
});

test('client commands fail with one clear line when no daemon runs', (t) => {
  const box = sandbox(t);
  const r = cli(box, ['status']);
  assert.equal(r.status, 1);
  assert.equal(r.stderr.trim().split('\n').length, 1);
  assert.match(r.stderr, /daemon is not running/);
});

/** Drive the CLI on a pseudo-terminal: answer each prompt in turn, return all it printed. */
function onTerminal(box: Sandbox, args: string[], answers: string[]): { status: number; output: string } {
  const driver = `
import os, pty, sys, json
args = json.loads(sys.argv[1]); answers = json.loads(sys.argv[2])
pid, fd = pty.fork()
if pid == 0:
    os.execvpe(args[0], args, os.environ)
out = b''
# Where the next prompt is looked for: a prompt is redrawn as keys arrive, and none of its
# copies may pass for the next one, so the search starts after the line an answer ended.
pos = 0
def read_until(token):
    global out
    while out.find(token, pos) < 0:
        try:
            chunk = os.read(fd, 1024)
        except OSError:
            return -1
        if not chunk: return -1
        out += chunk
    return out.find(token, pos)
for a in answers:
    if read_until(b': ') < 0: break
    os.write(fd, a.encode() + b'\\r')
    end = read_until(b'\\n')
    if end < 0: break
    pos = end + 1
try:
    while True:
        chunk = os.read(fd, 1024)
        if not chunk: break
        out += chunk
except OSError:
    pass
_, status = os.waitpid(pid, 0)
sys.stdout.write(json.dumps({'status': os.waitstatus_to_exitcode(status), 'output': out.decode(errors='replace')}))
`;
  const r = spawnSync('/usr/bin/python3', ['-c', driver, JSON.stringify([process.execPath, BDSNAP_MAIN, ...args]), JSON.stringify(answers)],
    { encoding: 'utf8', env: box.env, timeout: 60000 });
  if (r.status !== 0) throw new Error(`pty driver failed: ${r.stderr}`);
  return JSON.parse(r.stdout) as { status: number; output: string };
}

test('on a terminal, passwords are prompted for without echo', async (t) => {
  const box = sandbox(t);
  await startDaemon(t, { sandbox: box, password: false });
  const image = makeImage(path.join(box.top, 'disk.img'), 1 << 20, 0);
  const secret = 'typed at a prompt 123';
  const set = onTerminal(box, ['passwd'], [secret, secret]);
  assert.equal(set.status, 0, set.output);
  assert.match(set.output, /service password set/);
  assert.ok(!set.output.includes(secret), `the password is not echoed: ${set.output}`);
  const activated = onTerminal(box, ['activate', image], [secret]);
  assert.equal(activated.status, 0, activated.output);
  assert.match(activated.output, /activated /);
  assert.ok(!activated.output.includes(secret));
  const mismatch = onTerminal(box, ['passwd'], [secret, 'new one 1', 'new one 2']);
  assert.equal(mismatch.status, 1);
  assert.match(mismatch.output, /differ/);
});

test('on a terminal, Ctrl+D or Ctrl+C at the prompt gives up with one line, and sends nothing', async (t) => {
  const box = sandbox(t);
  await startDaemon(t, { sandbox: box });
  const image = makeImage(path.join(box.top, 'disk.img'), 1 << 20, 0);
  for (const key of ['\u0004', '\u0003']) {
    const r = onTerminal(box, ['activate', image], [key]);
    assert.equal(r.status, 1, r.output);
    assert.match(r.output, /bdsnap: interrupted: no password was given/);
    assert.doesNotMatch(r.output, /wrong password|activated/);
  }
  assert.match(ok(box, ['status']), /no devices registered|not active/);
});

test('the daemon refuses a run directory open to other users instead of locking it down', (t) => {
  const box = sandbox(t);
  const shared = path.join(box.top, 'shared');
  fs.mkdirSync(shared);
  fs.chmodSync(shared, 0o755);
  const r = cli(box, ['daemon', '--run-dir', shared, '--state-dir', box.stateDir, '--snapshot-root', box.snapshotRoot]);
  assert.equal(r.status, 1);
  assert.match(r.stderr, /open to other users \(mode 755\)/);
  assert.equal(fs.statSync(shared).mode & 0o777, 0o755, 'the directory is left as it was');
  const bad = cli(box, ['daemon', '--run-dir', path.join(box.top, 'r'), '--durability', 'sometimes']);
  assert.equal(bad.status, 1);
  assert.match(bad.stderr, /bad --durability "sometimes": expected process or strict/);
});
