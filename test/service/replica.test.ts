/**
 * Replication between two real daemons on one machine (each with its own run, state and
 * snapshot directories), and to nbdkit as a plain NBD target: every sync leaves the standby
 * one point in time of all the replica's devices, exactly; an incremental sync sends only the
 * changed blocks; a change-map reset makes the next sync full; a sync cut short by SIGKILL of
 * the sender or of the standby leaves the standby at the last complete point, and the next
 * sync completes it; failover ends the replication on the standby.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { NbdClient } from '../../src/nbd/client.js';
import type { DaemonEvent, ReceivedReplicaInfo, ReplicaInfo } from '../../src/service/control-protocol.js';
import { BdsnapClient } from '../../src/service/client.js';
import { cli, ok, sandbox, startDaemon, type RunningDaemon, type Sandbox } from '../../testkit/daemon.js';
import { makeImage, sha256File } from '../../testkit/files.js';
import type { RunResult } from '../../testkit/process.js';
import { until } from '../helpers/poll.js';
import { nbdUri, startServer } from '../../testkit/server.js';
import { makePki } from '../../testkit/tls.js';
import { ORDERED_WRITER_SALTS } from './fixtures/ordered-writer.js';
import { highestOrderedWrite, startOrderedWriter } from './helpers.js';

interface ReplicaList {
  replicas: ReplicaInfo[];
  received: ReceivedReplicaInfo[];
}

/** Make the daemon serve idle devices (a snapshot taken and dropped registers them). */
function register(box: Sandbox, devices: string[]): void {
  const snap = JSON.parse(ok(box, ['snapshot', 'create', ...devices, '--json'])) as { id: string };
  ok(box, ['snapshot', 'destroy', snap.id]);
}

function addReplica(box: Sandbox, args: string[]): ReplicaInfo {
  return JSON.parse(ok(box, ['replica', 'add', ...args, '--json'])) as ReplicaInfo;
}

function sync(box: Sandbox, id: string): ReplicaInfo {
  return JSON.parse(ok(box, ['replica', 'sync', id, '--json'])) as ReplicaInfo;
}

function replicaList(box: Sandbox): ReplicaList {
  return JSON.parse(ok(box, ['replica', 'list', '--json'])) as ReplicaList;
}

function events(box: Sandbox, type: string): DaemonEvent[] {
  return ok(box, ['events', '--json']).split('\n').filter((l) => l).map((l) => JSON.parse(l) as DaemonEvent).filter((e) => e.type === type);
}

/** Write `data` at `offsetBytes` of `device` through the daemon's NBD server. */
async function writeThrough(box: Sandbox, device: string, writes: Array<{ offsetBytes: number; data: Buffer }>): Promise<void> {
  const client = await NbdClient.connect({ socketPath: path.join(box.runDir, 'nbd.sock'), exportName: device });
  try {
    for (const w of writes) await client.write(w.data, w.offsetBytes);
    await client.flush();
  } finally {
    await client.close();
  }
}

/** Two daemons: the source with `devices` served, the standby with `targets` active (sessions). */
async function twoDaemons(t: Parameters<typeof sandbox>[0], make: (src: Sandbox, dst: Sandbox) => { devices: string[]; targets: string[] },
  sourceEnv: NodeJS.ProcessEnv = {}) {
  const src = sandbox(t, 'bdsnap-rep-src-');
  const dst = sandbox(t, 'bdsnap-rep-dst-');
  Object.assign(src.env, sourceEnv);
  fs.mkdirSync(path.join(dst.top, 'images'));
  const { devices, targets } = make(src, dst);
  const source = await startDaemon(t, { sandbox: src, password: false });
  const standby = await startDaemon(t, { sandbox: dst, activate: targets });
  register(src, devices);
  const uri = nbdUri(path.join(dst.runDir, 'nbd.sock'), `${path.join(fs.realpathSync(dst.top), 'images')}/`);
  return { src, dst, source, standby, devices, targets, uri };
}

/** Two daemons, the source serving one device of `sizeBytes` and the standby one target of other content. */
async function oneDeviceEach(t: Parameters<typeof sandbox>[0], sizeBytes: number, sourceEnv: NodeJS.ProcessEnv = {}) {
  const daemons = await twoDaemons(t, (s, d) => ({
    devices: [makeImage(path.join(s.top, 'a.img'), sizeBytes, 'random', 1)],
    targets: [makeImage(path.join(d.top, 'images', 'a.img'), sizeBytes, 'random', 2)],
  }), sourceEnv);
  return { ...daemons, device: daemons.devices[0]!, target: daemons.targets[0]! };
}

