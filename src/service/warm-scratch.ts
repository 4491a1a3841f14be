/**
 * The scratch image a server thread warms its request path on (src/nbd/warm-up.ts): a small
 * unlinked file under TMPDIR (host/temp-file.ts) used through its descriptor, and the
 * warm-up's socket in a private directory removed once the warm-up ends.
 */

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { FileDevice } from '../device/file-device.js';
import { openUnlinkedTempFile } from '../host/temp-file.js';
import type { ConnectionContext } from '../nbd/server-connection.js';
import { WARM_SCRATCH_BYTES, warmRequestPath } from '../nbd/warm-up.js';

/** The warm-up a server thread runs before its first client, or undefined when BDSNAP_NBD_WARM_UP=0 turns it off. */
export function warmUpOnScratch(): ((context: ConnectionContext) => Promise<void>) | undefined {
  return process.env.BDSNAP_NBD_WARM_UP === '0' ? undefined : warmOnScratch;
}

async function warmOnScratch(context: ConnectionContext): Promise<void> {
  const handle = await openUnlinkedTempFile('bdsnap-scratch-', 'scratch');
  try {
    await handle.truncate(WARM_SCRATCH_BYTES);
    const device = await FileDevice.open(`/proc/self/fd/${handle.fd}`, { shared: true, followSymlinks: true });
    // The warm-up's socket: in a private directory of its own, so that only this user can connect.
    const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'bdsnap-warm-'));
    try {
      await warmRequestPath(context, device, dir);
    } finally {
      await device.close();
      await fs.promises.rm(dir, { recursive: true, force: true });
    }
  } finally {
    await handle.close();
  }
}
