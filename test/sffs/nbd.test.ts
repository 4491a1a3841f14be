/**
 * The grading scenarios through real NBD servers: nbdkit (the reference server) and
 * `bdsnap serve`, driven both in-process (SingleFileFs over the NBD client) and by one
 * `bdsnap sffs write --socket` process per write, as an operator's script would.
 */

import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { SingleFileFs } from '../../src/fs/singlefilefs/file.js';
import { mkfsImage } from '../../src/fs/singlefilefs/mkfs.js';
import { connectNbd } from '../../src/fs/singlefilefs/nbd.js';
import { GRADING_SCENARIOS, assertScenarioOutcome, expectedContent, prepareScenarioImage, sffsCliWriter } from './scenarios.js';
import { tempDir } from './helpers.js';
import { BDSNAP_MAIN as MAIN } from '../../testkit/bdsnap-cli.js';
import { makeImage } from '../../testkit/files.js';
import { needs } from '../../testkit/needs.js';


type ServerKind = 'nbdkit' | 'bdsnap serve';

interface Cli {
  status: number | null;
  stdout: string;
  stderr: string;
}

function bdsnap(args: string[], env: NodeJS.ProcessEnv = {}): Promise<Cli> {
  return new Promise((resolve) => {
    execFile(process.execPath, [MAIN, ...args], { encoding: 'utf8', timeout: 30_000, env: { ...process.env, ...env } }, (err, stdout, stderr) => {
      const status = err ? (typeof err.code === 'number' ? err.code : -1) : 0;
      resolve({ status, stdout, stderr });
    });
  });
}

/** Wait until the server accepts connections: the socket file appears before listen(). */
const spawnErrors = new WeakMap<ChildProcess, Error>();
const spawnError = (child: ChildProcess): Error | undefined => spawnErrors.get(child);