test('two devices under an ordered writer: each sync leaves the standby one point in time of both, exactly', { timeout: 180_000 }, async (t) => {
  const WRITE_BYTES = 512;
  // Many small blocks: the writer must not run out before the last sync, however fast it goes.
  const DEVICE_BYTES = 64 << 20;
  const { src, dst, devices, targets, uri } = await twoDaemons(t, (s, d) => ({
    // Sparse sources and standby images full of other bytes: the holes must arrive as zeroes.
    devices: ['a.img', 'b.img'].map((n) => makeImage(path.join(s.top, n), DEVICE_BYTES, 'zero')),
    targets: ['a.img', 'b.img'].map((n, i) => makeImage(path.join(d.top, 'images', n), DEVICE_BYTES, 'random', 7 + i)),
  }));
  const [a, b] = devices as [string, string];
  const [ta, tb] = targets as [string, string];
  const replica = addReplica(src, [a, b, '--to', uri]);
  assert.equal(replica.targetKind, 'bdsnap', 'the standby daemon is found behind its nbd.sock');
  assert.deepEqual(replica.exports, targets);

  const writer = await startOrderedWriter(t, src, a, b, WRITE_BYTES, DEVICE_BYTES / WRITE_BYTES);
  const seen: string[] = [];
  const sent: number[] = [];
  for (let round = 0; round < 3; round++) {
    const before = await writer.go(50);
    // The CLI runs in its own process; the writer goes on writing while the sync takes its snapshot.
    const r = sync(src, replica.id);
    const after = await writer.pause();
    const ha = highestOrderedWrite(fs.readFileSync(ta), WRITE_BYTES, ORDERED_WRITER_SALTS.a);
    const hb = highestOrderedWrite(fs.readFileSync(tb), WRITE_BYTES, ORDERED_WRITER_SALTS.b);
    seen.push(`${before} ${ha} ${hb} ${after}`);
    assert.ok(ha === hb || ha === hb + 1, `round ${round}: standby A holds writes up to ${ha}, B up to ${hb}: not one point in time (${seen.join('; ')})`);
    assert.ok(hb >= before && ha <= after + 1, `round ${round}: the standby is not a point between the sync's start and end (${seen.join('; ')})`);
    assert.equal(r.lastSync?.full, round === 0, `round ${round}: ${r.lastSync?.why}`);
    sent.push(r.lastSync?.bytesSent ?? -1);
  }
  await writer.stop();
  // Nothing writes now: one more sync makes the standby equal to the devices, byte for byte.
  const last = sync(src, replica.id);
  assert.equal(last.state, 'idle');
  assert.equal(await sha256File(ta), await sha256File(a), 'standby A equals the source');
  assert.equal(await sha256File(tb), await sha256File(b), 'standby B equals the source');
  t.diagnostic(`acknowledged before, standby A, B, acknowledged after: ${seen.join('; ')}; bytes sent per sync: ${sent.join(' ')}`);
  // The full sync sent data only where the sparse devices had any; the rest went as write-zeroes.
  assert.ok((sent[0] ?? 0) < DEVICE_BYTES, `the first sync skipped the holes (${sent[0]} bytes sent)`);
  const received = replicaList(dst).received.find((r) => r.id === replica.id);
  assert.equal(received?.point, last.lastComplete);
  assert.equal(received?.receiving, false);
});

test('an incremental sync sends only the changed blocks; a change-map reset makes the next one full, and says so', { timeout: 120_000 }, async (t) => {
  const DEVICE_BYTES = 32 << 20;
  const { src, dst, device, target } = await oneDeviceEach(t, DEVICE_BYTES);
  const replica = addReplica(src, [device, '--to', nbdUri(path.join(dst.runDir, 'nbd.sock'), target)]);
  const first = sync(src, replica.id);
  assert.equal(first.lastSync?.full, true);
  assert.equal(first.lastSync?.bytesSent, DEVICE_BYTES, 'random data has no holes: all of it is sent');

  const writes = [
    { offsetBytes: 1 << 20, data: randomBytes(4096) },
    { offsetBytes: (20 << 20) + 3 * 512, data: randomBytes(512) },
    { offsetBytes: 28 << 20, data: randomBytes(256 << 10) },
  ];
  await writeThrough(src, device, writes);
  const { blockSize } = JSON.parse(ok(src, ['cbt', 'info', device, '--json'])) as { blockSize: number };
  const blocks = new Set<number>();
  for (const w of writes) {
    for (let blk = Math.floor(w.offsetBytes / blockSize); blk * blockSize < w.offsetBytes + w.data.length; blk++) blocks.add(blk);
  }
  const endedBefore = events(dst, 'session-ended').length;
  const second = sync(src, replica.id);
  assert.equal(second.lastSync?.full, false, second.lastSync?.why);
  assert.equal(second.lastSync?.bytesSent, blocks.size * blockSize, `only the ${blocks.size} changed blocks of ${blockSize} bytes are sent`);
  assert.equal(second.bytesSent, DEVICE_BYTES + blocks.size * blockSize);
  assert.equal(await sha256File(target), await sha256File(device));
  // The standby's session of that sync (forgotten once it ended) preserved only what the sync wrote.
  await until('the standby\'s session of the sync to end', () => events(dst, 'session-ended').length > endedBefore, 20_000, 50);
  const ended = events(dst, 'session-ended').at(-1);
  assert.ok(Number(ended?.details.preservedBytes ?? Infinity) <= blocks.size * blockSize, `the standby received only the changed blocks (${JSON.stringify(ended)})`);

  const nothing = sync(src, replica.id);
  assert.equal(nothing.lastSync?.bytesSent, 0, 'nothing changed, nothing sent');

  ok(src, ['cbt', 'reset', device]);
  const third = sync(src, replica.id);
  assert.equal(third.lastSync?.full, true);
  assert.match(third.lastSync?.why ?? '', /change map reset/);
  const synced = events(src, 'replica-synced').at(-1);
  assert.equal(synced?.details.full, true);
  assert.match(String(synced?.details.why), /change map reset/);
  assert.equal(await sha256File(target), await sha256File(device));
  t.diagnostic(`sync durations (ms): full ${first.lastSync?.durationMs}, incremental ${second.lastSync?.durationMs}, empty ${nothing.lastSync?.durationMs}, after the reset ${third.lastSync?.durationMs}`);
});

