/**
 * The scratch image a server thread warms its request path on (src/nbd/warm-up.ts): a small
 * file made with O_EXCL in a new private directory under TMPDIR, unlinked at once and used
 * through its descriptor; the directory (and the warm-up's socket in it) is removed once the
 * warm-up ends.
 */

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { FileDevice } from '../device/file-device.js';
import type { ConnectionContext } from '../nbd/server-connection.js';
import { WARM_SCRATCH_BYTES, warmRequestPath } from '../nbd/warm-up.js';

/** The warm-up a server thread runs before its first client, or undefined when BDSNAP_NBD_WARM_UP=0 turns it off. */
export function warmUpOnScratch(): ((context: ConnectionContext) => Promise<void>) | undefined {
  return process.env.BDSNAP_NBD_WARM_UP === '0' ? undefined : warmOnScratch;
}

async function warmOnScratch(context: ConnectionContext): Promise<void> {
  const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'bdsnap-warm-'));
  try {
    const name = path.join(dir, 'scratch');
    const { O_CREAT, O_EXCL, O_NOFOLLOW, O_RDWR } = fs.constants;
    const handle = await fs.promises.open(name, O_CREAT | O_EXCL | O_NOFOLLOW | O_RDWR, 0o600);
    try {
      // Used through the descriptor made here, never by its name again: whoever could rename
      // things under TMPDIR cannot put another file in its place.
      await fs.promises.unlink(name);
      await handle.truncate(WARM_SCRATCH_BYTES);
      const device = await FileDevice.open(`/proc/self/fd/${handle.fd}`, { shared: true, followSymlinks: true });
      try {
        await warmRequestPath(context, device, dir);
      } finally {
        await device.close();
      }
    } finally {
      await handle.close();
    }
  } finally {
    await fs.promises.rm(dir, { recursive: true, force: true });
  }
}
