/**
 * In-place backup restores keep a journal in a restore directory (BDSNAP_RESTORE_DIR, by default
 * /var/lib/bdsnap/restores for root). A test file that restores in place, in its own process or
 * through the CLI it spawns, points it at a directory of its own, removed when the file ends, so
 * that tests never write the machine's.
 */

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after } from 'node:test';

export function useOwnRestoreDir(): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-restore-journals-'));
  after(() => fs.rmSync(dir, { recursive: true, force: true }));
  process.env.BDSNAP_RESTORE_DIR = dir;
  return dir;
}