/** Rewrite the whole device with new random bytes through the daemon. */
async function rewrite(box: Sandbox, device: string, sizeBytes: number): Promise<void> {
  const writes = [];
  for (let at = 0; at < sizeBytes; at += 1 << 20) writes.push({ offsetBytes: at, data: randomBytes(1 << 20) });
  await writeThrough(box, device, writes);
}

/** Start `replica sync` in the background and resolve once the standby holds part of it. */
async function syncUntilHalfway(source: RunningDaemon, dst: Sandbox, id: string, target: string): Promise<void> {
  void source.cli(['replica', 'sync', id], undefined, true);
  await until('the standby to receive part of the sync', () => {
    const status = JSON.parse(ok(dst, ['status', '--json'])) as { devices: Array<{ device: string; bytesPreserved: number }> };
    return (status.devices.find((d) => d.device === target)?.bytesPreserved ?? 0) >= 2 << 20;
  }, 20_000, 50);
}

test('SIGKILL of the sender, then of the standby, mid-sync: the standby stays at the last complete point; the next sync completes it', { timeout: 180_000 }, async (t) => {
  const DEVICE_BYTES = 16 << 20;
  const { src, dst, source, standby, device, target } = await oneDeviceEach(t, DEVICE_BYTES);
  // 4 MiB/s: a sync of the whole device takes four seconds, time to kill it halfway.
  const replica = addReplica(src, [device, '--to', nbdUri(path.join(dst.runDir, 'nbd.sock'), target), '--limit-rate', '4M']);
  sync(src, replica.id);
  const complete = await sha256File(target);
  assert.equal(complete, await sha256File(device));

  // The sender dies halfway through the next sync.
  await rewrite(src, device, DEVICE_BYTES);
  await syncUntilHalfway(source, dst, replica.id, target);
  source.server.kill('SIGKILL');
  await until('the standby to undo the sync', () => replicaList(dst).received[0]?.receiving === false, 20_000, 50).catch(() => undefined);
  assert.equal(await sha256File(target), complete, 'the standby is back at the last complete point after the sender died');
  assert.equal(events(dst, 'replica-rolled-back').length, 1);

  // The standby dies halfway through the next sync; at its start it undoes the half-applied sync.
  await source.server.waitForExit(10_000);
  const sourceAgain = await startDaemon(t, { sandbox: src, password: false });
  await syncUntilHalfway(sourceAgain, dst, replica.id, target);
  standby.server.kill('SIGKILL');
  await standby.server.waitForExit(10_000);
  await startDaemon(t, { sandbox: dst, password: false });
  assert.equal(await sha256File(target), complete, 'the standby is back at the last complete point after it was killed');
  assert.equal(replicaList(dst).received[0]?.receiving, false);
  await until('the cut sync to end on the sender', () => replicaList(src).replicas[0]?.state !== 'syncing', 20_000, 50);

  const done = sync(src, replica.id);
  assert.equal(done.state, 'idle');
  assert.equal(await sha256File(target), await sha256File(device), 'the next sync completes the standby');
});

const PLAIN_DEVICE_BYTES = 16 << 20;

/**
 * A source daemon serving one device of 16 MiB, replicated to nbdkit (a plain target) with
 * `replicaArgs` (4 MiB/s, so that a sync can be cut halfway), after its first sync.
 */
async function plainReplica(t: Parameters<typeof sandbox>[0], replicaArgs: string[]) {
  const src = sandbox(t, 'bdsnap-rep-src-');
  const device = makeImage(path.join(src.top, 'a.img'), PLAIN_DEVICE_BYTES, 'random', 1);
  const targetFile = makeImage(path.join(src.top, 'copy.img'), PLAIN_DEVICE_BYTES, 'random', 2);
  const nbdkit = await startServer(t, { kind: 'nbdkit', images: [targetFile] });
  const source = await startDaemon(t, { sandbox: src, password: false });
  register(src, [device]);
  const replica = addReplica(src, [device, '--to', nbdUri(nbdkit.socketPath), '--limit-rate', '4M', ...replicaArgs]);
  const first = sync(src, replica.id);
  return { src, source, device, targetFile, replica, first };
}

/** Rewrite the device of a plainReplica and start a sync in the background; resolves, with the sync command's result to come, once part of it reached nbdkit. */
async function plainSyncUnderway(r: Awaited<ReturnType<typeof plainReplica>>): Promise<{ result: Promise<RunResult> }> {
  await rewrite(r.src, r.device, PLAIN_DEVICE_BYTES);
  const before = await sha256File(r.targetFile);
  const result = r.source.cli(['replica', 'sync', r.replica.id], undefined, true);
  await until('part of the sync to reach nbdkit', async () => (await sha256File(r.targetFile)) !== before, 20_000, 50);
  return { result };
}

