/**
 * One opener per image across processes. Node has no flock(2), so the lock is a file named
 * after the image's identity in a lock directory, created with O_EXCL and holding the owner's
 * pid. A lock whose owner is gone (killed with SIGKILL, say) is stale and taken over.
 */

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BdsnapError } from '../errors.js';
import type { DeviceIdentity } from './block-device.js';

export interface DeviceLock {
  release(): Promise<void>;
}

/** The lock directory: $BDSNAP_LOCK_DIR, else /run/lock/bdsnap, else a folder in the temp dir. */
export function lockDirectory(): string {
  if (process.env.BDSNAP_LOCK_DIR) return process.env.BDSNAP_LOCK_DIR;
  try {
    fs.accessSync('/run/lock', fs.constants.W_OK);
    return '/run/lock/bdsnap';
  } catch {
    return path.join(os.tmpdir(), 'bdsnap-locks');
  }
}

function lockName(identity: DeviceIdentity): string {
  return identity.kind === 'block' ? `block-${identity.rdev}.lock` : `file-${identity.dev}-${identity.ino}.lock`;
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export async function acquireDeviceLock(devicePath: string, identity: DeviceIdentity): Promise<DeviceLock> {
  const dir = lockDirectory();
  await fs.promises.mkdir(dir, { recursive: true, mode: 0o755 });
  const file = path.join(dir, lockName(identity));
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      await fs.promises.writeFile(file, `${process.pid}\n${devicePath}\n`, { flag: 'wx', mode: 0o644 });
      let released = false;
      return {
        release: async () => {
          if (released) return;
          released = true;
          await fs.promises.rm(file, { force: true });
        },
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') {
        throw new BdsnapError('EIO', `cannot create lock file ${file}: ${(err as Error).message}`, { cause: err });
      }
    }
    const content = await fs.promises.readFile(file, 'utf8').catch(() => '');
    const pid = Number(content.split('\n')[0]);
    if (Number.isInteger(pid) && pid > 0 && processAlive(pid)) {
      const who = pid === process.pid ? 'this process' : `process ${pid}`;
      throw new BdsnapError('EBUSY', `${devicePath} is already open by ${who}; stop that server first (lock ${file})`);
    }
    // Stale: the owner died without releasing. Remove and try again.
    await fs.promises.rm(file, { force: true });
  }
  throw new BdsnapError('EBUSY', `${devicePath}: could not take the lock ${file}`);
}
