/**
 * A worker thread of `bdsnap serve`: opens its own descriptor of each image the server opened
 * (no second lock: the server's thread holds it; the identity must be the one the server
 * opened, or the worker refuses to start) and serves the connections handed to it.
 */

import { workerData } from 'node:worker_threads';
import type { DeviceIdentity } from '../device/block-device.js';
import { FileDevice } from '../device/file-device.js';
import { failHandedConnections, loneConnection, serveHandedConnections, type WorkerSettings } from '../nbd/connection-threads.js';
import { SyncIoPolicy } from '../device/sync-io-policy.js';
import { StaticExports } from '../nbd/static-exports.js';
import { warmUpOnScratch } from './warm-scratch.js';

/** What the server's thread tells each worker about an image. */
export interface ServeWorkerExport {
  name: string;
  identity: DeviceIdentity;
  readOnly: boolean;
}

async function main(): Promise<void> {
  const wanted = (workerData as WorkerSettings).exports as ServeWorkerExport[];
  const opened: FileDevice[] = [];
  const closeAll = async (): Promise<void> => {
    await Promise.allSettled(opened.map(async (d) => {
      await d.flush();
      await d.close();
    }));
  };
  try {
    // Large writes with requests queued behind them go to the thread pool while the server has
    // this one connection (see sync-io-policy.ts).
    const lone = loneConnection(workerData as WorkerSettings);
    for (const e of wanted) {
      opened.push(await FileDevice.open(e.name, { shared: true, readOnly: e.readOnly, expectIdentity: e.identity, syncIo: new SyncIoPolicy(undefined, undefined, undefined, lone) }));
    }
    serveHandedConnections(new StaticExports(opened.map((device) => ({ name: device.path, device }))), closeAll, warmUpOnScratch());
  } catch (err) {
    await closeAll();
    failHandedConnections(err);
  }
}

void main();
