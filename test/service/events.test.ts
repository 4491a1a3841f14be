/**
 * The event stream off the request path: emit() numbers and keeps an event at once, and its log
 * line, its line in the events file and the wake-up of waiting readers come on a later turn, in
 * the order the events were emitted; a `bdsnap events --follow` stopped mid-stream delays no
 * write and, once it runs again, prints every event once and in order.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { setImmediate as nextTurn } from 'node:timers/promises';
import { pino } from 'pino';
import { NbdClient } from '../../src/nbd/client.js';
import { EventLog } from '../../src/service/events.js';
import { cleanupOf } from '../../testkit/cleanup.js';
import { BDSNAP_MAIN } from '../../testkit/bdsnap-cli.js';
import { sandbox, startDaemon } from '../../testkit/daemon.js';
import { makeImage, makeTempDir } from '../../testkit/files.js';

test('emit() leaves logging, the file and the readers to a later turn, and they see the events in order', async (t) => {
  const dir = makeTempDir(t);
  const logged: string[] = [];
  const log = pino({ level: 'info' }, { write: (line: string) => void logged.push((JSON.parse(line) as { event: string }).event) });
  const events = await EventLog.open(dir, log);
  t.after(() => events.close());
  const waiting = events.since(0, 60_000);

  events.emit('snapshot-created', { snapshot: 'a' });
  events.emit('session-started', { device: '/d' });
  events.emit('snapshot-destroyed', { snapshot: 'a' });
  assert.deepEqual(logged, [], 'nothing is logged on the emitter\'s turn');
  assert.equal(fs.readFileSync(path.join(dir, 'events.jsonl'), 'utf8'), '', 'nothing is written on the emitter\'s turn');
  assert.deepEqual((await events.since(0)).events.map((e) => e.seq), [1, 2, 3], 'a reader asking finds them at once');

  await nextTurn();
  assert.deepEqual(logged, ['snapshot-created', 'session-started', 'snapshot-destroyed']);
  const lines = fs.readFileSync(path.join(dir, 'events.jsonl'), 'utf8').trim().split('\n').map((l) => (JSON.parse(l) as { seq: number }).seq);
  assert.deepEqual(lines, [1, 2, 3]);
  assert.deepEqual((await waiting).events.map((e) => e.type), ['snapshot-created', 'session-started', 'snapshot-destroyed']);
});

test('events not yet published when the log closes are still written', async (t) => {
  const dir = makeTempDir(t);
  const events = await EventLog.open(dir, pino({ level: 'silent' }));
  events.emit('cbt-reset', { device: '/d' });
  events.close();
  assert.equal(fs.readFileSync(path.join(dir, 'events.jsonl'), 'utf8').trim().split('\n').length, 1);
});

test('a stopped events --follow delays no write, and prints every event once and in order when it runs again', { timeout: 90_000 }, async (t) => {
  const box = sandbox(t);
  const device = makeImage(path.join(box.top, 'a.img'), 4 << 20, 0);
  const daemon = await startDaemon(t, { sandbox: box, activate: [device] });

  const follower = spawn(process.execPath, [BDSNAP_MAIN, 'events', '--follow', '--json'], { env: box.env, stdio: ['ignore', 'pipe', 'pipe'] });
  cleanupOf(t).after(() => {
    follower.kill('SIGCONT');
    follower.kill('SIGKILL');
  });
  let stdout = '';
  let wake: (() => void) | undefined;
  follower.stdout.on('data', (d: Buffer) => {
    stdout += d.toString('utf8');
    wake?.();
  });
  const printed = (): Array<{ seq: number; type: string }> => stdout.split('\n').filter((l) => l).map((l) => JSON.parse(l) as { seq: number; type: string });
  const until = async (done: () => boolean): Promise<void> => {
    while (!done()) await new Promise<void>((resolve) => (wake = resolve));
  };

  // One session (a connection that writes), so the follower is known to be reading.
  const cycle = async (k: number): Promise<number> => {
    const started = performance.now();
    const client = await NbdClient.connect({ socketPath: daemon.server.socketPath, exportName: device });
    await client.write(Buffer.alloc(64 << 10, k + 1), (k % 32) << 16);
    await client.flush();
    await client.close();
    return performance.now() - started;
  };
  await cycle(0);
  await until(() => printed().length >= 2);
  follower.kill('SIGSTOP');

  const CYCLES = 20;
  const slowest = Math.max(...await Array.from({ length: CYCLES }, (_, k) => k + 1).reduce<Promise<number[]>>(
    async (done, k) => [...await done, await cycle(k)], Promise.resolve([])));
  assert.ok(slowest < 5_000, `each session's write and flush went on while the follower was stopped (slowest ${slowest.toFixed(0)} ms)`);

  follower.kill('SIGCONT');
  await until(() => printed().length >= 2 * (CYCLES + 1));
  const seen = printed();
  assert.deepEqual(seen.map((e) => e.seq), seen.map((_, k) => k + 1), 'every event once, in order');
  assert.deepEqual(seen.map((e) => e.type), Array.from({ length: CYCLES + 1 }, () => ['session-started', 'session-ended']).flat());
});
