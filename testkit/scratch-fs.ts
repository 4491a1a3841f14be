/**
 * A real kernel filesystem made in a sparse file and loop-mounted, for the tests and bench
 * rows that need a given filesystem under them: XFS with reflink (clones), ext4 (none).
 *
 * Every step registers its undo on the cleanup stack as soon as it succeeded, so a failure
 * anywhere (and the end of the test) unmounts, detaches the loop device and removes the file,
 * top first.
 */

import fs from 'node:fs';
import path from 'node:path';
import { mountDevice } from './kernel.js';
import type { Needs } from './needs.js';
import { run } from './process.js';
import type { CleanupStack } from './cleanup.js';

export type ScratchFsKind = 'xfs' | 'ext4';

const MKFS: Record<ScratchFsKind, [string, string[]]> = {
  // reflink=1 is mkfs.xfs's default now; asked for explicitly so that an older one gives it too.
  xfs: ['mkfs.xfs', ['-q', '-f', '-m', 'reflink=1']],
  ext4: ['mkfs.ext4', ['-q', '-F', '-m', '0', '-E', 'lazy_itable_init=0,lazy_journal_init=0']],
};

/** mkfs.xfs refuses filesystems smaller than 300 MiB. */
export const MIN_SCRATCH_FS_BYTES = 320 * 2 ** 20;

/** What `mountScratchFs` needs, for `needs(t, ...)`. */
export function scratchFsNeeds(kind: ScratchFsKind): Needs {
  return { root: true, tools: [MKFS[kind][0], 'losetup', 'mount', 'umount'] };
}

/**
 * Make a `kind` filesystem of `sizeBytes` in `dir/<kind>.img` (sparse), mount it on
 * `dir/<kind>` through a loop device and return the mount point. `cleanup` undoes it all, in
 * reverse order (node:test's own after hooks would run in the order added).
 */
export async function mountScratchFs(cleanup: CleanupStack, dir: string, kind: ScratchFsKind, sizeBytes: number): Promise<string> {
  const image = path.join(dir, `${kind}.img`);
  fs.writeFileSync(image, '');
  cleanup.after(() => fs.rmSync(image, { force: true }));
  fs.truncateSync(image, Math.max(sizeBytes, MIN_SCRATCH_FS_BYTES));
  const [mkfs, args] = MKFS[kind];
  await run(mkfs, [...args, image]);
  const loop = (await run('losetup', ['--find', '--show', image])).stdout.trim();
  cleanup.after(() => run('losetup', ['-d', loop]));
  const mountPoint = path.join(dir, kind);
  fs.mkdirSync(mountPoint, { recursive: true });
  // Not recursive: if the unmount failed, the filesystem's files stay where they are.
  cleanup.after(() => fs.rmdirSync(mountPoint));
  cleanup.after(await mountDevice(loop, mountPoint));
  return mountPoint;
}
