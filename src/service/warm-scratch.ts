/**
 * The scratch image a server thread warms its request path on (src/nbd/warm-up.ts): a small
 * file in a new private directory under TMPDIR, made with O_EXCL and never followed through
 * a link, removed with the directory once the warm-up ends.
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
