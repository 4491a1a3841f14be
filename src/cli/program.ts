/**
 * The `bdsnap` command line: one module per command under ./commands, each registering
 * itself on the commander program. Every failure ends as one clear line on stderr and a
 * non-zero exit code; see ../../README.md for the contract.
 */

import { Command, CommanderError } from 'commander';
import { BdsnapError } from '../errors.js';
import { registerCommands } from './commands/index.js';

/** Exit codes: 1 for operational failures, 2 for usage errors. */
export const EXIT_FAILURE = 1;
export const EXIT_USAGE = 2;

/**
 * The program with the command of `argv` (node, script, command, ...) registered, or with all
 * of them when argv names none (help, a typo): see registerCommands.
 */
export async function buildProgram(argv: string[] = []): Promise<Command> {
  const program = new Command('bdsnap')
    .description('Block-device snapshot service: NBD server, copy-before-write sessions, exact restore')
    .showSuggestionAfterError()
    .exitOverride();
  await registerCommands(program, argv[2]);
  return program;
}

export async function run(argv: string[]): Promise<void> {
  try {
    const program = await buildProgram(argv);
    await program.parseAsync(argv);
  } catch (err) {
    process.exitCode = reportError(err);
  }
}

/** Print one line for `err` on stderr and return the exit code. */
export function reportError(err: unknown): number {
  if (err instanceof CommanderError) {
    // Commander has already printed its message (or help/version output).
    return err.exitCode === 0 ? 0 : EXIT_USAGE;
  }
  if (err instanceof BdsnapError) {
    process.stderr.write(`bdsnap: ${err.message}\n`);
    return EXIT_FAILURE;
  }
  const msg = err instanceof Error ? err.message : String(err);
  process.stderr.write(`bdsnap: ${msg}\n`);
  return EXIT_FAILURE;
}
