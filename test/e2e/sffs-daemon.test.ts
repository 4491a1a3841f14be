/**
 * The course's grading flow through `bdsnap daemon`, all with real processes: format with
 * `bdsnap sffs mkfs`, write some content, take a checksum, set the password, activate; then
 * each `bdsnap sffs write <dev> <off> <text> --run-dir R` is one mount cycle (attach, write,
 * flush, detach) and gets its own session directory when it modifies something; `bdsnap
 * restore <oldest session of the round>` gives back the checksum taken before.
 * Plus the refusals: wrong password, no session for a device that is not active, none after
 * deactivation, and no restore while the daemon still has the device attached.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { FileDevice } from '../../src/device/file-device.js';
import { SingleFileFs } from '../../src/fs/singlefilefs/file.js';
import { NbdClient } from '../../src/nbd/client.js';
import { withClient } from '../../src/service/client.js';
import { listSessions } from '../../src/snapshot/index.js';
import { CleanupStack } from '../../testkit/cleanup.js';
import { startDaemon, TEST_PASSWORD, type RunningDaemon } from '../../testkit/daemon.js';
import { makeTempDir, sha256File } from '../../testkit/files.js';
import type { RunResult } from '../../testkit/process.js';
import { GRADING_SCENARIOS, sffsCliWriter, written, type SingleFileWriter } from '../sffs/scenarios.js';

interface ListedSession {
  dir: string;
  device: string;
  state: string;
}

interface RestoreJson {
  sessionsApplied: string[];
  digestCheck: string;
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** Sessions of `device` as `bdsnap list --json` shows them, oldest first. */
async function listed(daemon: RunningDaemon, device: string): Promise<ListedSession[]> {
  const out = await daemon.cli(['list', device, '--json', '--run-dir', daemon.runDir]);
  return (JSON.parse(out.stdout) as { sessions: ListedSession[] }).sessions;
}

/**
 * A session ends (durably) after its last client has gone, a moment after the CLI returned.
 * Wait until the daemon no longer lists the device as attached and no session of it is still
 * 'active' on disk: status drops the attachment before the session is closed, and the device
 * file (and its lock) is let go only after the manifest says 'complete'.
 */
async function waitDetached(daemon: RunningDaemon, device: string): Promise<void> {
  const deadlineMs = Date.now() + 15_000;
  for (;;) {
    const status = await withClient(daemon.runDir, (c) => c.status());
    const entry = status.devices.find((d) => d.device === device);
    const open = (await listSessions(daemon.snapshotRoot, device)).filter((s) => s.state === 'active');
    if (entry !== undefined && !entry.attached && open.length === 0) return;
    if (Date.now() > deadlineMs) {
      throw new Error(`${device} still attached or in session after 15 s: ${JSON.stringify(entry)} ${JSON.stringify(open.map((s) => s.dir))}\n${daemon.server.stderr()}`);
    }
    await sleep(25);
  }
}

/** Exit status not 0 and exactly one non-empty line on stderr. */
function assertRefused(result: RunResult, pattern: RegExp, what: string): void {
  assert.notEqual(result.exitCode, 0, `${what} must fail:\n${result.stdout}`);
  const lines = result.stderr.split('\n').filter((l) => l.trim() !== '');
  assert.equal(lines.length, 1, `${what}: one line on stderr, got:\n${result.stderr}`);
  assert.match(lines[0] as string, pattern, `${what}: ${result.stderr}`);
}

/**
 * `bdsnap sffs mkfs`, then the scenario's content written offline (before activation) through
 * the same SingleFileFs code `sffs write --image` runs, in-process to spare a process per write.
 */
async function formatAndPrepare(daemon: RunningDaemon, image: string, scenario: (typeof GRADING_SCENARIOS)[number]): Promise<void> {
  await daemon.cli(['sffs', 'mkfs', image, '--blocks', String(scenario.imageBlocks)]);
  const file = await FileDevice.open(image);
  try {
    const offline = await SingleFileFs.open(file);
    await scenario.prepare(offline);
    await offline.flush();
  } finally {
    await file.close();
  }
}

