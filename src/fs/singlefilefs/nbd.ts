/** Reaching a singlefilefs image through an NBD server (the daemon or `bdsnap serve`). */

import type { BlockDevice } from '../../device/block-device.js';
import { NbdClient } from '../../nbd/client.js';

export interface NbdTarget {
  /** Unix socket of the NBD server. */
  socketPath: string;
  /** Export to select: the device path for the daemon. */
  exportName: string;
}

/** Connect to an export; closing the returned device disconnects. */
export function connectNbd(target: NbdTarget): Promise<BlockDevice> {
  return NbdClient.connect({ socketPath: target.socketPath, exportName: target.exportName });
}
