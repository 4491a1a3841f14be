/**
 * Kernel ext4 for the tests that mount through the daemon: the image, a mount point never left
 * mounted, and a filesystem kept busy while a test copies it (snapshots, replicas): a workload
 * in its own process writes files `w/f1`, `w/f2`, … one after another, each the line
 * "file <n>" repeated to FILE_BYTES, so a copy taken at one moment must hold every file
 * finished before it whole, the one in progress as a prefix, and none started after.
 */

import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { cleanupOf } from '../../testkit/cleanup.js';
import { cli, type Sandbox } from '../../testkit/daemon.js';
import type { AfterHook } from '../../testkit/files.js';
import { isMounted } from '../../testkit/kernel.js';
import { runSync } from '../../testkit/process.js';

export const FILE_BYTES = 24 * 1024;

/**
 * An ext4 on `image` (holding the tree `seed` if given), its inode tables and journal written
 * now rather than by a kernel thread later.
 */
export function mkfsExt4(image: string, seed?: string): void {
  runSync('mkfs.ext4', ['-q', '-F', ...(seed === undefined ? [] : ['-d', seed]), '-E', 'lazy_itable_init=0,lazy_journal_init=0', image]);
}

/**
 * A new ext4 image of `sizeBytes` at `image` holding `files` (relative path -> content), built
 * from a seed tree beside it (no mount needed).
 */
export function ext4WithFiles(image: string, sizeBytes: number, files: ReadonlyMap<string, Buffer>): void {
  const seed = `${image}.seed`;
  for (const [name, data] of files) {
    fs.mkdirSync(path.dirname(path.join(seed, name)), { recursive: true });
    fs.writeFileSync(path.join(seed, name), data);
  }
  fs.writeFileSync(image, '');
  fs.truncateSync(image, sizeBytes);
  mkfsExt4(image, seed);
  fs.rmSync(seed, { recursive: true });
}

/** `mnt`, made, which the test's cleanup leaves unmounted (see unmountAll). */
export function mountPoint(t: AfterHook, box: Sandbox, mnt: string): string {
  fs.mkdirSync(mnt);
  cleanupOf(t).after(() => unmountAll(box, [mnt]));
  return mnt;
}

export function expectedFile(n: number): Buffer {
  const line = `file ${n}\n`;
  return Buffer.from(line.repeat(Math.ceil(FILE_BYTES / line.length))).subarray(0, FILE_BYTES);
}

/** The number of the newest workload file in `dir` (0 when there is none). */
export function highestFile(dir: string): number {
  let top = 0;
  for (const name of fs.readdirSync(dir)) {
    const m = /^f(\d+)$/.exec(name);
    if (m) top = Math.max(top, Number(m[1]));
  }
  return top;
}

/**
 * The workload writing into `dir`, in its own process: a freeze blocks its writes, not the test.
 * `stop()` kills it and resolves once it has exited; it may be called more than once.
 */
export function startFileWorkload(dir: string): { stop(): Promise<void> } {
  const workload = spawn('bash', ['-c', `i=0; while :; do i=$((i+1)); yes "file $i" | head -c ${FILE_BYTES} > "$1/f$i"; done`, 'workload', dir], { stdio: 'ignore' });
  const stopped = new Promise<void>((resolve) => workload.once('exit', () => resolve()));
  return {
    stop: async () => {
      workload.kill('SIGKILL');
      await stopped;
    },
  };
}

/**
 * The workload files in `dir` of a copy taken after f<doneBefore> was finished and before
 * f<startedAfter + 1> was started: the newest is within those bounds, every earlier one whole,
 * the newest (which the copy may have cut) a prefix of its content. Returns the newest's number.
 */
export function checkFinishedFiles(dir: string, doneBefore: number, startedAfter: number, where: string): number {
  const top = highestFile(dir);
  assert.ok(top >= doneBefore && top <= startedAfter, `${where}: the last file f${top} is outside [f${doneBefore}, f${startedAfter}]`);
  for (let n = 1; n <= top; n++) {
    const data = fs.readFileSync(path.join(dir, `f${n}`));
    if (n < top) assert.deepEqual(data, expectedFile(n), `${where}: f${n}`);
    else assert.ok(expectedFile(n).subarray(0, data.length).equals(data), `${where}: f${n} is a prefix of its content`);
  }
  return top;
}

/** Take down what a test mounted through the daemon (lazily if the daemon cannot), while the daemon still runs. */
export function unmountAll(box: Sandbox, mountpoints: string[]): void {
  for (const mnt of mountpoints) {
    if (isMounted(mnt)) cli(box, ['umount', mnt]);
    if (isMounted(mnt)) spawnSync('umount', ['-l', mnt]);
  }
}
