/**
 * The SnapshotProvider of a running daemon: snapshots taken through its control socket,
 * images read over its NBD socket, and what changed since an earlier backup answered by the
 * image's own frozen change map (the daemon's `snapshot-changes`), which is exact for the
 * image and includes writes made to the image itself.
 */

import { NbdClient } from '../nbd/client.js';
import type { BdsnapClient } from '../service/client.js';
import { nbdSocketPath } from '../service/paths.js';
import type { Snapshot, SnapshotProvider } from './agent.js';

export function daemonSnapshotProvider(client: BdsnapClient, runDir: string): SnapshotProvider {
  const socketPath = nbdSocketPath(runDir);
  return {
    async take(devices: string[]): Promise<Snapshot> {
      const info = await client.createSnapshot(devices);
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
