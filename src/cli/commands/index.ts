/** The list of commands, in the order `bdsnap --help` shows them. */

import type { Command } from 'commander';
import * as serve from './serve.js';
import * as daemon from './daemon.js';
import * as passwd from './passwd.js';
import * as activate from './activate.js';
import * as status from './status.js';
import * as mount from './mount.js';
import * as restore from './restore.js';
import * as snapshot from './snapshot.js';
import * as cbt from './cbt.js';
import * as sffs from './sffs.js';
import * as demo from './demo.js';
import * as backup from './backup.js';

export function registerCommands(program: Command): void {
  for (const mod of [daemon, passwd, activate, status, mount, snapshot, cbt, restore, backup, serve, sffs, demo]) {
    mod.register(program);
  }
}
