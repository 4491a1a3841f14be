/**
 * The `mount-*` rows: speed as a user of `bdsnap mount` feels it, fio on ext4 in a mounted
 * image, against the same image served by nbdkit and attached by hand, and against a plain
 * loop device of the image (the floor of any route).
 *
 * Every cell starts from the same state: the image (filled with data once, so no read finds a
 * hole) gets a fresh ext4 with every table written by mkfs (no lazy init running during the
 * cell; nodiscard keeps the old data under it), is written back and read into the page cache,
 * and memory is got back from the host; then the route is set up, fio runs, and the route is
 * taken down (its unmount included) outside the clock.
 */

import fs from 'node:fs';
import path from 'node:path';
import { attachAndMount, unmountAndDetach } from '../src/service/mount.js';
import { attachKernel, mountDevice } from '../testkit/kernel.js';
import { makeImage, missingNeeds, run, runFio, startDaemon, startServer } from './helpers.js';
import { fillPageCache, settleFile } from './page-cache.js';

export const MOUNT_IMAGE_BYTES = 2 * 2 ** 30;
const MOUNT_FILE_BYTES = 512 * 2 ** 20;
export const MOUNT_RUNTIME_SEC = 5;
/** Memory got back before each cell: a session's store grows by up to fio's file. */
const MOUNT_FILL_BYTES = 2 * MOUNT_FILE_BYTES;

export const MOUNT_NEEDS = {
  root: true,
  paths: ['/dev/fuse'],
  tools: ['nbdfuse', 'nbdkit', 'losetup', 'fusermount3', 'mkfs.ext4', 'mount', 'umount', 'fio'],
};

/** A mounted route: the directory fio works in, and how to take it all down again. */
interface MountedRoute {
  mountpoint: string;
  takeDown(): Promise<void>;
}

export interface MountRoute {
  /** Column name. */
  name: string;
  description: string;
  mount(imagePath: string, mountpoint: string): Promise<MountedRoute>;
}

/** Steps undone in reverse order, each tried even when an earlier one failed. */
async function undo(steps: Array<() => Promise<unknown>>): Promise<void> {
  const problems: string[] = [];
  for (const step of [...steps].reverse()) {
    await step().catch((err: unknown) => problems.push(err instanceof Error ? err.message : String(err)));
  }
  if (problems.length > 0) throw new Error(`the route did not come down cleanly: ${problems.join('; ')}`);
}

function bdsnapMount(session: boolean): MountRoute {
  return {
    name: session ? 'bdsnap' : 'bdsnap, no session',
    description: session
      ? 'bdsnap mount of the image activated in a daemon (a snapshot session open for the whole cell, first writes included)'
      : 'bdsnap mount of the image registered but not activated (no session): the route and server without copy-before-write',
    mount: (imagePath, mountpoint) => mountThroughDaemon(imagePath, mountpoint, session),
  };
}

async function mountThroughDaemon(imagePath: string, mountpoint: string, session: boolean): Promise<MountedRoute> {
  const daemon = await startDaemon(undefined, session ? { activate: [imagePath] } : {});
  try {
    await daemon.cli(['mount', imagePath, mountpoint]);
  } catch (err) {
    await daemon.server.stop();
    throw err;
  }
  return {
    mountpoint,
    takeDown: () => undo([() => daemon.server.stop(), () => daemon.cli(['umount', mountpoint])]),
  };
}

export const BDSNAP_MOUNT = bdsnapMount(true);
export const BDSNAP_MOUNT_NO_SESSION = bdsnapMount(false);

export const NBDKIT_BY_HAND: MountRoute = {
  name: 'nbdkit',
  description: 'nbdkit file, attached by hand as the nbdfuse manual shows (nbdfuse with its defaults, losetup -f --show with its defaults), then mount',
  mount: async (imagePath, mountpoint) => {
    const server = await startServer(undefined, { kind: 'nbdkit', images: [imagePath] });
    const steps: Array<() => Promise<unknown>> = [() => server.stop()];
    try {
      const attachment = await attachKernel(server.socketPath, '');
      steps.push(() => attachment.detach());
      steps.push(await mountDevice(attachment.loopDevice, mountpoint));
    } catch (err) {
      await undo(steps).catch(() => undefined);
      throw err;
    }
    return { mountpoint, takeDown: () => undo(steps) };
  },
};

