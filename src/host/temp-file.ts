/**
 * A scratch file no other process can reach: created mode 0600 with O_EXCL and O_NOFOLLOW in a
 * new directory of mode 0700 under the system temp directory (TMPDIR), and both unlinked before
 * it is handed out, so nothing of it is left behind whatever ends the process and nothing put
 * under TMPDIR later can stand in for it (it is used through its descriptor only).
 */

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

/**
 * The new file `name` (what /proc shows of it, with " (deleted)") in a directory named from
 * `prefix`, open for reading and writing; errors are the system's (ENOSPC, EACCES, ENOENT for
 * a missing TMPDIR).
 */
export async function openUnlinkedTempFile(prefix: string, name: string): Promise<fs.promises.FileHandle> {
  const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), prefix));
  try {
    const file = path.join(dir, name);
    const { O_RDWR, O_CREAT, O_EXCL, O_NOFOLLOW } = fs.constants;
    const fh = await fs.promises.open(file, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW, 0o600);
    await fs.promises.unlink(file).catch(async (err: unknown) => {
      await fh.close();
      throw err;
    });
    return fh;
  } finally {
    await fs.promises.rm(dir, { recursive: true, force: true }).catch(() => undefined);
  }
}
