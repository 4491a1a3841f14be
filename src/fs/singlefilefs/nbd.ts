/**
 * Reaching a singlefilefs image through an NBD server (the daemon or `bdsnap serve`).
 *
 * The NBD client module is loaded when first needed, so the formatter and the offline
 * (image file) paths work without it, and a missing client is one clear error.
 */

import type { BlockDevice } from '../../device/block-device.js';
import { BdsnapError } from '../../errors.js';

export interface NbdTarget {
  /** Unix socket of the NBD server. */
  socketPath: string;
  /** Export to select: the device path for the daemon. */
  exportName: string;
}

interface NbdClientModule {
  NbdClient: { connect(target: NbdTarget): Promise<BlockDevice> };
}

// A variable specifier keeps the compiler from resolving the module statically.
const NBD_CLIENT_MODULE = '../../nbd/client.js';

/** Connect to an export; closing the returned device disconnects. */
export async function connectNbd(target: NbdTarget): Promise<BlockDevice> {
  let mod: NbdClientModule;
  try {
    mod = (await import(NBD_CLIENT_MODULE)) as NbdClientModule;
  } catch (err) {
    throw new BdsnapError('ENOTSUP', 'this build has no NBD client; use --image to work on an image file directly', { cause: err });
  }
  return mod.NbdClient.connect(target);
}
