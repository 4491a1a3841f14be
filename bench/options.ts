/**
 * Command-line options of a bench: node's parseArgs plus `--help`, so that a mistyped or
 * unknown option prints the usage and exits 2 instead of a stack trace, and `--help` prints
 * it and exits 0.
 */

import { parseArgs, type ParseArgsConfig } from 'node:util';

type Options = NonNullable<ParseArgsConfig['options']>;

export function benchOptions<T extends Options>(usage: string, options: T): ReturnType<typeof parseArgs<{ options: T; strict: true }>>['values'] {
  let parsed;
  try {
    parsed = parseArgs({ options: { ...options, help: { type: 'boolean', short: 'h' } }, strict: true, allowPositionals: false });
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\nusage: ${usage}\n`);
    process.exit(2);
  }
  if ((parsed.values as Record<string, unknown>).help === true) {
    process.stdout.write(`usage: ${usage}\n`);
    process.exit(0);
  }
  return parsed.values as ReturnType<typeof parseArgs<{ options: T; strict: true }>>['values'];
}
