/**
 * The list of commands, in the order `bdsnap --help` shows them. Each module is loaded only
 * when its command runs: `bdsnap status` must not pay for loading the NBD server, the
 * snapshot engine or the daemon (a client command should start about as fast as Node).
 */

import type { Command } from 'commander';

interface CommandModule {
  register(program: Command): void;
}

/** Module loaders with the top-level command names each one registers, in help order. */
const MODULES: Array<{ names: string[]; load: () => Promise<CommandModule> }> = [
  { names: ['daemon'], load: () => import('./daemon.js') },
  { names: ['passwd'], load: () => import('./passwd.js') },
  { names: ['activate', 'deactivate'], load: () => import('./activate.js') },
  { names: ['status', 'list', 'forget'], load: () => import('./status.js') },
  { names: ['mount', 'umount'], load: () => import('./mount.js') },
  { names: ['snapshot', 'events'], load: () => import('./snapshot.js') },
  { names: ['cbt'], load: () => import('./cbt.js') },
  { names: ['restore'], load: () => import('./restore.js') },
  { names: ['backup'], load: () => import('./backup.js') },
  { names: ['replica'], load: () => import('./replica.js') },
  { names: ['serve'], load: () => import('./serve.js') },
  { names: ['sffs'], load: () => import('./sffs.js') },
  { names: ['demo'], load: () => import('./demo.js') },
];

/**
 * Register the commands on `program`: only the module of `commandName` when it names a
 * command, none for the version, every module otherwise (help, usage errors, suggestions for
 * a typo).
 */
export async function registerCommands(program: Command, commandName?: string): Promise<void> {
  // Commander prints the version before it looks for a command, so none needs loading.
  if (commandName === '-V' || commandName === '--version') return;
  const wanted = MODULES.filter((m) => commandName !== undefined && m.names.includes(commandName));
  const modules = await Promise.all((wanted.length > 0 ? wanted : MODULES).map((m) => m.load()));
  for (const mod of modules) mod.register(program);
}
