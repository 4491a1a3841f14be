/**
 * The mounts file a dead daemon left behind: validated (a bad file is reported as an error and
 * kept aside, never skipped in silence), and a recorded nbdfuse pid is signalled only while it
 * is still that nbdfuse (same start time, same command line).
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { pino } from 'pino';
import { cleanUpStaleMounts, readMountRecords, whyNotOurNbdfuse, type MountRecordOnDisk } from '../../src/service/mount.js';
import { processStartTime } from '../../src/host/processes.js';
import { BdsnapError } from '../../src/errors.js';
import { makeTempDir } from '../../testkit/files.js';

interface LogLine {
  level: number;
  event?: string;
  problems?: string[];
  reason?: string;
  keptAs?: string | null;
}

function captureLog(): { log: pino.Logger; lines: LogLine[] } {
  const lines: LogLine[] = [];
  const log = pino({ level: 'debug' }, { write: (s: string) => { lines.push(JSON.parse(s) as LogLine); } });
  return { log, lines };
}

/** A long-running process whose argv looks like `nbdfuse ... <fuseDir>/disk` (or not). */
function fakeProcess(t: { after: (fn: () => unknown) => void }, argv0: string, disk: string): ChildProcess {
  const child = spawn(process.execPath, ['-e', 'setInterval(() => {}, 1e6)', disk], { argv0, stdio: 'ignore' });
  t.after(() => child.kill('SIGKILL'));
  return child;
}

function exited(child: ChildProcess, withinMs: number): Promise<boolean> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(true);
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(false), withinMs);
    child.once('exit', () => { clearTimeout(timer); resolve(true); });
  });
}

function record(dir: string, name: string, pid: number | null, startTime: string | null | undefined): MountRecordOnDisk {
  const mountpoint = path.join(dir, `${name}-mnt`);
  const fuseDir = path.join(dir, `${name}-fuse`);
  fs.mkdirSync(mountpoint);
  fs.mkdirSync(fuseDir);
  const r: MountRecordOnDisk = { device: path.join(dir, `${name}.img`), mountpoint, blockDevice: '/dev/loop999999', via: 'nbdfuse', fuseDir, nbdfusePid: pid };
  if (startTime !== undefined) r.nbdfuseStartTime = startTime;
  return r;
}

test('a mounts file that does not parse or validate is reported as an error and kept aside', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-mounts-');
  const file = path.join(dir, 'mounts.json');
  const cases: Array<[string, string, RegExp]> = [
    ['not JSON', '[{"device": ', /not valid JSON/],
    ['not a list', '{"device": "/x"}', /not a list of mount records/],
    ['pid of the wrong type', JSON.stringify([{ device: '/x', mountpoint: '/m', blockDevice: '/dev/loop0', via: 'nbdfuse', fuseDir: '/f', nbdfusePid: '12' }]), /nbdfusePid/],
    ['unknown way of attaching', JSON.stringify([{ device: '/x', mountpoint: '/m', blockDevice: '/dev/loop0', via: 'iscsi', fuseDir: null, nbdfusePid: null }]), /via/],
  ];
  for (const [name, text, message] of cases) {
    fs.writeFileSync(file, text);
    await assert.rejects(readMountRecords(file), (e: unknown) => e instanceof BdsnapError && e.code === 'ECORRUPT' && message.test(e.message), name);
    const { log, lines } = captureLog();
    await cleanUpStaleMounts(file, log);
    const line = lines.find((l) => l.event === 'mounts-file-invalid');
    assert.ok(line, `${name}: logged`);
    assert.ok(line.level >= 50, `${name}: at error level`);
    assert.match(line.reason ?? '', message);
    assert.equal(fs.existsSync(file), false, `${name}: moved out of the way`);
    assert.equal(fs.readFileSync(`${file}.invalid`, 'utf8'), text, `${name}: kept for the operator`);
  }
  // No file at all: nothing to do, nothing logged.
  fs.rmSync(`${file}.invalid`);
  const { log, lines } = captureLog();
  await cleanUpStaleMounts(file, log);
  assert.deepEqual(lines, []);
});

test('a recorded nbdfuse pid is signalled only while it is still that nbdfuse', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-mounts-');
  const file = path.join(dir, 'mounts.json');

  const ours = record(dir, 'ours', null, null);
  const oursChild = fakeProcess(t, 'nbdfuse', path.join(ours.fuseDir!, 'disk'));
  ours.nbdfusePid = oursChild.pid!;
  ours.nbdfuseStartTime = await processStartTime(oursChild.pid!);

  // Same pid reused by another program: a different command line.
  const other = record(dir, 'other', null, null);
  const otherChild = fakeProcess(t, 'sleep', path.join(other.fuseDir!, 'disk'));
  other.nbdfusePid = otherChild.pid!;
  other.nbdfuseStartTime = await processStartTime(otherChild.pid!);

  // An nbdfuse with the right command line but another start time: a reused pid.
  const reused = record(dir, 'reused', null, null);
  const reusedChild = fakeProcess(t, 'nbdfuse', path.join(reused.fuseDir!, 'disk'));
  reused.nbdfusePid = reusedChild.pid!;
  reused.nbdfuseStartTime = '1';

  // Another daemon's nbdfuse: right name, start time, but another FUSE file.
  const elsewhere = record(dir, 'elsewhere', null, null);
  const elsewhereChild = fakeProcess(t, 'nbdfuse', path.join(dir, 'someone-else', 'disk'));
  elsewhere.nbdfusePid = elsewhereChild.pid!;
  elsewhere.nbdfuseStartTime = await processStartTime(elsewhereChild.pid!);

  // A file from before start times were recorded: never signalled.
  const legacy = record(dir, 'legacy', null, undefined);
  const legacyChild = fakeProcess(t, 'nbdfuse', path.join(legacy.fuseDir!, 'disk'));
  legacy.nbdfusePid = legacyChild.pid!;

  assert.equal(await whyNotOurNbdfuse(ours), null);
  assert.match((await whyNotOurNbdfuse(other)) ?? '', /is not the nbdfuse/);
  assert.match((await whyNotOurNbdfuse(reused)) ?? '', /pid was reused/);
  assert.match((await whyNotOurNbdfuse(elsewhere)) ?? '', /is not the nbdfuse/);
  assert.match((await whyNotOurNbdfuse(legacy)) ?? '', /no start time recorded/);

  fs.writeFileSync(file, JSON.stringify([ours, other, reused, elsewhere, legacy]));
  const { log, lines } = captureLog();
  await cleanUpStaleMounts(file, log);

  assert.equal(await exited(oursChild, 5000), true, 'our nbdfuse is stopped');
  for (const [name, child] of [['other', otherChild], ['reused', reusedChild], ['elsewhere', elsewhereChild], ['legacy', legacyChild]] as const) {
    assert.equal(await exited(child, 300), false, `${name}: not signalled`);
  }
  const cleaned = lines.filter((l) => l.event === 'stale-mount-cleaned');
  assert.equal(cleaned.length, 5, 'every record is reported');
  assert.deepEqual(cleaned[0]!.problems, [], 'our own mount cleaned without problems');
  for (const l of cleaned.slice(1)) assert.match((l.problems ?? []).join('; '), /not signalled/);
  assert.equal(fs.existsSync(file), false, 'the file is removed once handled');
  assert.equal(fs.existsSync(ours.fuseDir!), false, 'the FUSE directory is removed');
});
