/**
 * Instant restores through the real daemon and CLI: one started from a backup of an image the
 * daemon made, and what `status --json` says of a restore, polled for (status announces no
 * event).
 */

import path from 'node:path';
import type { TestContext } from 'node:test';
import type { InstantRestoreInfo } from '../../src/service/control-protocol.js';
import { startDaemon, type RunningDaemon } from '../../testkit/daemon.js';
import { makeImage } from '../../testkit/files.js';
import { until } from './poll.js';

export interface InstantRestoreSetup {
  daemon: RunningDaemon;
  /** The backed-up image, left as it was. */
  image: string;
  repoDir: string;
  /** The backup's id. */
  id: string;
  /** The restore's target, a new file. */
  out: string;
  /** Date.now() just before the restore was asked for. */
  startedMs: number;
}

/**
 * A daemon whose copy is held to `rate` (a --restore-rate value), a local repository with its
 * backup of a random image of `imageBytes` (from `seed`), and an instant restore of that
 * backup into a new file.
 */
export async function instantRestoreOfImage(t: TestContext, options: { rate: string; imageBytes: number; seed: number }): Promise<InstantRestoreSetup> {
  const daemon = await startDaemon(t, { password: false, extraArgs: ['--restore-rate', options.rate] });
  const top = daemon.sandbox.top;
  const image = makeImage(path.join(top, 'disk.img'), options.imageBytes, 'random', options.seed);
  const repoDir = path.join(top, 'repo');
  await daemon.cli(['backup', 'init', '--repo', repoDir]);
  const { id } = JSON.parse((await daemon.cli(['backup', 'create', image, '--repo', repoDir, '--json'])).stdout) as { id: string };
  const out = path.join(top, 'out.img');
  const startedMs = Date.now();
  await daemon.cli(['backup', 'restore', '--repo', repoDir, id, image, '--output', out, '--instant']);
  return { daemon, image, repoDir, id, out, startedMs };
}

/** The restores `status --json` lists. */
export async function restoresOf(daemon: RunningDaemon): Promise<InstantRestoreInfo[]> {
  return (JSON.parse((await daemon.cli(['status', '--json'])).stdout) as { restores: InstantRestoreInfo[] }).restores;
}

/** The restore of `target` that status lists, if any. */
export async function restoreOf(daemon: RunningDaemon, target: string): Promise<InstantRestoreInfo | undefined> {
  return (await restoresOf(daemon)).find((r) => r.target === target);
}

/** Until `ok` holds of the restore of `target` (undefined once it retired); that restore. */
export async function waitForRestore(daemon: RunningDaemon, target: string, what: string,
  ok: (r: InstantRestoreInfo | undefined) => boolean, timeoutMs = 60_000): Promise<InstantRestoreInfo | undefined> {
  let last: InstantRestoreInfo | undefined;
  await until(() => `${what}; last status ${JSON.stringify(last)}`, async () => ok(last = await restoreOf(daemon, target)), timeoutMs, 100);
  return last;
}