// The scenarios use one image each, so they run side by side against one daemon.
test('grading scenarios through the daemon: a session per write cycle, restore of the oldest gives back the checksum', { timeout: 240_000, concurrency: true }, async (t) => {
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup, 'bdsnap-e2e-daemon-');
  const daemon = await startDaemon(cleanup);

  await Promise.all(GRADING_SCENARIOS.map((scenario, i) =>
    t.test(scenario.name, async () => {
      const image = path.join(dir, `scenario-${i}.img`);
      await formatAndPrepare(daemon, image, scenario);
      const device = fs.realpathSync(image);
      const checksumBefore = await sha256File(image);
      await daemon.cli(['activate', device, '--password-stdin'], `${TEST_PASSWORD}\n`);
      assert.deepEqual(await listSessions(daemon.snapshotRoot, device), [], 'no session before the first mount');

      let modifyingWrites = 0;
      const perWrite = sffsCliWriter(['--run-dir', daemon.runDir], device);
      const counting: SingleFileWriter = {
        async write(offsetBytes, data) {
          const n = await perWrite.write(offsetBytes, data);
          if (n > 0) modifyingWrites++;
          return n;
        },
      };
      await scenario.run(counting);
      await waitDetached(daemon, device);
      const sessions = await listed(daemon, device);

      if (scenario.changedBlocks.length === 0) {
        assert.equal(modifyingWrites, 0);
        assert.deepEqual(sessions, [], 'a mount cycle that modifies nothing leaves no session directory');
        assert.equal(await sha256File(image), checksumBefore);
        return;
      }
      assert.notEqual(await sha256File(image), checksumBefore, 'the writes reached the image');
      if (scenario.name === 'several writers at once') {
        // Concurrent processes may share one attach (and so one session).
        assert.ok(sessions.length >= 1 && sessions.length <= modifyingWrites, `${sessions.length} sessions for ${modifyingWrites} concurrent writers`);
      } else {
        assert.equal(sessions.length, modifyingWrites, 'one new session directory per modifying write cycle');
      }
      assert.equal(new Set(sessions.map((s) => s.dir)).size, sessions.length, 'distinct directories');
      for (const s of sessions) {
        assert.equal(s.state, 'complete', `${s.dir} closed cleanly`);
        assert.equal(s.device, device);
        assert.equal(path.dirname(s.dir), daemon.snapshotRoot);
      }

      const oldest = sessions[0] as ListedSession;
      const restored = await daemon.cli(['restore', oldest.dir, '--json']);
      const summary = JSON.parse(restored.stdout) as RestoreJson;
      assert.deepEqual(summary.sessionsApplied, sessions.map((s) => s.dir).reverse(), 'newer sessions applied first, the oldest last');
      assert.equal(summary.digestCheck, 'verified');
      assert.equal(await sha256File(image), checksumBefore, 'restore of the oldest session gives back the checksum taken before');
    })));
});

