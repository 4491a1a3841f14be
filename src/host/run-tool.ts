/**
 * Running a system tool (mount, losetup, nbd-client, fsfreeze, mkfs): argv without a shell,
 * a time limit, and a failure as one line for the CLI: ENOTSUP when the tool is not installed,
 * EIO with what it printed on stderr otherwise.
 */

import { execFile } from 'node:child_process';
import { BdsnapError } from '../errors.js';

export const TOOL_TIMEOUT_MS = 60_000;

/** A tool's stderr as one line for the CLI's one-line errors, without generic hints. */
export function oneLine(text: string): string {
  return text.split('\n').map((l) => l.trim()).filter((l) => l && !l.startsWith('dmesg(1)')).join('; ');
}

/**
 * Run `cmd` with `args`; resolves with its stdout. Errors: ENOTSUP (not installed), EIO (failed,
 * killed, or out of time), whose message starts with `what` when given ("cannot freeze X").
 */
export function runTool(cmd: string, args: readonly string[], options: { timeoutMs?: number; what?: string } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { encoding: 'utf8', timeout: options.timeoutMs ?? TOOL_TIMEOUT_MS }, (err, stdout, stderr) => {
      if (!err) {
        resolve(stdout);
        return;
      }
      const missing = (err as NodeJS.ErrnoException).code === 'ENOENT';
      const detail = missing ? `${cmd} is not installed` : oneLine(stderr || err.message);
      const reason = options.what !== undefined ? `${options.what}: ${detail}` : missing ? detail : `${cmd} ${args.join(' ')} failed: ${detail}`;
      reject(new BdsnapError(missing ? 'ENOTSUP' : 'EIO', reason, { cause: err }));
    });
  });
}
