/**
 * A device held still by an as-of view (`<device>@asof:<mount time>`, open while an NBD client
 * reads it): a restore of the device (of a session, of a backup in place or instant) is refused
 * naming the view and how it ends (its clients let go: there is no command that closes one),
 * not umount or snapshot destroy, and status shows the view under its device. Through the real
 * daemon and CLI, the view's client a real NBD client.
 */

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { test } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import type { StatusResult } from '../../src/service/control-protocol.js';
import { TEST_PASSWORD, startDaemon } from '../../testkit/daemon.js';
import { makeImage } from '../../testkit/files.js';
import { until } from '../helpers/poll.js';

const MiB = 1024 * 1024;

test('a restore refused while an as-of view holds the device names the view and says its clients must let go', { timeout: 120_000 }, async (t) => {
  const daemon = await startDaemon(t);
  const device = makeImage(path.join(daemon.sandbox.top, 'a.img'), 8 * MiB, 'random', 41);
  await daemon.cli(['activate', device, '--password-stdin'], `${TEST_PASSWORD}\n`);
  const repoDir = path.join(daemon.sandbox.top, 'repo');
  await daemon.cli(['backup', 'init', '--repo', repoDir]);
  const { id } = JSON.parse((await daemon.cli(['backup', 'create', device, '--repo', repoDir, '--json'])).stdout) as { id: string };
  // One session: a write through the daemon.
  const socketPath = path.join(daemon.runDir, 'nbd.sock');
  const writer = await NbdClient.connect({ socketPath, exportName: device });
  await writer.write(randomBytes(MiB), 2 * MiB);
  await writer.flush();
  await writer.close();
  const [session] = (JSON.parse((await daemon.cli(['list', device, '--json'])).stdout) as { sessions: Array<{ dir: string; mountTime: string; state: string }> }).sessions;
  assert.equal(session?.state, 'complete', `the session ended: ${JSON.stringify(session)}`);
  const view = `${device}@asof:${session.mountTime}`;

  const reader = await NbdClient.connect({ socketPath, exportName: view });
  try {
    const names = new RegExp(`is in use: served as it was at ${session.mountTime.replace(/[.]/g, '\\.')} by the as-of view ${view.replace(/[.]/g, '\\.')} \\(1 NBD client\\(s\\)\\), which needs the device still; `
      + 'the view ends when its last client lets go: disconnect its 1 NBD client\\(s\\)');
    for (const args of [['restore', session.dir], ['backup', 'restore', '--repo', repoDir, id, device], ['backup', 'restore', '--repo', repoDir, id, device, '--instant']]) {
      const refused = await daemon.cli(args, undefined, true);
      assert.notEqual(refused.exitCode, 0, `${args.join(' ')} is refused while the view is open`);
      assert.equal(refused.stderr.trim().split('\n').length, 1, `one line: ${refused.stderr}`);
      assert.match(refused.stderr, names, `${args.join(' ')}: ${refused.stderr}`);
      assert.doesNotMatch(refused.stderr, /umount|snapshot destroy|destroy its snapshots/, refused.stderr);
    }

    const status = JSON.parse((await daemon.cli(['status', '--json'])).stdout) as StatusResult;
    assert.deepEqual(status.devices.find((d) => d.device === device)?.asOfViews, [{ exportName: view, mountTime: session.mountTime, connections: 1, mountpoint: null }], 'status shows the view under its device');
    assert.match((await daemon.cli(['status'])).stdout, new RegExp(`^${view.replace(/[.]/g, '\\.')} +- +1 conn`, 'm'));
  } finally {
    await reader.close();
  }
  // As said: once its client let go, the view is gone and the restore goes ahead.
  await until('the view to end once its client let go', async () => {
    const status = JSON.parse((await daemon.cli(['status', '--json'])).stdout) as StatusResult;
    return status.devices.find((d) => d.device === device)?.asOfViews?.length === 0;
  }, 10_000, 50);
  const restored = await daemon.cli(['restore', session.dir], undefined, true);
  assert.equal(restored.exitCode, 0, restored.stderr);
});