export const NBDKIT_BDSNAP_ATTACH: MountRoute = {
  name: 'nbdkit, bdsnap\'s attach',
  description: 'nbdkit file, attached and mounted by the code bdsnap mount uses: the server alone differs from the bdsnap column',
  mount: async (imagePath, mountpoint) => {
    const server = await startServer(undefined, { kind: 'nbdkit', images: [imagePath] });
    const workDir = fs.mkdtempSync(path.join(path.dirname(mountpoint), 'attach-'));
    try {
      const attached = await attachAndMount({ nbdSocket: server.socketPath, exportName: '', mountpoint, workDir });
      return {
        mountpoint,
        takeDown: () => undo([() => server.stop(), async () => fs.rmSync(workDir, { recursive: true, force: true }), () => unmountAndDetach(attached)]),
      };
    } catch (err) {
      await server.stop();
      fs.rmSync(workDir, { recursive: true, force: true });
      throw err;
    }
  },
};

export const PLAIN_LOOP: MountRoute = {
  name: 'loop',
  description: 'losetup -f --show of the image itself (no NBD), then mount: the floor of every route',
  mount: async (imagePath, mountpoint) => {
    const loop = (await run('losetup', ['--find', '--show', imagePath])).stdout.trim();
    const steps: Array<() => Promise<unknown>> = [() => run('losetup', ['-d', loop])];
    try {
      steps.push(await mountDevice(loop, mountpoint));
    } catch (err) {
      await undo(steps).catch(() => undefined);
      throw err;
    }
    return { mountpoint, takeDown: () => undo(steps) };
  },
};

export const MOUNT_ROUTES: MountRoute[] = [BDSNAP_MOUNT, NBDKIT_BY_HAND, BDSNAP_MOUNT_NO_SESSION, NBDKIT_BDSNAP_ATTACH, PLAIN_LOOP];

export interface MountJob {
  rw: 'write' | 'randwrite' | 'randread';
  blockSizeBytes: number;
  ioDepth: number;
  /** fio's other options, as a user would type them. */
  fioArgs: string[];
  measure: 'write MB/s' | 'write IOPS' | 'read IOPS';
}

/** The image all mount cells use, filled with data once (inside `dir`). */
export function mountImage(dir: string): string {
  const imagePath = path.join(dir, 'mount.img');
  if (!fs.existsSync(imagePath)) makeImage(imagePath, MOUNT_IMAGE_BYTES, 'blocks');
  return imagePath;
}

/** One cell: a fresh ext4 on the image, the route set up, fio for the runtime, the route down. */
export async function mountCell(route: MountRoute, dir: string, job: MountJob): Promise<number> {
  const imagePath = mountImage(dir);
  await run('mkfs.ext4', ['-q', '-F', '-b', '4096', '-E', 'lazy_itable_init=0,lazy_journal_init=0,nodiscard', imagePath]);
  settleFile(imagePath);
  fillPageCache(dir, MOUNT_FILL_BYTES);
  const mountpoint = fs.mkdtempSync(path.join(dir, 'mnt-'));
  try {
    const mounted = await route.mount(imagePath, mountpoint);
    let value: number;
    try {
      const result = await runFio({
        directory: mounted.mountpoint, rw: job.rw, blockSizeBytes: job.blockSizeBytes, ioDepth: job.ioDepth, sizeBytes: MOUNT_FILE_BYTES,
        runtimeSec: MOUNT_RUNTIME_SEC, extraArgs: job.fioArgs,
      });
      if (result.error !== 0) throw new Error(`fio error ${result.error}:\n${result.stderr}`);
      value = job.measure === 'write MB/s' ? result.write.bandwidthBytesPerSec / 1e6 : job.measure === 'write IOPS' ? result.write.iops : result.read.iops;
    } finally {
      await mounted.takeDown();
    }
    return value;
  } finally {
    fs.rmSync(mountpoint, { recursive: true, force: true });
  }
}

export function mountUnavailable(): string | undefined {
  const missing = missingNeeds(MOUNT_NEEDS);
  return missing.length > 0 ? `needs ${missing.join(', ')}` : undefined;
}
