/** `bdsnap passwd`: set or change the service password (stdin: line 1 current, line 2 new when changing). */

import type { Command } from 'commander';
import { BdsnapError } from '../../errors.js';
import { withClient } from '../../service/client.js';
import { promptHidden, readStdinLines } from '../password-input.js';
import { RUN_DIR_HELP } from './client-options.js';

interface PasswdOptions {
  passwordStdin?: boolean;
  runDir?: string;
}

export function register(program: Command): void {
  program
    .command('passwd')
    .description('set the service password; changing it needs the current one')
    .option('--password-stdin', 'read the passwords from stdin: the new one, or the current one then the new one')
    .option('--run-dir <dir>', RUN_DIR_HELP)
    .action(async (options: PasswdOptions) => {
      let current: string | undefined;
      let next: string;
      if (options.passwordStdin) {
        const lines = await readStdinLines();
        if (lines.length === 1 && lines[0]) next = lines[0];
        else if (lines.length === 2 && lines[0] && lines[1]) [current, next] = [lines[0], lines[1]];
        else throw new BdsnapError('EINVAL', 'expected on stdin: the new password, or the current one and the new one, one per line');
      } else {
        const isSet = await withClient(options.runDir, async (c) => (await c.ping()).passwordSet);
        if (isSet) current = await promptHidden('current service password: ');
        next = await promptHidden('new service password: ');
        if ((await promptHidden('new service password again: ')) !== next) throw new BdsnapError('EINVAL', 'the two new passwords differ');
      }
      const result = await withClient(options.runDir, (c) => c.setPassword(next, current));
      process.stdout.write(result.changed ? 'service password changed\n' : 'service password set\n');
    });
}
