/**
 * The SnapshotProvider of a running daemon: snapshots taken through its control socket,
 * images read over its NBD socket, and what changed since an earlier backup answered by the
 * image's own frozen change map (the daemon's `snapshot-changes`), which is exact for the
 * image and includes writes made to the image itself.
 */

import { BdsnapError } from '../errors.js';
import { NbdClient } from '../nbd/client.js';
import type { Repository } from '../repository/repository.js';
import { BdsnapClient } from '../service/client.js';
import { nbdSocketPath, resolveRunDir } from '../service/paths.js';
import { backupDevices, type AgentOptions, type Snapshot, type SnapshotProvider } from './agent.js';
import type { BackupSummary } from './create.js';

/**
 * `bdsnap backup create`: back `devices` up from one snapshot taken by the daemon of `runDir`
 * (default: the usual run directory). Errors: the daemon cannot be reached (with what to know
 * about it), or as backupDevices throws them.
 */
export async function backupThroughDaemon(repo: Repository, devices: string[], runDir: string | undefined, options: AgentOptions): Promise<BackupSummary> {
  let client: BdsnapClient;
  try {
    client = await BdsnapClient.connect(runDir);
  } catch (err) {
    throw new BdsnapError((err as BdsnapError).code ?? 'ENOENT', `backup create takes snapshots through the daemon: ${(err as Error).message}`, { cause: err });
  }
  try {
    return await backupDevices(repo, daemonSnapshotProvider(client, resolveRunDir(runDir)), devices, options);
  } finally {
    client.close();
  }
}

export function daemonSnapshotProvider(client: BdsnapClient, runDir: string): SnapshotProvider {
  const socketPath = nbdSocketPath(runDir);
  return {
    async take(devices: string[]): Promise<Snapshot> {
      // Owned: a backup killed before its destroy below leaves no snapshot behind; the daemon
      // destroys it once this client's connection closes (or, after a daemon restart, once this
      // process is gone).
      const info = await client.createSnapshot(devices, { owned: true });
      return {
        id: info.id,
        images: info.images.map((image) => ({
          device: image.device,
          sizeBytes: image.sizeBytes,
          changeMap: image.cbt,
          open: () => NbdClient.connect({ socketPath, exportName: image.exportName }),
          changedSince: (generation: string, number: number) => client.snapshotChanges(info.id, image.device, generation, number),
        })),
      };
    },
    async destroy(id: string): Promise<void> {
      // The backup's own snapshot: its readers are closed by now, and nothing else may keep it.
      await client.destroySnapshot(id, { force: true });
    },
  };
}
