/**
 * Polling for a state that no event announces (a file appearing, a process's view of a
 * daemon): checks `check` every `intervalMs` until it holds, and fails naming `what` after
 * `timeoutMs`. Where the code under test emits an event, await the event instead.
 */

import { setTimeout as delay } from 'node:timers/promises';

export async function until(what: string, check: () => boolean | Promise<boolean>, timeoutMs = 10_000, intervalMs = 10): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await delay(intervalMs);
  }
}
