/**
 * A standby device changed around bdsnap between two syncs (written in place with dd, or
 * replaced by another file moved onto its name) is not built on: the standby says it is no
 * longer at a complete point (list, failover), the next sync sends the device whole and leaves
 * it byte for byte the source, and the sync after that is incremental again. Two real daemons,
 * the real CLI; every command has a short deadline.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { NbdClient } from '../../src/nbd/client.js';
import type { ReceivedReplicaInfo, ReplicaInfo } from '../../src/service/control-protocol.js';
import { BDSNAP_MAIN } from '../../testkit/bdsnap-cli.js';
import { sandbox, startDaemon, type Sandbox } from '../../testkit/daemon.js';
import { makeImage, sha256File } from '../../testkit/files.js';
import { nbdUri } from '../../testkit/server.js';

const DEVICE_BYTES = 16 << 20;
const COMMAND_TIMEOUT_MS = 30_000;

function run(box: Sandbox, args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [BDSNAP_MAIN, ...args], { encoding: 'utf8', env: box.env, timeout: COMMAND_TIMEOUT_MS });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

function ok(box: Sandbox, args: string[]): string {
  const r = run(box, args);
  if (r.status !== 0) throw new Error(`bdsnap ${args.join(' ')} exited ${r.status}: ${r.stderr}`);
  return r.stdout;
}

function sync(box: Sandbox, id: string): ReplicaInfo {
  return JSON.parse(ok(box, ['replica', 'sync', id, '--json'])) as ReplicaInfo;
}

function received(box: Sandbox): ReceivedReplicaInfo {
  const listed = JSON.parse(ok(box, ['replica', 'list', '--json'])) as { received: ReceivedReplicaInfo[] };
  assert.equal(listed.received.length, 1);
  return listed.received[0]!;
}

async function writeThrough(box: Sandbox, device: string, offsetBytes: number, data: Buffer): Promise<void> {
  const client = await NbdClient.connect({ socketPath: path.join(box.runDir, 'nbd.sock'), exportName: device, timeoutMs: COMMAND_TIMEOUT_MS });
  try {
    await client.write(data, offsetBytes);
    await client.flush();
  } finally {
    await client.close();
  }
}

/** Two daemons, a 16 MiB source device and its standby target, synced once (identical). */
async function syncedPair(t: Parameters<typeof sandbox>[0]) {
  const src = sandbox(t, 'bdsnap-sbc-src-');
  const dst = sandbox(t, 'bdsnap-sbc-dst-');
  src.env.BDSNAP_REPLICA_TIMEOUT_MS = '10000';
  fs.mkdirSync(path.join(dst.top, 'sb'));
  const device = makeImage(path.join(src.top, 'a.img'), DEVICE_BYTES, 'random', 1);
  const target = makeImage(path.join(dst.top, 'sb', 'a.img'), DEVICE_BYTES, 'random', 2);
  await startDaemon(t, { sandbox: src, password: false });
  await startDaemon(t, { sandbox: dst, activate: [target] });
  const snap = JSON.parse(ok(src, ['snapshot', 'create', device, '--json'])) as { id: string };
  ok(src, ['snapshot', 'destroy', snap.id]);
  const uri = nbdUri(path.join(dst.runDir, 'nbd.sock'), `${path.join(fs.realpathSync(dst.top), 'sb')}/`);
  const replica = JSON.parse(ok(src, ['replica', 'add', device, '--to', uri, '--json'])) as ReplicaInfo;
  const first = sync(src, replica.id);
  assert.equal(first.lastSync?.full, true);
  assert.equal(await sha256File(target), await sha256File(device), 'the first sync leaves the standby identical');
  assert.equal(received(dst).broken, null);
  return { src, dst, device, target, id: replica.id };
}

/**
 * After the standby's device was changed around bdsnap: it is no complete point any more,
 * failover refuses it, and the next sync (after a write to the source) sends it whole and leaves
 * it identical; the one after is incremental again.
 */
async function nextSyncsRepairIt(pair: Awaited<ReturnType<typeof syncedPair>>): Promise<void> {
  const { src, dst, device, target, id } = pair;
  assert.notEqual(await sha256File(target), await sha256File(device), 'the standby was changed');
  const listed = received(dst);
  assert.match(String(listed.broken), /outside bdsnap/, 'the standby no longer lists a complete point');
  assert.match(ok(dst, ['replica', 'list']), /not at a complete point/);
  const failover = run(dst, ['replica', 'failover', id]);
  assert.notEqual(failover.status, 0, `failover onto a changed standby is refused: ${failover.stdout}`);
  assert.match(failover.stderr, /not at a complete point.*outside bdsnap/);

  await writeThrough(src, device, 1 << 20, randomBytes(4096));
  const repaired = run(src, ['replica', 'sync', id, '--json']);
  if (repaired.status === 0) {
    const info = JSON.parse(repaired.stdout) as ReplicaInfo;
    assert.equal(await sha256File(target), await sha256File(device), `a sync that succeeds leaves the standby identical (last sync: ${info.lastSync?.full ? 'full' : 'incremental'}, ${info.lastSync?.why})`);
    assert.equal(info.lastSync?.full, true);
    assert.match(String(info.lastSync?.why), /standby's copy must be sent whole.*outside bdsnap/);
  } else {
    assert.fail(`the sync after the change failed instead of sending the device whole: ${repaired.stderr}`);
  }
  assert.equal(received(dst).broken, null, 'a committed sync makes it a complete point again');

  await writeThrough(src, device, 3 << 20, randomBytes(4096));
  const after = sync(src, id);
  assert.equal(after.lastSync?.full, false, String(after.lastSync?.why));
  assert.equal(await sha256File(target), await sha256File(device));
}

test('a standby written in place around bdsnap (dd) between syncs: refused for failover, the next sync sends it whole and leaves it identical', { timeout: 90_000 }, async (t) => {
  const pair = await syncedPair(t);
  const dd = spawnSync('dd', ['if=/dev/urandom', `of=${pair.target}`, 'bs=1M', 'count=1', 'seek=10', 'conv=notrunc'], { encoding: 'utf8', timeout: COMMAND_TIMEOUT_MS });
  assert.equal(dd.status, 0, dd.stderr);
  await nextSyncsRepairIt(pair);
});

test('a standby replaced around bdsnap (another file moved onto its name) between syncs: refused for failover, the next sync sends it whole and leaves it identical', { timeout: 90_000 }, async (t) => {
  const pair = await syncedPair(t);
  const copy = `${pair.target}.new`;
  fs.copyFileSync(pair.target, copy);
  const fd = fs.openSync(copy, 'r+');
  try {
    fs.writeSync(fd, randomBytes(1 << 20), 0, 1 << 20, 10 << 20);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(copy, pair.target);
  await nextSyncsRepairIt(pair);
});
