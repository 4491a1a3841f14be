/**
 * Cleanup in reverse order of setup. node:test runs `t.after` hooks in the order they were
 * added, but a stack of resources (server, then FUSE, then loop device, then mount) must be
 * torn down from the top. Every step runs even when an earlier one fails; the failures are
 * reported together at the end.
 *
 * Helpers that set something up for a test (temp dirs, servers, daemons) register its removal
 * on the test's one stack, `cleanupOf(t)`, so a directory is removed only after the server
 * that uses it has stopped, whichever helper made which.
 */

import type { AfterHook } from './files.js';

export class CleanupStack implements AfterHook {
  #steps: (() => unknown)[] = [];
  #ran = false;

  /** With a test context, the stack runs after the test. */
  constructor(t?: AfterHook) {
    t?.after(() => this.run());
  }

  after(fn: () => unknown): void {
    this.#steps.push(fn);
  }

  async run(): Promise<void> {
    if (this.#ran) return;
    this.#ran = true;
    const errors: unknown[] = [];
    while (this.#steps.length > 0) {
      const step = this.#steps.pop() as () => unknown;
      try {
        await step();
      } catch (err) {
        errors.push(err);
      }
    }
    if (errors.length === 1) throw errors[0];
    if (errors.length > 1) throw new AggregateError(errors, `${errors.length} cleanup steps failed: ${errors.map(String).join('\n')}`);
  }
}

const stacks = new WeakMap<AfterHook, CleanupStack>();

/**
 * The cleanup stack of a test, made (and hooked to `t.after`) on first use. A CleanupStack is
 * its own stack, so helpers given one push onto it.
 */
export function cleanupOf(t: AfterHook): CleanupStack {
  if (t instanceof CleanupStack) return t;
  let stack = stacks.get(t);
  if (stack === undefined) {
    stack = new CleanupStack(t);
    stacks.set(t, stack);
  }
  return stack;
}
