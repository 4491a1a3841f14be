/** Small file helpers shared by the restore steps. */

import fs from 'node:fs';
import { toBdsnapError } from '../../errors.js';

/** The file's bytes, or undefined when it does not exist. Errors: anything but ENOENT. */
export async function readOptional(file: string): Promise<Buffer | undefined> {
  try {
    return await fs.promises.readFile(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw toBdsnapError(err);
  }
}
