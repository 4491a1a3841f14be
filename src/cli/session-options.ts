/** The session settings shared by `bdsnap serve --snapshot-root` and `bdsnap daemon`. */

import type { Command } from 'commander';
import { BdsnapError } from '../errors.js';
import { checkChunkSize, DEFAULT_CHUNK_SIZE } from '../snapshot/format.js';
import { parseBytes } from '../units.js';

export interface SessionCliOptions {
  chunkSize?: string;
  durability: string;
  sizeLimit?: string;
}

export interface SessionSettingsFromCli {
  chunkSize?: number;
  durability: 'process' | 'strict';
  sizeLimitBytes?: number;
}

export function addSessionOptions(command: Command): Command {
  return command
    .option('--chunk-size <size>', `session chunk size, a power of two of at least 4K (default ${DEFAULT_CHUNK_SIZE / 1024}K)`)
    .option('--durability <mode>', "session durability: 'process' (survives a killed process) or 'strict' (survives power loss)", 'process')
    .option('--size-limit <size>', 'cap on each session store; past it the session fails and the device carries on');
}

/** Parse and check the options before anything starts. Errors: EINVAL naming the option. */
export function parseSessionOptions(opts: SessionCliOptions): SessionSettingsFromCli {
  if (opts.durability !== 'process' && opts.durability !== 'strict') {
    throw new BdsnapError('EINVAL', `bad --durability "${opts.durability}": expected process or strict`);
  }
  const chunkSize = opts.chunkSize !== undefined ? parseBytes(opts.chunkSize, '--chunk-size') : undefined;
  if (chunkSize !== undefined) {
    try {
      checkChunkSize(chunkSize);
    } catch (err) {
      throw new BdsnapError('EINVAL', `bad --chunk-size: ${(err as Error).message}`);
    }
  }
  return {
    durability: opts.durability,
    ...(chunkSize !== undefined ? { chunkSize } : {}),
    ...(opts.sizeLimit !== undefined ? { sizeLimitBytes: parseBytes(opts.sizeLimit, '--size-limit') } : {}),
  };
}
