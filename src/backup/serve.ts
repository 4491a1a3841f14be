/**
 * A backup opened to be served (`bdsnap backup serve`): its devices, read piece by piece, with
 * the repository held like a running backup's for as long as they are open, so a prune cannot
 * delete the packs they read.
 */

import { openBackupDevices, type OpenedBackupDevice } from '../repository/backup-device.js';
import { RepoLock } from '../repository/lock.js';
import type { Repository } from '../repository/repository.js';

export interface ServedBackup {
  devices: OpenedBackupDevice[];
  /** Close the devices, then let the repository go. */
  close(): Promise<void>;
}

/** Open every device of backup `id` under a create lock. Errors: as the lock and the repository throw them. */
export async function openBackupToServe(repo: Repository, id: string): Promise<ServedBackup> {
  const lock = await RepoLock.acquire(repo.store, 'create', { purpose: 'serve' });
  let opened;
  try {
    opened = await openBackupDevices(repo, id);
  } catch (err) {
    await lock.release();
    throw err;
  }
  return {
    devices: opened.devices,
    close: async () => {
      try {
        await opened.close();
      } finally {
        await lock.release();
      }
    },
  };
}
