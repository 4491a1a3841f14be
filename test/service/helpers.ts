/**
 * Fixtures of the service tests on top of the daemon launcher (testkit/daemon.ts): session
 * directories, nbdsh against a sandbox's daemon, the password/activate/restore steps several
 * tests share, and the ordered writer of the multi-device consistency tests.
 */

import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { cleanupOf } from '../../testkit/cleanup.js';
import { cli, daemonUri, ok, startDaemon, type CliResult, type RunningDaemon, type Sandbox } from '../../testkit/daemon.js';
import type { AfterHook } from '../../testkit/files.js';
import { nbdshEnv } from '../../testkit/process.js';
import { applyWrite, ddWrite, nbdshWrites, randomWrite, type Write } from '../helpers/image-writes.js';

export function sessionDirs(box: Sandbox): string[] {
  if (!fs.existsSync(box.snapshotRoot)) return [];
  return fs.readdirSync(box.snapshotRoot).sort();
}

/**
 * An nbdsh client of the daemon holding `exportName` open: it runs the python `code` (which
 * must print a line once done, e.g. after its writes and a flush), then waits until `end()`,
 * which checks that it exited 0. What the test does in between happens while the client holds
 * the export. Killed after the test.
 */
export async function heldNbdsh(t: AfterHook, box: Sandbox, exportName: string, code: string): Promise<{ end: () => Promise<void> }> {
  const child = spawn('nbdsh', ['-u', daemonUri(box, exportName), '-c', 'import sys', '-c', `${code}\nsys.stdin.readline()`], { stdio: ['pipe', 'pipe', 'pipe'], env: nbdshEnv() });
  cleanupOf(t).after(() => void child.kill('SIGKILL'));
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); });
  const exited = new Promise<number | null>((resolve) => child.once('exit', resolve));
  await new Promise<void>((resolve, reject) => {
    child.stdout!.once('data', () => resolve());
    void exited.then((status) => reject(new Error(`nbdsh exited (${status}): ${stderr}`)));
  });
  return {
    end: async () => {
      child.stdin!.end('\n');
      assert.equal(await exited, 0, stderr);
    },
  };
}

/**
 * One session of a user as the model tests draw it: 1-3 NBD writes of whole 4 KiB blocks; with
 * a chance of 0.3 a `dd` into the image while the client holds it, else with 0.25 the daemon
 * killed with SIGKILL before the client ends.
 */
export interface UserSession { writes: Write[]; around: Write | undefined; kill: boolean }

export function drawSession(random: () => number, sizeBytes: number): UserSession {
  const writes = Array.from({ length: 1 + Math.floor(random() * 3) }, () => randomWrite(random, sizeBytes, 4096));
  const around = random() < 0.3 ? randomWrite(random, sizeBytes) : undefined;
  return { writes, around, kill: !around && random() < 0.25 };
}

export function describeSession(s: UserSession): string {
  return `session of ${s.writes.length} write(s)${s.around ? ' written around' : ''}${s.kill ? ', the daemon killed during it' : ''}`;
}

/**
 * Run `s` on `device` of `daemon` and apply to `model` what reaches the image (the writes are
 * flushed before the dd or the kill). Returns the daemon serving afterwards: a new one on the
 * same directories after a kill, which must find the session again.
 */
export async function runUserSession(t: AfterHook, box: Sandbox, daemon: RunningDaemon, device: string, model: Buffer, s: UserSession): Promise<RunningDaemon> {
  const client = await heldNbdsh(t, box, device, nbdshWrites(s.writes));
  for (const w of s.writes) applyWrite(model, w);
  if (s.around) {
    ddWrite(device, s.around);
    applyWrite(model, s.around);
  }
  if (!s.kill) {
    await client.end();
    return daemon;
  }
  daemon.server.kill('SIGKILL');
  await daemon.server.waitForExit(10_000);
  await client.end().catch(() => undefined);
  return startDaemon(t, { sandbox: box, password: false });
}

