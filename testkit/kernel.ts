/**
 * Put an NBD export under a real kernel block device without the nbd module:
 * nbdfuse exposes the export as a file on a FUSE mount, and a loop device sits on that file.
 * Every block the kernel reads or writes then goes through the NBD server.
 *
 * Order matters on the way out: the loop device must let go of the FUSE file before the
 * FUSE mount can be unmounted, and nbdfuse exits (closing its NBD connections) only once
 * unmounted. The loop device is released asynchronously by the kernel, so unmounting
 * FUSE is retried while it reports "busy".
 */

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { MOUNTINFO_PATH, parseMountInfo } from '../src/host/mountinfo.js';
import { requireRoot, requireTool, run } from './process.js';
import { nbdUri, settlesWithin } from './server.js';

export interface KernelAttachment {
  /** /dev/loopN, ready for mkfs or mount. */
  readonly loopDevice: string;
  /** The FUSE file that nbdfuse presents and the loop device is bound to. */
  readonly fuseFile: string;
  /** nbdfuse's stderr so far (for failure messages). */
  nbdfuseStderr(): string;
  /** Detach the loop device, unmount FUSE, wait for nbdfuse to exit. Idempotent. */
  detach(): Promise<void>;
}

export interface AttachOptions {
  /** NBD connections nbdfuse opens when the server offers multi-conn (nbdfuse default 4). */
  connections?: number;
  readOnly?: boolean;
  timeoutMs?: number;
}

const DEFAULT_TIMEOUT_MS = 20_000;
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

async function retryWhileBusy(what: () => Promise<unknown>, timeoutMs: number): Promise<void> {
  const deadlineMs = Date.now() + timeoutMs;
  for (;;) {
    try {
      await what();
      return;
    } catch (err) {
      if (Date.now() > deadlineMs || !/busy/i.test(String(err))) throw err;
      await sleep(100);
    }
  }
}

/**
 * Attach the export `exportName` ('' = the default export) of the NBD server on
 * `socketPath` as a loop device. Needs root, FUSE, nbdfuse and losetup.
 */
export async function attachKernel(socketPath: string, exportName = '', options: AttachOptions = {}): Promise<KernelAttachment> {
  requireRoot();
  const nbdfuse = requireTool('nbdfuse');
  requireTool('losetup');
  requireTool('fusermount3');
  const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-fuse-'));
  const mountDir = path.join(dir, 'mnt');
  fs.mkdirSync(mountDir);
  const fuseFile = path.join(mountDir, 'disk');
  const pidFile = path.join(dir, 'nbdfuse.pid');
  // A URI rather than --unix: --unix cannot name an export.
  const args = [
    '-P', pidFile,
    ...(options.connections !== undefined ? ['--connections', String(options.connections)] : []),
    ...(options.readOnly ? ['--readonly'] : []),
    fuseFile,
    nbdUri(socketPath, exportName),
  ];
  const child = spawn(nbdfuse, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderrText = '';
  child.stderr?.on('data', (b: Buffer) => {
    stderrText += b.toString('utf8');
  });
  let exited = false;
  const exitedPromise = new Promise<void>((resolve) => {
    child.once('exit', () => {
      exited = true;
      resolve();
    });
    child.once('error', (e) => {
      stderrText += `cannot start nbdfuse: ${e.message}\n`;
      exited = true;
      resolve();
    });
  });

  let loopDevice: string | undefined;
  let detaching: Promise<void> | undefined;
  const detach = (): Promise<void> => {
    detaching ??= (async () => {
      const problems: string[] = [];
      if (loopDevice !== undefined) {
        try {
          await retryWhileBusy(() => run('losetup', ['-d', loopDevice as string]), timeoutMs);
        } catch (err) {
          problems.push(String(err));
        }
      }
      if (!exited) {
        try {
          await retryWhileBusy(() => run('fusermount3', ['-u', mountDir]), timeoutMs);
        } catch (err) {
          problems.push(String(err));
        }
        if (!(await settlesWithin(exitedPromise, timeoutMs))) {
          problems.push(`nbdfuse did not exit after unmount; killed\n${stderrText}`);
          child.kill('SIGKILL');
          await exitedPromise;
          await run('fusermount3', ['-u', '-z', mountDir], { allowFailure: true });
        }
      }
      fs.rmSync(dir, { recursive: true, force: true });
      if (problems.length > 0) throw new Error(`detach of ${fuseFile} was not clean:\n${problems.join('\n')}`);
    })();
    return detaching;
  };

  try {
    // nbdfuse writes its pid file only once it has connected and FUSE is mounted.
    const deadlineMs = Date.now() + timeoutMs;
    while (!fs.existsSync(pidFile) || fs.readFileSync(pidFile, 'utf8').trim() === '') {
      if (exited) throw new Error(`nbdfuse exited before it was ready: ${stderrText}`);
      if (Date.now() > deadlineMs) throw new Error(`nbdfuse not ready after ${timeoutMs} ms: ${stderrText}`);
      await sleep(25);
    }
    // Buffered loop I/O (the default, named here because direct I/O on a FUSE file fails
    // unless the FUSE server allows it).
    const attached = await run('losetup', ['--find', '--show', '--direct-io=off', ...(options.readOnly ? ['--read-only'] : []), fuseFile]);
    loopDevice = attached.stdout.trim();
    if (!/^\/dev\/loop\d+$/.test(loopDevice)) throw new Error(`losetup printed '${loopDevice}', not a loop device`);
  } catch (err) {
    await detach().catch(() => undefined);
    throw err;
  }

  const finalLoop = loopDevice;
  return {
    loopDevice: finalLoop,
    fuseFile,
    nbdfuseStderr: () => stderrText,
    detach,
  };
}

/** Mount `device` on `mountPoint`; returns an unmount function (idempotent, lazy fallback). */
export async function mountDevice(device: string, mountPoint: string, options: string[] = []): Promise<() => Promise<void>> {
  await run('mount', [...(options.length > 0 ? ['-o', options.join(',')] : []), device, mountPoint]);
  let done = false;
  return async () => {
    if (done) return;
    done = true;
    await retryWhileBusy(() => run('umount', [mountPoint]), DEFAULT_TIMEOUT_MS);
  };
}

/** Whether something is mounted on `dir` now (the mount table read synchronously, escapes undone). */
export function isMounted(dir: string): boolean {
  return parseMountInfo(fs.readFileSync(MOUNTINFO_PATH, 'utf8')).some((m) => m.mountPoint === path.resolve(dir));
}
