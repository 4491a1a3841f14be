/**
 * The two mechanisms every copy-before-write layer shares (the session's CowDevice, the
 * snapshots' SnapshotLayer and their images):
 * - InFlight: a count of requests between their start and their end, so that close() or a
 *   write barrier can wait for them, with a way to run a request counted without adding an
 *   await to it;
 * - claimCopies: the synchronous walk that claims the chunks of a request still to be copied,
 *   in runs of adjacent chunks, so that two requests racing for a chunk copy it once.
 */

export class InFlight {
  #count = 0;
  #idleWaiters: Array<() => void> = [];

  get count(): number {
    return this.#count;
  }

  enter(): void {
    this.#count++;
  }

  leave(): void {
    if (--this.#count === 0) for (const w of this.#idleWaiters.splice(0)) w();
  }

  /** Resolves once nothing is in flight (at once if nothing is). */
  idle(): Promise<void> {
    if (this.#count === 0) return Promise.resolve();
    return new Promise<void>((resolve) => this.#idleWaiters.push(resolve));
  }

  /**
   * Run `apply` counted. The promise returned is apply's own: the fast path of a layer (nothing
   * to copy) must cost what the bare device costs, so no await is added.
   */
  run(apply: () => Promise<void>): Promise<void> {
    this.enter();
    let p: Promise<void>;
    try {
      p = apply();
    } catch (err) {
      this.leave();
      return Promise.reject(err);
    }
    const leave = (): void => this.leave();
    p.then(leave, leave);
    return p;
  }

  /** Run `work` counted, settling with it. */
  async track<T>(work: () => Promise<T>): Promise<T> {
    this.enter();
    try {
      return await work();
    } finally {
      this.leave();
    }
  }
}

/**
 * For chunks first..last: start a copy for each run of adjacent chunks that `needsCopy` and
 * nobody copies yet (at most `maxRunChunks` each, `copyRun(runFirst, runLast)`), record it in
 * `copying` for each of its chunks until it settles, and return what the caller must wait for:
 * those copies and the ones already in flight for its chunks. Synchronous from the first look
 * at `copying` to the last claim, which is what makes a chunk copied once.
 */
export function claimCopies(
  first: number,
  last: number,
  maxRunChunks: number,
  copying: Map<number, Promise<void>>,
  needsCopy: (chunk: number) => boolean,
  copyRun: (runFirst: number, runLast: number) => Promise<void>,
): Promise<void>[] {
  const waits: Promise<void>[] = [];
  let runStart = -1;
  const endRun = (endChunk: number): void => {
    if (runStart < 0) return;
    const runFirst = runStart;
    const p = copyRun(runFirst, endChunk);
    for (let c = runFirst; c <= endChunk; c++) copying.set(c, p);
    // Released when the copy settles, before any waiter resumes (this reaction comes first),
    // and only after copyRun has marked its chunks preserved.
    const release = (): void => {
      for (let c = runFirst; c <= endChunk; c++) if (copying.get(c) === p) copying.delete(c);
    };
    p.then(release, release);
    waits.push(p);
    runStart = -1;
  };
  for (let c = first; c <= last; c++) {
    const inFlight = copying.get(c);
    if (inFlight) {
      endRun(c - 1);
      waits.push(inFlight);
      continue;
    }
    if (!needsCopy(c)) {
      endRun(c - 1);
      continue;
    }
    if (runStart < 0) runStart = c;
    if (c - runStart + 1 >= maxRunChunks) endRun(c);
  }
  endRun(last);
  return waits;
}
