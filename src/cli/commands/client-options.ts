/**
 * The options every command that asks the daemon shares: where the daemon's sockets are, and
 * JSON output. Small, importing only the names of the run directory, so that lazily loaded
 * commands stay cheap.
 */

import type { Command } from 'commander';
import { DEFAULT_RUN_DIR, RUN_DIR_ENV } from '../../service/paths.js';

export const RUN_DIR_HELP = `the daemon's run directory (default $${RUN_DIR_ENV} or ${DEFAULT_RUN_DIR})`;

export interface ClientOptions {
  runDir?: string;
  json?: boolean;
}

/** Add --run-dir and --json (described as `jsonHelp`) to `command`, after its own options. */
export function clientOptions(command: Command, jsonHelp = 'machine-readable output'): Command {
  return command.option('--run-dir <dir>', RUN_DIR_HELP).option('--json', jsonHelp);
}

/** `value` as one JSON line with --json, else the text `describe` gives. */
export function printResult<T>(options: ClientOptions, value: T, describe: (value: T) => string): void {
  process.stdout.write(options.json ? `${JSON.stringify(value)}\n` : describe(value));
}