test('nbdkit as a plain target: the copy is marked incomplete while a sync is cut short, and the next sync sends its ranges again', { timeout: 120_000 }, async (t) => {
  const plain = await plainReplica(t, []);
  const { src, source, device, targetFile, replica, first } = plain;
  assert.equal(replica.targetKind, 'plain');
  assert.equal(first.state, 'idle');
  assert.equal(await sha256File(targetFile), await sha256File(device));

  void (await plainSyncUnderway(plain)).result;
  source.server.kill('SIGKILL');
  await source.server.waitForExit(10_000);

  await startDaemon(t, { sandbox: src, password: false });
  const cut = replicaList(src).replicas[0];
  assert.equal(cut?.state, 'incomplete', 'a copy cut short is marked incomplete');
  assert.equal(cut?.lastComplete, first.lastComplete, 'the last complete point did not move');
  assert.equal(JSON.parse(ok(src, ['snapshot', 'list', '--json'])).snapshots.length, 0, 'the cut sync\'s snapshot was destroyed at the restart');
  const done = sync(src, replica.id);
  assert.equal(done.state, 'idle');
  assert.equal(done.lastSync?.full, false, 'the next sync is incremental from the last complete point');
  assert.equal(await sha256File(targetFile), await sha256File(device), 'and completes the copy');
});

test('failover on the standby: the device is an ordinary one there, and the sender is refused from then on', { timeout: 120_000 }, async (t) => {
  const DEVICE_BYTES = 4 << 20;
  const { src, dst, device, target } = await oneDeviceEach(t, DEVICE_BYTES);
  const replica = addReplica(src, [device, '--to', nbdUri(path.join(dst.runDir, 'nbd.sock'), target)]);
  const notYet = cli(dst, ['replica', 'failover', replica.id]);
  assert.notEqual(notYet.status, 0);
  assert.match(notYet.stderr, /not received by this daemon/);
  sync(src, replica.id);
  const wrongSide = cli(src, ['replica', 'failover', replica.id]);
  assert.notEqual(wrongSide.status, 0);
  assert.match(wrongSide.stderr, /run failover on the standby/);

  const failedOver = JSON.parse(ok(dst, ['replica', 'failover', replica.id, '--json'])) as ReceivedReplicaInfo;
  assert.ok(failedOver.failedOverAt !== null);
  assert.equal(await sha256File(target), await sha256File(device));
  // An ordinary device of the standby now: written under a session like any active device.
  await writeThrough(dst, target, [{ offsetBytes: 0, data: randomBytes(4096) }]);
  const refused = cli(src, ['replica', 'sync', replica.id]);
  assert.notEqual(refused.status, 0);
  assert.match(refused.stderr, /failed over on this standby/);
  assert.equal(replicaList(src).replicas[0]?.state, 'failed');
  assert.match(String(events(src, 'replica-failed').at(-1)?.details.reason), /failed over/);
});

test('schedule: --every syncs on its own; pause stops it, resume starts it again, remove forgets the replica', { timeout: 120_000 }, async (t) => {
  const DEVICE_BYTES = 4 << 20;
  const src = sandbox(t, 'bdsnap-rep-src-');
  const device = makeImage(path.join(src.top, 'a.img'), DEVICE_BYTES, 'random', 1);
  const targetFile = makeImage(path.join(src.top, 'copy.img'), DEVICE_BYTES, 'random', 2);
  const nbdkit = await startServer(t, { kind: 'nbdkit', images: [targetFile] });
  await startDaemon(t, { sandbox: src, password: false });
  const replica = addReplica(src, [device, '--to', nbdUri(nbdkit.socketPath), '--every', '1s']);
  assert.equal(replica.everyMs, 1000);
  await until('two scheduled syncs', () => events(src, 'replica-synced').length >= 2, 20_000, 50);
  assert.equal(await sha256File(targetFile), await sha256File(device));

  const paused = JSON.parse(ok(src, ['replica', 'pause', replica.id, '--json'])) as ReplicaInfo;
  assert.equal(paused.state, 'paused');
  assert.equal(paused.nextSyncAt, null, 'nothing scheduled while paused');
  const refused = cli(src, ['replica', 'sync', replica.id]);
  assert.notEqual(refused.status, 0);
  assert.match(refused.stderr, /paused: bdsnap replica resume/);

  const count = events(src, 'replica-synced').length;
  const resumed = JSON.parse(ok(src, ['replica', 'resume', replica.id, '--json'])) as ReplicaInfo;
  assert.notEqual(resumed.nextSyncAt, null);
  await until('a scheduled sync after resume', () => events(src, 'replica-synced').length > count, 20_000, 50);
  const listed = replicaList(src).replicas[0];
  assert.ok(listed && listed.lagMs !== null && listed.bytesSent >= DEVICE_BYTES);

  ok(src, ['replica', 'pause', replica.id]);
  ok(src, ['replica', 'remove', replica.id]);
  assert.deepEqual(replicaList(src).replicas, []);
  assert.match(ok(src, ['replica', 'list']), /no replicas/);
});

test('over TCP: nbd:// is refused without --insecure-tcp; with it, and the standby\'s run directory named, syncs go inside sessions there', { timeout: 120_000 }, async (t) => {
  const DEVICE_BYTES = 4 << 20;
  const src = sandbox(t, 'bdsnap-rep-src-');
  const dst = sandbox(t, 'bdsnap-rep-dst-');
  const device = makeImage(path.join(src.top, 'a.img'), DEVICE_BYTES, 'random', 1);
  const target = fs.realpathSync(makeImage(path.join(dst.top, 'a.img'), DEVICE_BYTES, 'random', 2));
  await startDaemon(t, { sandbox: src, password: false });
  const standby = await startDaemon(t, { sandbox: dst, activate: [target], logLevel: 'info', extraArgs: ['--listen', '127.0.0.1:0', '--insecure-tcp'] });
  const port = standby.logLines().find((l) => l.event === 'nbd-listening')?.port;
  assert.equal(typeof port, 'number');
  const uri = `nbd://127.0.0.1:${port}/${encodeURIComponent(target)}`;

  const clear = cli(src, ['replica', 'add', device, '--to', uri]);
  assert.notEqual(clear.status, 0);
  assert.match(clear.stderr, /in the clear: .*add --insecure-tcp/);
  const noCredentials = cli(src, ['replica', 'add', device, '--to', `nbds://127.0.0.1:${port}/x`]);
  assert.notEqual(noCredentials.status, 0);
  assert.match(noCredentials.stderr, /TLS needs one of tls-certificates=DIR/);

  const replica = addReplica(src, [device, '--to', uri, '--insecure-tcp', '--standby-run-dir', dst.runDir]);
  assert.equal(replica.targetKind, 'bdsnap');
  sync(src, replica.id);
  assert.equal(await sha256File(target), await sha256File(device));
  assert.equal(replicaList(dst).received[0]?.point, replicaList(src).replicas[0]?.lastComplete);
});