/** Run nbdsh with a python snippet against an export; returns the process result. */
export function nbdsh(box: Sandbox, exportName: string, code: string): CliResult {
  const r = spawnSync('nbdsh', ['-u', daemonUri(box, exportName), '-c', code], { encoding: 'utf8', timeout: 60000, env: nbdshEnv() });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Set the service password for the first time and activate `device` with it, through the CLI. */
export function passwdAndActivate(box: Sandbox, device: string, password: string): void {
  ok(box, ['passwd', '--password-stdin'], `${password}\n`);
  ok(box, ['activate', device, '--password-stdin'], `${password}\n`);
}

/**
 * The sandbox holds exactly one session: return its manifest state after running
 * `bdsnap restore` on it (which must succeed).
 */
export function restoreOnlySession(box: Sandbox): string {
  const dirs = sessionDirs(box);
  assert.equal(dirs.length, 1, `expected one session directory, found ${dirs.join(', ')}`);
  const dir = path.join(box.snapshotRoot, dirs[0] as string);
  const manifest = JSON.parse(fs.readFileSync(path.join(dir, 'manifest.json'), 'utf8')) as { state: string };
  const restored = cli(box, ['restore', dir]);
  assert.equal(restored.status, 0, restored.stderr);
  return manifest.state;
}

const ORDERED_WRITER = fileURLToPath(new URL('./fixtures/ordered-writer.js', import.meta.url));

/** The ordered writer (fixtures/ordered-writer.ts) running in its own process. */
export interface OrderedWriter {
  /** How many pairs (A then B) both devices had acknowledged when the writer answered. */
  acknowledged(): Promise<number>;
  /**
   * Start writing (it starts paused) and resolve, with acknowledged(), once `pairs` more have
   * been acknowledged: writes are then steadily in flight. Throws if the blocks run out first.
   */
  go(pairs: number): Promise<number>;
  /** Stop writing between pairs; resolves, with acknowledged(), when none is in flight. */
  pause(): Promise<number>;
  /** Stop writing and wait for the process to end (also done after the test). */
  stop(): Promise<void>;
}

/**
 * Start the ordered writer on devices `a` and `b` of the sandbox's daemon, `blocks` blocks of
 * `blockBytes` each; resolves once it has connected to both (paused).
 */
export async function startOrderedWriter(t: AfterHook, box: Sandbox, a: string, b: string, blockBytes: number, blocks: number): Promise<OrderedWriter> {
  const child = spawn(process.execPath, [ORDERED_WRITER, path.join(box.runDir, 'nbd.sock'), a, b, String(blockBytes), String(blocks)], {
    env: { ...process.env, BDSNAP_ORDERED_WRITER: '1' },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const lines: string[] = [];
  const waiting: Array<(line: string) => void> = [];
  readline.createInterface({ input: child.stdout }).on('line', (line) => {
    const next = waiting.shift();
    if (next) next(line);
    else lines.push(line);
  });
  const nextLine = (): Promise<string> => {
    const line = lines.shift();
    if (line !== undefined) return Promise.resolve(line);
    return Promise.race([
      new Promise<string>((resolve) => waiting.push(resolve)),
      exited.then((code) => { throw new Error(`the ordered writer exited ${code}: ${stderr}`); }),
    ]);
  };
  let stopped: Promise<void> | undefined;
  const stop = (): Promise<void> => {
    stopped ??= (async () => {
      child.stdin.end();
      const code = await exited;
      assert.equal(code, 0, `the ordered writer failed: ${stderr}`);
    })();
    return stopped;
  };
  cleanupOf(t).after(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  assert.equal(await nextLine(), 'ready');
  const command = async (line: string): Promise<number> => {
    child.stdin.write(`${line}\n`);
    return Number(await nextLine());
  };
  return {
    acknowledged: () => command('?'),
    go: async (pairs) => {
      const target = await command('go') + pairs;
      for (;;) {
        const acknowledged = await command('?');
        if (acknowledged >= target) return acknowledged;
        if (acknowledged >= blocks - 1) throw new Error(`the ordered writer ran out of blocks (${blocks}); give it more`);
      }
    },
    pause: () => command('pause'),
    stop,
  };
}

/**
 * The highest write of the ordered writer an image holds (0 for none), checking that it
 * holds exactly writes 1..h of the device given by `salt`.
 */
export function highestOrderedWrite(image: Buffer, blockBytes: number, salt: number): number {
  const filler = Buffer.alloc(blockBytes - 8, salt);
  let top = 0;
  for (let k = 1; (k + 1) * blockBytes <= image.length; k++) {
    const block = image.subarray(k * blockBytes, (k + 1) * blockBytes);
    const stamp = Number(block.readBigUInt64LE(0));
    if (stamp === 0) break;
    assert.equal(stamp, k, `block ${k} holds write ${stamp}`);
    assert.ok(block.subarray(8).equals(filler), `block ${k} is write ${k} of the other device`);
    top = k;
  }
  // Nothing past the prefix: the writes are in order, so a later one without this one is no point in time.
  for (let k = top + 1; (k + 1) * blockBytes <= image.length; k++) {
    assert.equal(image.readBigUInt64LE(k * blockBytes), 0n, `block ${k} holds a write past the prefix ending at ${top}`);
  }
  return top;
}
