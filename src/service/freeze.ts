/**
 * Filesystem freeze around a snapshot's barrier: `fsfreeze` (util-linux) issues FIFREEZE and
 * FITHAW on a mount point. FIFREEZE writes the filesystem's dirty data and journal out and
 * blocks new changes, so an image taken while it holds mounts clean.
 *
 * It runs as a child process on purpose: the writes a freeze flushes travel back into this
 * very daemon (loop device -> nbdfuse -> NBD), so the event loop must stay free to serve
 * them while the freeze waits.
 */

import { BdsnapError } from '../errors.js';
import { runTool } from '../host/run-tool.js';

const FREEZE_TIMEOUT_MS = 60_000;

async function fsfreeze(flag: '--freeze' | '--unfreeze', mountpoint: string): Promise<void> {
  const what = `cannot ${flag === '--freeze' ? 'freeze' : 'thaw'} the filesystem on ${mountpoint}`;
  await runTool('fsfreeze', [flag, mountpoint], { timeoutMs: FREEZE_TIMEOUT_MS, what });
}

/**
 * Freeze every mount point, run `fn`, and thaw them all whatever happens. A failed freeze
 * thaws the ones already frozen and throws before `fn` runs.
 */
export async function withFrozen<T>(mountpoints: string[], fn: () => Promise<T>): Promise<T> {
  const frozen: string[] = [];
  let outcome: { value: T } | { error: unknown };
  try {
    for (const mp of mountpoints) {
      await fsfreeze('--freeze', mp);
      frozen.push(mp);
    }
    outcome = { value: await fn() };
  } catch (err) {
    outcome = { error: err };
  }
  const problems: string[] = [];
  for (const mp of frozen.reverse()) {
    await fsfreeze('--unfreeze', mp).catch((err: unknown) => problems.push((err as Error).message));
  }
  if ('error' in outcome) throw outcome.error;
  // A thaw that failed leaves a filesystem blocked: the caller must hear of it.
  if (problems.length > 0) throw new BdsnapError('EIO', problems.join('; '));
  return outcome.value;
}