test('over TLS (nbds://): the standby\'s certificate is checked, and syncs go inside sessions there', { timeout: 120_000 }, async (t) => {
  const DEVICE_BYTES = 4 << 20;
  const src = sandbox(t, 'bdsnap-rep-src-');
  const dst = sandbox(t, 'bdsnap-rep-dst-');
  const pki = makePki(src.top);
  const device = makeImage(path.join(src.top, 'a.img'), DEVICE_BYTES, 'random', 1);
  const target = fs.realpathSync(makeImage(path.join(dst.top, 'a.img'), DEVICE_BYTES, 'random', 2));
  await startDaemon(t, { sandbox: src, password: false });
  const standby = await startDaemon(t, { sandbox: dst, activate: [target], logLevel: 'info', extraArgs: ['--listen', '127.0.0.1:0', '--tls-certificates', pki.server] });
  const port = standby.logLines().find((l) => l.event === 'nbd-listening')?.port;
  const uri = (ca: string): string => `nbds://127.0.0.1:${port}/${encodeURIComponent(target)}?tls-certificates=${encodeURIComponent(ca)}`;

  // A CA that did not sign the standby's certificate: the sync fails, nothing is written.
  const before = await sha256File(target);
  const rogue = addReplica(src, [device, '--to', uri(pki.untrusting), '--standby-run-dir', dst.runDir]);
  const refused = cli(src, ['replica', 'sync', rogue.id]);
  assert.notEqual(refused.status, 0);
  assert.match(refused.stderr, /TLS with the NBD server failed/);
  assert.equal(await sha256File(target), before);
  // Removed on the sender, it is let go on the standby too.
  ok(src, ['replica', 'remove', rogue.id]);
  assert.deepEqual(replicaList(dst).received, []);

  const replica = addReplica(src, [device, '--to', uri(pki.trusting), '--standby-run-dir', dst.runDir]);
  assert.equal(replica.targetKind, 'bdsnap');
  sync(src, replica.id);
  assert.equal(await sha256File(target), await sha256File(device));
  assert.equal(replicaList(dst).received[0]?.point, replicaList(src).replicas[0]?.lastComplete);
});

test('a target socket another user could replace is refused: whoever put a socket there would receive the devices', { timeout: 60_000 }, async (t) => {
  const src = sandbox(t, 'bdsnap-rep-src-');
  const device = makeImage(path.join(src.top, 'a.img'), 1 << 20, 'random', 1);
  const open = path.join(src.top, 'open');
  fs.mkdirSync(open);
  fs.chmodSync(open, 0o777);
  await startDaemon(t, { sandbox: src, password: false });
  const refused = cli(src, ['replica', 'add', device, '--to', nbdUri(path.join(open, 'nbd.sock'))]);
  assert.notEqual(refused.status, 0);
  assert.match(refused.stderr, /can be replaced by another user/);
  assert.deepEqual(replicaList(src).replicas, []);
});

/** The sessions of `device` under `box`'s snapshot root, and the bytes they take. */
async function sessionsOf(box: Sandbox, device: string): Promise<{ count: number; bytes: number }> {
  const listed = JSON.parse(ok(box, ['list', device, '--json'])) as { sessions: Array<{ dir: string }> };
  let bytes = 0;
  for (const s of listed.sessions) {
    for (const name of fs.readdirSync(s.dir)) bytes += fs.statSync(path.join(s.dir, name)).size;
  }
  return { count: listed.sessions.length, bytes };
}

