/**
 * The options every command that asks the daemon shares: where the daemon's sockets are, and
 * JSON output. Small and without imports of its own, so that lazily loaded commands stay cheap.
 */

import type { Command } from 'commander';

export const RUN_DIR_HELP = 'the daemon\'s run directory (default $BDSNAP_RUN_DIR or /run/bdsnap)';

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
