/**
 * The `bdsnap` command line: one module per command under ./commands, each registering
 * itself on the commander program. Every failure ends as one clear line on stderr and a
 * non-zero exit code; see ../../README.md for the contract.
 */

import fs from 'node:fs';
import { Command, CommanderError } from 'commander';
import { BdsnapError } from '../errors.js';
import { registerCommands } from './commands/index.js';

/** Exit codes: 1 for operational failures, 2 for usage errors. */
export const EXIT_FAILURE = 1;
export const EXIT_USAGE = 2;

/** Every error line starts so, commander's usage errors included, so scripts match one prefix. */
const ERROR_PREFIX = 'bdsnap: ';

/** The package's version, from the package.json shipped beside dist/ (see "files"). */
function packageVersion(): string {
  const meta = JSON.parse(fs.readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version?: unknown };
  return typeof meta.version === 'string' ? meta.version : 'unknown';
}

/**
 * The program with the command of `argv` (node, script, command, ...) registered, or with all
 * of them when argv names none (help, a typo): see registerCommands.
 */
export async function buildProgram(argv: string[] = []): Promise<Command> {
  const program = new Command('bdsnap')
    .description('Block-device snapshot service: NBD server, copy-before-write sessions, exact restore')
    .version(packageVersion(), '-V, --version', 'print the version of bdsnap')
    .configureOutput({ outputError: (text, write) => write(text.replace(/^error: /, ERROR_PREFIX)) })
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
    // A device in use: the daemon may know what holds it (only then is the client loaded).
    const busy = err instanceof BdsnapError && err.code === 'EBUSY';
    process.exitCode = reportError(busy ? await (await import('./busy.js')).explainBusy(err, runDirOf(argv)) : err);
  }
}

/** The --run-dir of argv, if given (else the client's default applies). */
function runDirOf(argv: string[]): string | undefined {
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === '--run-dir') return argv[i + 1];
    if (arg.startsWith('--run-dir=')) return arg.slice('--run-dir='.length);
  }
  return undefined;
}

/** Print one line for `err` on stderr and return the exit code. */
export function reportError(err: unknown): number {
  if (err instanceof CommanderError) {
    // Commander has already printed its message (or help/version output).
    return err.exitCode === 0 ? 0 : EXIT_USAGE;
  }
  const msg = err instanceof Error ? err.message : String(err);
  process.stderr.write(`${ERROR_PREFIX}${msg}\n`);
  return EXIT_FAILURE;
}