test('a standby that stops answering: replica-lagging once past the threshold (3x --every by default), then replica-synced clears it', { timeout: 120_000 }, async (t) => {
  const DEVICE_BYTES = 4 << 20;
  const { src, dst, standby, device, target } = await oneDeviceEach(t, DEVICE_BYTES);
  t.after(() => {
    standby.server.kill('SIGCONT');
  });
  const replica = addReplica(src, [device, '--to', nbdUri(path.join(dst.runDir, 'nbd.sock'), target), '--every', '1s']);
  assert.equal(replica.laggingAfterMs, 3000, 'the default threshold is three intervals');
  await until('a scheduled sync', () => events(src, 'replica-synced').length >= 1, 20_000, 50);

  // The standby stops answering: syncs hang, the last complete point stays where it is.
  standby.server.kill('SIGSTOP');
  await until('replica-lagging', () => events(src, 'replica-lagging').length >= 1, 20_000, 50);
  const lagging = events(src, 'replica-lagging')[0]!;
  assert.equal(lagging.details.replica, replica.id);
  assert.ok(Number(lagging.details.lagMs) >= 3000, `lag at the event: ${String(lagging.details.lagMs)} ms`);
  // Twice the threshold later it is still one episode, one event.
  await until('the lag to pass twice the threshold', () => (replicaList(src).replicas[0]?.lagMs ?? 0) > 6000, 20_000, 50);
  assert.equal(events(src, 'replica-lagging').length, 1, 'announced once per lagging episode');
  const listed = replicaList(src).replicas[0]!;
  assert.equal(listed.lagging, true);
  assert.match(ok(src, ['replica', 'list']), /LAGGING/);
  const status = JSON.parse(ok(src, ['status', '--json'])) as { replicas: ReplicaInfo[] };
  assert.equal(status.replicas[0]?.lagging, true, 'status shows the lag too');
  assert.match(ok(src, ['status']), new RegExp(`replica ${replica.id}: .*lag \\d+s LAGGING`));

  standby.server.kill('SIGCONT');
  // The sync that hung completes a point from before the hang; the one after it catches up.
  await until('a sync that catches up', () => events(src, 'replica-synced').some((e) => e.details.caughtUp === true), 30_000, 50);
  assert.equal(events(src, 'replica-synced').filter((e) => e.details.caughtUp === true).length, 1, 'one sync ends the episode');
  assert.equal(replicaList(src).replicas[0]?.lagging, false);
  assert.equal(events(src, 'replica-lagging').length, 1);
  ok(src, ['replica', 'pause', replica.id]);
});

test('the standby forgets the sessions of committed syncs: many syncs leave a bounded standby, and a sync cut short still rolls back', { timeout: 180_000 }, async (t) => {
  const DEVICE_BYTES = 8 << 20;
  const CHANGE_BYTES = 64 << 10;
  const { src, dst, source, device, target } = await oneDeviceEach(t, DEVICE_BYTES);
  const replica = addReplica(src, [device, '--to', nbdUri(path.join(dst.runDir, 'nbd.sock'), target), '--limit-rate', '4M']);
  sync(src, replica.id);
  const counts: string[] = [];
  for (let round = 0; round < 8; round++) {
    // 1 MiB of changes in 16 places: one sync's session holds about that much.
    await writeThrough(src, device, Array.from({ length: 16 }, (_, i) => ({ offsetBytes: i * (DEVICE_BYTES / 16) + (round % 8) * CHANGE_BYTES, data: randomBytes(CHANGE_BYTES) })));
    const r = sync(src, replica.id);
    assert.equal(r.lastSync?.full, false);
    const { count, bytes } = await sessionsOf(dst, target);
    counts.push(`${count}/${bytes}`);
    assert.ok(count <= 1, `round ${round}: ${count} sessions of the target on the standby (${counts.join(' ')})`);
    assert.ok(bytes <= 4 << 20, `round ${round}: the standby's sessions take ${bytes} bytes (${counts.join(' ')})`);
  }
  await until('the last sync\'s sessions to be forgotten once the sender let go', async () => (await sessionsOf(dst, target)).count === 0, 20_000, 50);
  const complete = await sha256File(target);
  assert.equal(complete, await sha256File(device));
  t.diagnostic(`sessions/bytes after each sync: ${counts.join(' ')}`);

  // Cut short: the sync's own session is still there to undo it.
  await rewrite(src, device, DEVICE_BYTES);
  await syncUntilHalfway(source, dst, replica.id, target);
  source.server.kill('SIGKILL');
  await until('the standby to undo the sync', () => events(dst, 'replica-rolled-back').length === 1, 20_000, 50);
  assert.equal(await sha256File(target), complete, 'the standby is back at the last complete point');
  await until('the undone sync\'s sessions to be forgotten', async () => (await sessionsOf(dst, target)).count === 0, 20_000, 50);
});

test('replica remove reaches the standby: it keeps the last complete point as an ordinary device and lets go of the replica', { timeout: 120_000 }, async (t) => {
  const DEVICE_BYTES = 4 << 20;
  const { src, dst, standby, device, target } = await oneDeviceEach(t, DEVICE_BYTES);
  const uri = nbdUri(path.join(dst.runDir, 'nbd.sock'), target);
  const first = addReplica(src, [device, '--to', uri]);
  sync(src, first.id);
  await writeThrough(src, device, [{ offsetBytes: 0, data: randomBytes(1 << 20) }]);
  sync(src, first.id);
  const complete = await sha256File(target);
  assert.equal(complete, await sha256File(device));

  const removed = JSON.parse(ok(src, ['replica', 'remove', first.id, '--json'])) as { removed: boolean; standbyReleased: boolean };
  assert.equal(removed.standbyReleased, true);
  assert.deepEqual(replicaList(dst).received, [], 'the standby forgot the replica');
  assert.equal(await sha256File(target), complete, 'the standby keeps the last complete point');
  await until('no session held for the replica', async () => (await sessionsOf(dst, target)).count === 0, 20_000, 50);
  // An ordinary device of the standby: written under a session of its own, and free for a new replica.
  await writeThrough(dst, target, [{ offsetBytes: 0, data: randomBytes(4096) }]);
  const second = addReplica(src, [device, '--to', uri]);
  assert.equal(sync(src, second.id).state, 'idle', 'the device takes a new replica');
  assert.equal(await sha256File(target), await sha256File(device));

  // A standby that cannot be told: refused, unless --force; then removed on the standby by hand.
  await standby.server.stop();
  const refused = cli(src, ['replica', 'remove', second.id]);
  assert.notEqual(refused.status, 0);
  assert.match(refused.stderr, /standby cannot let go .*--force/);
  assert.equal(replicaList(src).replicas.length, 1);
  ok(src, ['replica', 'remove', second.id, '--force']);
  assert.deepEqual(replicaList(src).replicas, []);
  await startDaemon(t, { sandbox: dst, password: false });
  ok(dst, ['replica', 'remove', second.id]);
  assert.deepEqual(replicaList(dst).received, []);
});