test('daemon refusals: wrong password, inactive devices, deactivation, restore while attached', { timeout: 120_000 }, async (t) => {
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup, 'bdsnap-e2e-daemon-');
  const daemon = await startDaemon(cleanup);
  const scenario = GRADING_SCENARIOS[0]!;
  const image = path.join(dir, 'disk.img');
  await formatAndPrepare(daemon, image, scenario);
  const device = fs.realpathSync(image);
  const sessionDirs = async (): Promise<string[]> => (await listSessions(daemon.snapshotRoot)).map((s) => s.dir);
  const writeViaDaemon = (offset: number, text: string, allowFailure = false): Promise<RunResult> =>
    daemon.cli(['sffs', 'write', device, String(offset), text, '--run-dir', daemon.runDir], undefined, allowFailure);

  // Wrong password: refused with one line, nothing activated.
  const wrong = await daemon.cli(['activate', device, '--password-stdin'], 'not the password\n', true);
  assertRefused(wrong, /password/i, 'activate with a wrong password');
  const statusAfterWrong = await withClient(daemon.runDir, (c) => c.status());
  assert.equal(statusAfterWrong.devices.find((d) => d.device === device)?.active ?? false, false, 'a refused activate arms nothing');

  // Never activated: like `mount`, the write cycle registers the device, which is then served
  // without a session: the write lands and no session directory appears.
  const statusBefore = await withClient(daemon.runDir, (c) => c.status());
  assert.equal(statusBefore.devices.some((d) => d.device === device), false, 'not registered before the first write');
  const inactiveImage = await sha256File(image);
  await writeViaDaemon(0, 'NOPE');
  await waitDetached(daemon, device);
  assert.notEqual(await sha256File(image), inactiveImage, 'the write to a never-activated device reached it');
  const registered = (await withClient(daemon.runDir, (c) => c.status())).devices.find((d) => d.device === device);
  assert.equal(registered?.active, false, 'registered by the write, and inactive');
  assert.deepEqual(await sessionDirs(), [], 'no session for a device that is not active');
  const cat = await daemon.cli(['sffs', 'cat', device, '--run-dir', daemon.runDir]);
  assert.match(cat.stdout, /^NOPE/, 'sffs cat through the daemon reads what the write cycle wrote');

  // Active: one directory per write cycle.
  await daemon.cli(['activate', device, '--password-stdin'], `${TEST_PASSWORD}\n`);
  const checksumBefore = await sha256File(image);
  const seen: string[] = [];
  for (const [k, offset] of [0, 10, 100].entries()) {
    await writeViaDaemon(offset, written(8, k).toString('latin1'));
    await waitDetached(daemon, device);
    const now = await sessionDirs();
    assert.equal(now.length, seen.length + 1, `write cycle ${k + 1} adds exactly one session directory`);
    seen.splice(0, seen.length, ...now);
  }
  const afterActive = await sha256File(image);

  // Restore refused while the daemon has the device attached (an NBD client holds it).
  const holder = await NbdClient.connect({ socketPath: daemon.server.socketPath, exportName: device });
  cleanup.after(() => holder.close());
  const held = await withClient(daemon.runDir, (c) => c.status());
  assert.equal(held.devices.find((d) => d.device === device)?.attached, true, 'the open connection attaches the device');
  const busy = await daemon.cli(['restore', seen[0] as string], undefined, true);
  assertRefused(busy, /busy|in use|attached|already open/i, 'restore while attached');
  assert.equal(await sha256File(image), afterActive, 'a refused restore writes nothing');
  await holder.close();
  await waitDetached(daemon, device);
  assert.deepEqual(await sessionDirs(), seen, 'a connection that only looked made no session');

  // Deactivated: writes go through, no new directory.
  await daemon.cli(['deactivate', device, '--password-stdin'], `${TEST_PASSWORD}\n`);
  await writeViaDaemon(20, 'after deactivation');
  await waitDetached(daemon, device);
  assert.deepEqual(await sessionDirs(), seen, 'no new session directory after deactivate');
  const changedOutside = await sha256File(image);
  assert.notEqual(changedOutside, afterActive, 'the write after deactivation reached the image');

  // That write happened outside any session: restore refuses rather than produce a wrong image.
  const mismatch = await daemon.cli(['restore', seen[0] as string], undefined, true);
  assertRefused(mismatch, /changed outside|digest|not in the state/i, 'restore after an unrecorded change');
  assert.equal(await sha256File(image), changedOutside, 'a refused restore writes nothing');
  // --force skips only the digest check. The unrecorded write fell in the chunk the sessions
  // preserved (chunk 0 of 64 KiB), so the originals cover it and the checksum comes back.
  await daemon.cli(['restore', seen[0] as string, '--force']);
  assert.equal(await sha256File(image), checksumBefore, 'restore --force gives back the checksum taken before activation');
});
