/** `bdsnap activate` and `bdsnap deactivate`: arm or disarm snapshot sessions for a device. */

import type { Command } from 'commander';
import { withClient } from '../../service/client.js';
import type { ActivationResult } from '../../service/control-protocol.js';
import { readPassword } from '../password-input.js';
import { RUN_DIR_HELP } from './client-options.js';

interface ActivationOptions {
  passwordStdin?: boolean;
  runDir?: string;
  json?: boolean;
}

function describe(r: ActivationResult): string {
  if (r.active) return `${r.changed ? `activated ${r.device}` : `${r.device} is already active`}${r.sessions !== undefined ? `; ${r.sessions}` : r.changed ? ': each mount from now on gets a snapshot session' : ''}`;
  if (!r.changed) return `${r.device} is not active`;
  const carry = r.sessionContinues ? `; the current session (${r.sessionContinues}) carries on until unmount` : '';
  return `deactivated ${r.device}${carry}`;
}

export function register(program: Command): void {
  for (const active of [true, false]) {
    const name = active ? 'activate' : 'deactivate';
    program
      .command(`${name} <dev_name>`)
      .description(active ? 'activate snapshot sessions for a device (needs the service password)' : 'stop starting snapshot sessions for a device (needs the service password)')
      .option('--password-stdin', 'read the service password from the first line of stdin')
      .option('--run-dir <dir>', RUN_DIR_HELP)
      .option('--json', 'machine-readable output')
      .action(async (device: string, options: ActivationOptions) => {
        const password = await readPassword(options.passwordStdin ?? false);
        const result = await withClient(options.runDir, (c) => (active ? c.activate(device, password) : c.deactivate(device, password)));
        process.stdout.write(options.json ? `${JSON.stringify(result)}\n` : `${describe(result)}\n`);
        if (!options.json) for (const warning of result.warnings ?? []) process.stderr.write(`bdsnap: warning: ${warning}\n`);
      });
  }
}
