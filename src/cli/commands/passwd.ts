/** `bdsnap passwd`. */

import type { Command } from 'commander';

export function register(_program: Command): void {
  // Registered by the module that implements it.
}
