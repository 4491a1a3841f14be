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

/**
 * A SerialQueue per key: the tasks of one key run one at a time in the order they were queued,
 * the tasks of different keys independently. A key's queue is dropped once it is idle.
 */
export class KeyedQueue {
  readonly #tails = new Map<string, Promise<unknown>>();

  /** Run `fn` after every task queued before it under `key`; resolves or rejects as `fn` does. */
  run<T>(key: string, fn: () => Promise<T>): Promise<T> {
    const previous = this.#tails.get(key) ?? Promise.resolve();
    const result = previous.then(fn, fn);
    const tail = result.catch(() => undefined);
    this.#tails.set(key, tail);
    void tail.then(() => {
      if (this.#tails.get(key) === tail) this.#tails.delete(key);
    });
    return result;
  }
}
