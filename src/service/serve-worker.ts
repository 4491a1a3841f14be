/**
 * A worker thread of `bdsnap serve`: opens its own descriptor of each image the server opened
 * (no second lock: the server's thread holds it; the identity must be the one the server
 * opened, or the worker refuses to start) and serves the connections handed to it.
 */

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { workerData } from 'node:worker_threads';
import type { DeviceIdentity } from '../device/block-device.js';
import { FileDevice } from '../device/file-device.js';
import { failHandedConnections, serveHandedConnections, type WorkerSettings } from '../nbd/connection-threads.js';
import { StaticExports } from '../nbd/static-exports.js';
import type { ConnectionContext } from '../nbd/server-connection.js';
import { WARM_SCRATCH_BYTES, warmRequestPath, warmUpWanted } from '../nbd/warm-up.js';

/** What the server's thread tells each worker about an image. */
export interface ServeWorkerExport {
  name: string;
  identity: DeviceIdentity;
  readOnly: boolean;
}

/** Warm this thread's request path on a scratch image in a new private directory, removed after. */
async function warmOnScratch(context: ConnectionContext): Promise<void> {
  const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'bdsnap-warm-'));
  try {
    const image = path.join(dir, 'scratch');
    const { O_CREAT, O_EXCL, O_NOFOLLOW, O_WRONLY } = fs.constants;
    const handle = await fs.promises.open(image, O_CREAT | O_EXCL | O_NOFOLLOW | O_WRONLY, 0o600);
    try {
      await handle.truncate(WARM_SCRATCH_BYTES);
    } finally {
      await handle.close();
    }
    const device = await FileDevice.open(image, { shared: true });
    try {
      await warmRequestPath(context, device, dir);
    } finally {
      await device.close();
    }
  } finally {
    await fs.promises.rm(dir, { recursive: true, force: true });
  }
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
    for (const e of wanted) opened.push(await FileDevice.open(e.name, { shared: true, readOnly: e.readOnly, expectIdentity: e.identity }));
    serveHandedConnections(new StaticExports(opened.map((device) => ({ name: device.path, device }))), closeAll, warmUpWanted() ? warmOnScratch : undefined);
  } catch (err) {
    await closeAll();
    failHandedConnections(err);
  }
}

void main();
