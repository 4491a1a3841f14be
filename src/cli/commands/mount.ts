/** `bdsnap mount` and `bdsnap umount`: mount a device through the daemon, so each mount is one session. */

import type { Command } from 'commander';
import { withClient } from '../../service/client.js';
import { RUN_DIR_HELP } from './client-options.js';

interface MountCliOptions {
  type?: string;
  options?: string;
  runDir?: string;
  json?: boolean;
}

export function register(program: Command): void {
  program
    .command('mount <dev_name> <mountpoint>')
    .description('mount a device through bdsnap (a session for an active device spans the mount)')
    .option('-t, --type <type>', 'filesystem type, as for mount -t')
    .option('-o, --options <options>', 'mount options, as for mount -o')
    .option('--run-dir <dir>', RUN_DIR_HELP)
    .option('--json', 'machine-readable output')
    .action(async (device: string, mountpoint: string, options: MountCliOptions) => {
      const result = await withClient(options.runDir, (c) => c.mount(device, mountpoint, {
        ...(options.type !== undefined ? { type: options.type } : {}),
        ...(options.options !== undefined ? { options: options.options } : {}),
      }));
      if (options.json) process.stdout.write(`${JSON.stringify(result)}\n`);
      else process.stdout.write(`mounted ${result.device} on ${result.mountpoint} (${result.loopDevice ?? 'nbd'}; ${result.inSession ? 'snapshot session' : result.noSession !== undefined ? `no session: ${result.noSession}` : 'not active: no session'})\n`);
    });

  program
    .command('umount <mountpoint>')
    .description('unmount; returns after the session is closed and durable')
    .option('--run-dir <dir>', RUN_DIR_HELP)
    .option('--json', 'machine-readable output')
    .action(async (mountpoint: string, options: MountCliOptions) => {
      const result = await withClient(options.runDir, (c) => c.umount(mountpoint));
      if (options.json) process.stdout.write(`${JSON.stringify(result)}\n`);
      else process.stdout.write(`unmounted ${result.mountpoint}${result.sessionDir ? `; session ${result.sessionDir}` : ''}\n`);
      // The unmount itself succeeded; what it closed cannot give back the device as it was.
      if (result.sessionFailed !== undefined && !options.json) {
        process.stderr.write(`bdsnap: warning: session ${result.sessionDir ?? ''} failed (${result.sessionFailed}); restore refuses it and every older session of the device: none can bring it back to before this mount\n`);
      }
    });
}