async function waitForSocket(socketPath: string, child: ChildProcess, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (spawnError(child)) throw new Error(`server could not be started: ${spawnError(child)?.message}`);
    if (child.exitCode !== null) throw new Error(`server exited with ${child.exitCode} before listening`);
    const accepted = await new Promise<boolean>((resolve) => {
      const probe = net.connect(socketPath);
      probe.once('connect', () => { probe.destroy(); resolve(true); });
      probe.once('error', () => resolve(false));
    });
    if (accepted) return;
    if (Date.now() > deadline) throw new Error(`nothing listening on ${socketPath} after ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** Start a server on `image`; stopped (and waited for) by the returned function and at test end. */
async function startServer(t: { after: (fn: () => unknown) => void }, kind: ServerKind, socketPath: string, image: string,
  strictExportName?: string): Promise<() => Promise<void>> {
  // nbdkit serves any export name unless its exportname filter is told to be strict.
  const strict = strictExportName === undefined ? [] : ['--filter=exportname'];
  const strictArgs = strictExportName === undefined ? [] : [`exportname=${strictExportName}`, 'exportname-strict=true'];
  const child = kind === 'nbdkit'
    ? spawn('nbdkit', ['--foreground', '--exit-with-parent', '--unix', socketPath, ...strict, 'file', image, ...strictArgs], { stdio: ['ignore', 'ignore', 'pipe'] })
    : spawn(process.execPath, [MAIN, 'serve', '--socket', socketPath, image], { stdio: ['ignore', 'ignore', 'pipe'] });
  // Without a listener a failed spawn (no such program) would be an uncaught exception.
  child.once('error', (err) => spawnErrors.set(child, err));
  let stderr = '';
  child.stderr?.on('data', (chunk: Buffer) => { stderr += chunk.toString(); });
  const stop = async (): Promise<void> => {
    if (spawnErrors.has(child) || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((resolve) => child.once('exit', resolve));
    child.kill('SIGTERM');
    await exited;
  };
  t.after(stop);
  try {
    await waitForSocket(socketPath, child, 10_000);
  } catch (err) {
    throw new Error(`${kind}: ${(err as Error).message}; stderr: ${stderr}`);
  }
  return stop;
}

/** nbdkit is an outside program: without it, its tests are skipped (failed under CI). */
function needsServer(t: TestContext, kind: ServerKind): boolean {
  return kind !== 'nbdkit' || needs(t, { tools: ['nbdkit'] });
}

for (const kind of ['nbdkit', 'bdsnap serve'] as const) {
  for (const scenario of GRADING_SCENARIOS) {
    test(`${kind}, in process: ${scenario.name}`, async (t) => {
      if (!needsServer(t, kind)) return;
      const dir = tempDir(t);
      const image = path.join(dir, 'image');
      const before = await prepareScenarioImage(image, scenario);
      const socketPath = path.join(dir, 'nbd.sock');
      const stop = await startServer(t, kind, socketPath, image);
      const device = await connectNbd({ socketPath, exportName: fs.realpathSync(image) });
      try {
        const mounted = await SingleFileFs.open(device);
        await scenario.run(mounted);
        await mounted.flush();
      } finally {
        await device.close();
      }
      await stop();
      await assertScenarioOutcome(scenario, image, before);
    });

    test(`${kind}, one CLI process per write: ${scenario.name}`, async (t) => {
      if (!needsServer(t, kind)) return;
      const dir = tempDir(t);
      const image = path.join(dir, 'image');
      const before = await prepareScenarioImage(image, scenario);
      const socketPath = path.join(dir, 'nbd.sock');
      const stop = await startServer(t, kind, socketPath, image);
      await scenario.run(sffsCliWriter(['--socket', socketPath], image));
      const expected = await expectedContent(scenario);
      const cat = await bdsnap(['sffs', 'cat', '--socket', socketPath, image]);
      assert.equal(cat.status, 0, cat.stderr);
      assert.equal(cat.stdout, expected.after.toString('latin1'));
      const st = await bdsnap(['sffs', 'stat', '--json', '--socket', socketPath, image]);
      assert.equal(st.status, 0, st.stderr);
      assert.equal((JSON.parse(st.stdout) as { sizeBytes: number }).sizeBytes, scenario.sizeAfterBytes);
      await stop();
      await assertScenarioOutcome(scenario, image, before);
    });
  }
}

test('a server that is not singlefilefs is refused with one clear line', async (t) => {
  if (!needsServer(t, 'nbdkit')) return;
  const dir = tempDir(t);
  const image = path.join(dir, 'zeros');
  makeImage(image, 1 << 20, 0);
  const socketPath = path.join(dir, 'nbd.sock');
  await startServer(t, 'nbdkit', socketPath, image);
  const r = await bdsnap(['sffs', 'write', '--socket', socketPath, image, '0', 'x']);
  assert.notEqual(r.status, 0);
  assert.match(r.stderr, /not a singlefilefs image/);
  assert.ok(fs.readFileSync(image).every((b) => b === 0));
});

test('the daemon route: <run-dir>/nbd.sock, and the real path of dev_name as the export name', async (t) => {
  if (!needsServer(t, 'nbdkit')) return;
  const dir = tempDir(t);
  const image = path.join(dir, 'image');
  await mkfsImage(image, 10);
  const link = path.join(dir, 'link-to-image');
  fs.symlinkSync(image, link);
  const runDir = path.join(dir, 'run');
  fs.mkdirSync(runDir);
  const stop = await startServer(t, 'nbdkit', path.join(runDir, 'nbd.sock'), image, fs.realpathSync(image));

  const viaEnv = await bdsnap(['sffs', 'write', link, '0', 'Through the daemon socket'], { BDSNAP_RUN_DIR: runDir });
  assert.equal(viaEnv.status, 0, viaEnv.stderr);
  const viaFlag = await bdsnap(['sffs', 'cat', '--run-dir', runDir, link]);
  assert.equal(viaFlag.status, 0, viaFlag.stderr);
  assert.equal(viaFlag.stdout, 'Through the daemon socketd like.\n');
  const wrong = await bdsnap(['sffs', 'cat', '--run-dir', runDir, '--export', '/no/such/device', link]);
  assert.notEqual(wrong.status, 0);
  assert.equal(wrong.stderr.trim().split('\n').length, 1, wrong.stderr);
  await stop();
  assert.equal(fs.readFileSync(image).subarray(8192, 8192 + 25).toString(), 'Through the daemon socket');
});