test('a stopped standby (SIGSTOP): the sync fails within its timeout with a one-line reason, status says so, and after SIGCONT the next sync completes the standby', { timeout: 120_000 }, async (t) => {
  const DEVICE_BYTES = 16 << 20;
  const TIMEOUT_MS = 1000;
  const { src, dst, source, standby, device, target } = await oneDeviceEach(t, DEVICE_BYTES, { BDSNAP_REPLICA_TIMEOUT_MS: String(TIMEOUT_MS) });
  t.after(() => {
    standby.server.kill('SIGCONT');
  });
  const replica = addReplica(src, [device, '--to', nbdUri(path.join(dst.runDir, 'nbd.sock'), target), '--limit-rate', '4M']);
  sync(src, replica.id);
  let complete = await sha256File(target);
  assert.equal(complete, await sha256File(device));

  /** `replica sync` while the standby is stopped: it must fail, and soon (a hung sync is ended by the cli's own 60 s bound). */
  const failingSync = async (started: Promise<RunResult>, startedAtMs: number): Promise<void> => {
    const result = await started;
    const tookMs = performance.now() - startedAtMs;
    assert.notEqual(result.exitCode, 0, 'the sync against a stopped standby failed');
    assert.ok(tookMs < 15 * TIMEOUT_MS, `failed after ${Math.round(tookMs)} ms`);
    const lines = result.stderr.trim().split('\n');
    assert.equal(lines.length, 1, result.stderr);
    assert.match(lines[0]!, /the sync was cut short because the (bdsnap daemon .* did not answer|NBD server sent nothing)/);
    assert.match(lines[0]!, /stopped or hung; the standby keeps its last complete point: check the standby/);
    const listed = replicaList(src).replicas[0]!;
    assert.equal(listed.state, 'failed');
    assert.match(ok(src, ['status']), new RegExp(`replica ${replica.id}: failed, .*cut short`));
    const failed = events(src, 'replica-failed').at(-1)!;
    assert.equal(failed.details.code, 'ETIMEDOUT');
  };

  // Stopped before the sync: its begin is never answered.
  await rewrite(src, device, DEVICE_BYTES);
  standby.server.kill('SIGSTOP');
  const before = replicaList(src).replicas[0]!.lastComplete;
  await failingSync(source.cli(['replica', 'sync', replica.id], undefined, true), performance.now());
  assert.equal(replicaList(src).replicas[0]!.lastComplete, before, 'the last complete point did not move');
  standby.server.kill('SIGCONT');
  assert.equal(await sha256File(target), complete, 'the standby holds the last complete point');
  assert.equal(sync(src, replica.id).state, 'idle', 'the next sync works');
  complete = await sha256File(target);
  assert.equal(complete, await sha256File(device), 'and leaves the standby exact');

  // Stopped halfway through the copy: the writes are never answered.
  await rewrite(src, device, DEVICE_BYTES);
  const startedAtMs = performance.now();
  const running = source.cli(['replica', 'sync', replica.id], undefined, true);
  await until('the standby to receive part of the sync', () => {
    const status = JSON.parse(ok(dst, ['status', '--json'])) as { devices: Array<{ device: string; bytesPreserved: number }> };
    return (status.devices.find((d) => d.device === target)?.bytesPreserved ?? 0) >= 2 << 20;
  }, 20_000, 50);
  standby.server.kill('SIGSTOP');
  await failingSync(running, startedAtMs);
  standby.server.kill('SIGCONT');
  await until('the standby to undo the cut sync', () => replicaList(dst).received[0]?.receiving === false, 20_000, 50);
  assert.equal(await sha256File(target), complete, 'the standby is back at the last complete point');
  assert.equal(sync(src, replica.id).state, 'idle');
  assert.equal(await sha256File(target), await sha256File(device), 'the next sync leaves the standby exact');
});

test('two syncs back to back: the second waits for the standby to let go of the first instead of being refused', { timeout: 120_000 }, async (t) => {
  const DEVICE_BYTES = 64 << 20;
  const { src, dst, device, target } = await oneDeviceEach(t, DEVICE_BYTES);
  const replica = addReplica(src, [device, '--to', nbdUri(path.join(dst.runDir, 'nbd.sock'), target)]);
  // Straight from one control connection: no process start between the two.
  const client = await BdsnapClient.connect(src.runDir);
  try {
    for (let round = 0; round < 3; round++) {
      if (round > 0) await rewrite(src, device, DEVICE_BYTES);
      await client.request('replica-action', { action: 'sync', replica: replica.id });
      await writeThrough(src, device, [{ offsetBytes: 0, data: randomBytes(1 << 20) }]);
      const second = await client.request('replica-action', { action: 'sync', replica: replica.id }) as ReplicaInfo;
      assert.equal(second.state, 'idle', `round ${round}`);
    }
  } finally {
    client.close();
  }
  assert.equal(await sha256File(target), await sha256File(device));
});

