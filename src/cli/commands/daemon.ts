/** `bdsnap daemon`: run the service in the foreground, logging one JSON line per event on stdout. */

import type { Command } from 'commander';
import { DEFAULT_RUN_DIR, DEFAULT_STATE_DIR, RUN_DIR_ENV, resolveRunDir } from '../../service/paths.js';
import { BdsnapError } from '../../errors.js';
import { choiceOption, sizeOption } from '../option-values.js';

/** pino's levels, least severe first. */
const LOG_LEVELS = ['trace', 'debug', 'info', 'warn', 'error', 'fatal'] as const;
type LogLevel = (typeof LOG_LEVELS)[number];
import { addSessionOptions, parseSessionOptions, type SessionCliOptions } from '../session-options.js';
import { addTlsOptions, parseListen, tlsSettings, type TlsCliOptions } from './serve.js';
import { loadTls } from '../../nbd/tls.js';

const DEFAULT_SNAPSHOT_ROOT = '/snapshot';
/** The longest a stop may take: busy mounts are flushed and retried well within it. */
const SHUTDOWN_DEADLINE_MS = 90_000;

interface DaemonOptions extends SessionCliOptions, TlsCliOptions {
  listen?: string;
  insecureTcp?: boolean;
  runDir?: string;
  stateDir: string;
  snapshotRoot: string;
  logLevel: LogLevel;
  changeTracking: boolean;
  restoreRate?: number;
}

export function register(program: Command): void {
  const command = program
    .command('daemon')
    .description('run the bdsnap service in the foreground (control socket, NBD server, sessions)')
    .option('--run-dir <dir>', `sockets go here (default $${RUN_DIR_ENV} or ${DEFAULT_RUN_DIR})`)
    .option('--state-dir <dir>', 'registry and password hash', DEFAULT_STATE_DIR)
    .option('--snapshot-root <dir>', 'session directories', DEFAULT_SNAPSHOT_ROOT);
  addSessionOptions(command)
    .addOption(choiceOption('--log-level <level>', 'how much the log says', LOG_LEVELS).default('info'))
    .option('--no-change-tracking', 'keep no change map (incremental backups then read whole devices)')
    .addOption(sizeOption('--restore-rate <size>', 'most bytes per second the background copy of an instant restore reads from a repository (e.g. 50M); default no limit'))
    .option('--listen <host:port>', 'also serve NBD on TCP; a bare port means 127.0.0.1 (needs TLS required, or --insecure-tcp); the unix socket stays plaintext');
  addTlsOptions(command)
    .option('--insecure-tcp', 'allow --listen without TLS required: whoever can connect (every local user, even on 127.0.0.1) can read and write every registered device')
    .action(async (options: DaemonOptions) => {
      const session = parseSessionOptions(options);
      const listen = options.listen !== undefined ? parseListen(options.listen) : undefined;
      const tls = await loadTls(tlsSettings(options));
      if (tls && !listen) throw new BdsnapError('EINVAL', 'TLS applies to the TCP listener: give --listen HOST:PORT too (the unix socket is root\'s alone)');
      // Loaded here so that every other command (and --help) starts without the daemon's dependencies.
      const [{ pino }, { startDaemon }, { checkTcpPolicy, plainTcpWarning }] = await Promise.all([
        import('pino'), import('../../service/daemon.js'), import('../../nbd/listen.js'),
      ]);
      if (listen) checkTcpPolicy(listen, tls, options.insecureTcp ?? false, 'every registered device');
      const log = pino({ level: options.logLevel, base: { pid: process.pid } });
      const daemon = await startDaemon({
        runDir: resolveRunDir(options.runDir),
        stateDir: options.stateDir,
        snapshotRoot: options.snapshotRoot,
        log,
        session,
        changeTracking: options.changeTracking,
        ...(options.restoreRate !== undefined ? { restoreRateBytes: options.restoreRate } : {}),
        listen,
        tls,
      });
      const warning = listen && plainTcpWarning(`${listen.host}:${listen.port}`, listen.host, tls, 'read and write every registered device');
      if (warning) log.warn({ event: 'insecure-tcp' }, warning);
      const failure = await new Promise<Error | undefined>((resolve) => {
        const stop = (signal: string): void => {
          log.info({ event: 'signal', signal }, 'stopping on signal');
          // Whatever is still pending then (a child that will not exit, a filesystem that does
          // not answer), the daemon does not outlive this.
          setTimeout(() => {
            log.error({ event: 'shutdown-deadline', deadlineMs: SHUTDOWN_DEADLINE_MS }, 'shutdown did not finish in time; exiting');
            log.flush();
            process.stderr.write(`bdsnap: the daemon did not stop within ${SHUTDOWN_DEADLINE_MS / 1000} s; exiting anyway (see its log)\n`);
            process.exit(1);
          }, SHUTDOWN_DEADLINE_MS).unref();
          daemon.close().then(() => resolve(undefined), (err: unknown) => {
            log.error({ event: 'shutdown-failed', reason: (err as Error).message }, 'shutdown failed');
            resolve(err as Error);
          });
        };
        process.once('SIGTERM', () => stop('SIGTERM'));
        process.once('SIGINT', () => stop('SIGINT'));
      });
      log.flush();
      if (failure) throw failure;
    });
}
