/** Shared helpers of the snapshot tests: temp dirs, error predicates, killed writers. No tests in here. */

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import assert from 'node:assert/strict';
import { BdsnapError, type ErrorCode } from '../../src/errors.js';
import type { DiffStorage } from '../../src/snapshot/diff-storage.js';
import { makeTempDir, type AfterHook } from '../helpers/files.js';

export interface TestContext {
  after: (fn: () => unknown) => void;
}

/** A temporary directory removed after the test (the one implementation is helpers/files.ts). */
export function tempDir(t: AfterHook, prefix = 'bdsnap-snap-'): string {
  return makeTempDir(t, prefix);
}

/** Predicate for assert.rejects: a BdsnapError with this code whose message matches. */
export function isError(code: ErrorCode, message?: RegExp): (e: unknown) => boolean {
  return (e: unknown) => {
    if (!(e instanceof BdsnapError)) throw new Error(`expected BdsnapError ${code}, got ${String(e)}`);
    if (e.code !== code) throw new Error(`expected code ${code}, got ${e.code}: ${e.message}`);
    if (message && !message.test(e.message)) throw new Error(`message "${e.message}" does not match ${message}`);
    return true;
  };
}

export function onlyDir(root: string): string {
  const entries = fs.readdirSync(root);
  if (entries.length !== 1) throw new Error(`expected one session directory in ${root}, found ${entries.join(', ')}`);
  return path.join(root, entries[0]!);
}

/**
 * Run a fixture writer (it acts only with BDSNAP_CRASH_WRITER=1) until it prints its first
 * line, let it write for `runMs`, SIGKILL it, and return what it printed.
 */
export async function killWhileWriting(script: string, args: string[], runMs: number): Promise<string> {
  const child = spawn(process.execPath, [script, ...args], { env: { ...process.env, BDSNAP_CRASH_WRITER: '1' }, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<NodeJS.Signals | null>((resolve) => child.on('exit', (_code, signal) => resolve(signal)));
  try {
    const deadline = Date.now() + 10_000;
    while (!out.includes('\n')) {
      if (Date.now() > deadline || child.exitCode !== null) throw new Error(`the writer did not start: ${err}`);
      await new Promise((r) => setTimeout(r, 10));
    }
    await new Promise((r) => setTimeout(r, runMs));
  } finally {
    child.kill('SIGKILL');
  }
  assert.equal(await exited, 'SIGKILL', `the writer died on its own: ${err}`);
  return out;
}

/** Append something that is not a valid record to the newest file of a storage. */
export function tearTail(storage: DiffStorage, how: number): void {
  const { dirs } = storage.usage();
  const files = dirs.flatMap((d) => fs.readdirSync(d).filter((n) => n.startsWith(`${storage.id}.`) && n.endsWith('.diff')).map((n) => path.join(d, n)));
  files.sort((a, b) => Number(a.split('.').at(-2)) - Number(b.split('.').at(-2)));
  const newest = files.at(-1)!;
  const all = files.map((f) => fs.readFileSync(f)).find((b) => b.length > 0);
  if (how === 1 || all === undefined) {
    fs.appendFileSync(newest, Buffer.from(Array.from({ length: 100 }, (_, i) => (7 * 31 + i * 7) & 0xff)));
    return;
  }
  const firstRecord = all.subarray(0, 64 + all.readUInt32LE(32));
  if (how === 2) {
    fs.appendFileSync(newest, firstRecord.subarray(0, firstRecord.length - 1)); // truncated payload
  } else {
    const flipped = Buffer.from(firstRecord);
    flipped[flipped.length - 1]! ^= 0xff; // CRC mismatch
    fs.appendFileSync(newest, flipped);
  }
}
