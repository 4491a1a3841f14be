/**
 * Where the daemon and its clients meet: the run directory and the sockets in it. The daemon
 * creates them and every client finds them here, so both import these names from this file.
 */

import path from 'node:path';

export const DEFAULT_RUN_DIR = '/run/bdsnap';
/** The daemon's state directory (registry, change maps, instant restores), unless --state-dir moves it. */
export const DEFAULT_STATE_DIR = '/var/lib/bdsnap';
/** The environment variable that moves the run directory for the daemon and its clients. */
export const RUN_DIR_ENV = 'BDSNAP_RUN_DIR';
export const CONTROL_SOCKET = 'control.sock';
export const NBD_SOCKET = 'nbd.sock';

/** The run directory: the argument, else $BDSNAP_RUN_DIR, else /run/bdsnap. */
export function resolveRunDir(runDir?: string): string {
  return path.resolve(runDir ?? process.env[RUN_DIR_ENV] ?? DEFAULT_RUN_DIR);
}

/** The daemon's control socket in `runDir`. */
export function controlSocketPath(runDir: string): string {
  return path.join(runDir, CONTROL_SOCKET);
}

/** The daemon's NBD socket in `runDir`. */
export function nbdSocketPath(runDir: string): string {
  return path.join(runDir, NBD_SOCKET);
}
