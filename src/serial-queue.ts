/**
 * One-at-a-time execution of async tasks, for any layer: a task starts when the one queued
 * before it has settled, and a failed task does not stop the ones queued after it (its caller
 * gets the failure; the queue goes on).
 */
export class SerialQueue {
  #tail: Promise<unknown> = Promise.resolve();

  /** Run `fn` after every task queued before it; resolves or rejects as `fn` does. */
  run<T>(fn: () => Promise<T>): Promise<T> {
    const result = this.#tail.then(fn, fn);
    this.#tail = result.catch(() => undefined);
    return result;
  }

  /** Resolves once every task queued so far has settled. */
  async idle(): Promise<void> {
    await this.#tail;
  }
}
