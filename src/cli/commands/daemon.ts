/** `bdsnap daemon`: run the service in the foreground, logging one JSON line per event on stdout. */

import type { Command } from 'commander';
import { DEFAULT_RUN_DIR, RUN_DIR_ENV, resolveRunDir } from '../../service/paths.js';
import { BdsnapError } from '../../errors.js';
import { addSessionOptions, parseSessionOptions, type SessionCliOptions } from '../session-options.js';

const DEFAULT_STATE_DIR = '/var/lib/bdsnap';
const DEFAULT_SNAPSHOT_ROOT = '/snapshot';

interface DaemonOptions extends SessionCliOptions {
  runDir?: string;
  stateDir: string;
  snapshotRoot: string;
  logLevel: string;
  changeTracking: boolean;
}

export function register(program: Command): void {
  const command = program
    .command('daemon')
    .description('run the bdsnap service in the foreground (control socket, NBD server, sessions)')
    .option('--run-dir <dir>', `sockets go here (default $${RUN_DIR_ENV} or ${DEFAULT_RUN_DIR})`)
    .option('--state-dir <dir>', 'registry and password hash', DEFAULT_STATE_DIR)
    .option('--snapshot-root <dir>', 'session directories', DEFAULT_SNAPSHOT_ROOT);
  addSessionOptions(command)
    .option('--log-level <level>', 'pino level: debug, info, warn, error', 'info')
    .option('--no-change-tracking', 'keep no change map (incremental backups then read whole devices)')
    .action(async (options: DaemonOptions) => {
      const session = parseSessionOptions(options);
      if (!['trace', 'debug', 'info', 'warn', 'error', 'fatal'].includes(options.logLevel)) {
        throw new BdsnapError('EINVAL', '--log-level must be one of trace, debug, info, warn, error, fatal');
      }
      // Loaded here so that every other command starts without the daemon's dependencies.
      const [{ pino }, { startDaemon }] = await Promise.all([import('pino'), import('../../service/daemon.js')]);
      const log = pino({ level: options.logLevel, base: { pid: process.pid } });
      const daemon = await startDaemon({
        runDir: resolveRunDir(options.runDir),
        stateDir: options.stateDir,
        snapshotRoot: options.snapshotRoot,
        log,
        session,
        changeTracking: options.changeTracking,
      });
      await new Promise<void>((resolve) => {
        const stop = (signal: string): void => {
          log.info({ event: 'signal', signal }, 'stopping on signal');
          daemon.close().then(resolve, (err: unknown) => {
            log.error({ event: 'shutdown-failed', reason: (err as Error).message }, 'shutdown failed');
            process.exitCode = 1;
            resolve();
          });
        };
        process.once('SIGTERM', () => stop('SIGTERM'));
        process.once('SIGINT', () => stop('SIGINT'));
      });
      log.flush();
    });
}
