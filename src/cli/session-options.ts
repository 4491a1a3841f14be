/** The session settings shared by `bdsnap serve --snapshot-root` and `bdsnap daemon`. */

import type { Command } from 'commander';
import { checkChunkSize, DEFAULT_CHUNK_SIZE, DURABILITIES, type Durability } from '../snapshot/session-settings.js';
import { choiceOption, sizeOption } from './option-values.js';

/** The options as commander leaves them: values already checked (see option-values.ts). */
export interface SessionCliOptions {
  chunkSize?: number;
  durability: Durability;
  sizeLimit?: number;
}

export interface SessionSettingsFromCli {
  chunkSize?: number;
  durability: Durability;
  sizeLimitBytes?: number;
}

export function addSessionOptions(command: Command): Command {
  return command
    .addOption(sizeOption('--chunk-size <size>', `session chunk size, a power of two of at least 4K (default ${DEFAULT_CHUNK_SIZE / 1024}K)`, checkChunkSize))
    .addOption(choiceOption('--durability <mode>', "session durability: 'process' (survives a killed process) or 'strict' (survives power loss)", DURABILITIES).default('process'))
    .addOption(sizeOption('--size-limit <size>', 'cap on each session store; past it the session fails and the device carries on'));
}

/** The session settings of the parsed options. */
export function parseSessionOptions(opts: SessionCliOptions): SessionSettingsFromCli {
  return {
    durability: opts.durability,
    ...(opts.chunkSize !== undefined ? { chunkSize: opts.chunkSize } : {}),
    ...(opts.sizeLimit !== undefined ? { sizeLimitBytes: opts.sizeLimit } : {}),
  };
}