test('a sync cut short by replica pause, or by the daemon stopping, says so, what the standby holds and how to go on, instead of "The operation was aborted"', { timeout: 180_000 }, async (t) => {
  const DEVICE_BYTES = 16 << 20;
  const { src, dst, source, device, target } = await oneDeviceEach(t, DEVICE_BYTES);
  // 4 MiB/s: a sync of the whole device takes four seconds, time to cut it halfway.
  const replica = addReplica(src, [device, '--to', nbdUri(path.join(dst.runDir, 'nbd.sock'), target), '--limit-rate', '4M']);
  const first = sync(src, replica.id);
  const complete = await sha256File(target);
  const point = first.lastComplete!;
  const pointText = point.replace(/[.]/g, '\\.');

  /** Start a sync in the background, cut it once the standby holds part of it, and return what the sync command said. */
  const cutSync = async (daemon: RunningDaemon, cut: () => Promise<void> | void): Promise<RunResult> => {
    await rewrite(src, device, DEVICE_BYTES);
    const running = daemon.cli(['replica', 'sync', replica.id], undefined, true);
    await until('the standby to receive part of the sync', () => {
      const status = JSON.parse(ok(dst, ['status', '--json'])) as { devices: Array<{ device: string; bytesPreserved: number }> };
      return (status.devices.find((d) => d.device === target)?.bytesPreserved ?? 0) >= 2 << 20;
    }, 20_000, 50);
    await cut();
    const result = await running;
    assert.notEqual(result.exitCode, 0, 'the cut sync did not complete');
    assert.equal(result.stderr.trim().split('\n').length, 1, `one line: ${result.stderr}`);
    assert.doesNotMatch(result.stderr, /operation was aborted/);
    return result;
  };

  let pauseSaid = '';
  const paused = await cutSync(source, () => void (pauseSaid = ok(src, ['replica', 'pause', replica.id])));
  const pausedText = new RegExp(`replica ${replica.id}: the sync was cut short because the replica was paused \\(bdsnap replica pause ${replica.id}\\); `
    + `the standby keeps its last complete point, ${pointText}: what it received of this sync is undone; `
    + `to go on, bdsnap replica resume ${replica.id}, then bdsnap replica sync ${replica.id}: it sends what changed since ${pointText} again`);
  assert.match(paused.stderr, pausedText, paused.stderr);
  const listed = replicaList(src).replicas[0]!;
  assert.equal(listed.state, 'paused');
  assert.match(listed.lastError ?? '', pausedText, 'list says why the last sync did not complete');
  assert.match(pauseSaid, new RegExp(`^replica ${replica.id}: paused \\(replica ${replica.id}: the sync was cut short because the replica was paused`), pauseSaid);
  assert.equal(events(src, 'replica-failed').at(-1)?.details.code, 'ESHUTDOWN');
  await until('the standby to undo the cut sync', () => replicaList(dst).received[0]?.receiving === false, 20_000, 50);
  assert.equal(await sha256File(target), complete, 'the standby is at the last complete point, as the message says');

  ok(src, ['replica', 'resume', replica.id]);
  const stopping = await cutSync(source, async () => void await source.server.stop());
  assert.match(stopping.stderr, new RegExp(`replica ${replica.id}: the sync was cut short because the daemon is stopping; the standby keeps its last complete point, ${pointText}: `
    + `what it received of this sync is undone; once the daemon is started again, bdsnap replica sync ${replica.id} sends what changed since ${pointText} again`), stopping.stderr);
  await until('the standby to undo the cut sync', () => replicaList(dst).received[0]?.receiving === false, 20_000, 50);
  assert.equal(await sha256File(target), complete, 'the standby is at the last complete point, as the message says');

  await startDaemon(t, { sandbox: src, password: false });
  assert.match(replicaList(src).replicas[0]?.lastError ?? '', /cut short because the daemon is stopping/, 'the reason is kept across the restart');
  assert.equal(sync(src, replica.id).state, 'idle', 'the next sync goes on');
  assert.equal(await sha256File(target), await sha256File(device));
});

test('a sync to a plain NBD target cut short by replica pause says the target holds part of it, marked incomplete, and how to go on', { timeout: 120_000 }, async (t) => {
  const plain = await plainReplica(t, ['--every', '1h']);
  const { src, device, targetFile, replica } = plain;
  const point = plain.first.lastComplete!.replace(/[.]/g, '\\.');
  const { result } = await plainSyncUnderway(plain);
  ok(src, ['replica', 'pause', replica.id]);
  const cut = await result;
  assert.notEqual(cut.exitCode, 0);
  assert.doesNotMatch(cut.stderr, /operation was aborted/);
  assert.match(cut.stderr, new RegExp(`replica ${replica.id}: the sync was cut short because the replica was paused \\(bdsnap replica pause ${replica.id}\\); `
    + `the target, a plain NBD server that cannot undo, holds part of this sync over the last complete point, ${point}, and stays marked incomplete until a sync finishes; `
    + `to go on, bdsnap replica resume ${replica.id}, then bdsnap replica sync ${replica.id} \\(or wait for its schedule, every 60m\\): it sends what changed since ${point} again`), cut.stderr);
  ok(src, ['replica', 'resume', replica.id]);
  assert.equal(sync(src, replica.id).state, 'idle');
  assert.equal(await sha256File(targetFile), await sha256File(device), 'the next sync completes the copy');
});
