/**
 * Polling for a state that no event announces (a file appearing, a process's view of a
 * daemon): checks `check` every `intervalMs` until it holds, and fails naming `what` after
 * `timeoutMs` (a function is asked only then, so it can tell what the last check saw). Where
 * the code under test emits an event, await the event instead.
 */

import { setTimeout as delay } from 'node:timers/promises';

export async function until(what: string | (() => string), check: () => boolean | Promise<boolean>, timeoutMs = 10_000, intervalMs = 10): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${typeof what === 'string' ? what : what()}`);
    await delay(intervalMs);
  }
}
