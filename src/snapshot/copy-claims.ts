/**
 * Two mechanisms of the copy-before-write engine (CowLayer), its session (CowDevice) and the
 * snapshots' images:
 * - InFlight: a count of requests between their start and their end, so that close() or a
 *   write barrier can wait for them, with a way to run a request counted without adding an
 *   await to it;
 * - CopyClaims: the copies in flight, and the synchronous walk that claims the chunks of a
 *   request still to be copied, in runs of adjacent chunks, so that two requests racing for a
 *   chunk copy it once.
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

interface ClaimedRun {
  first: number;
  last: number;
  promise: Promise<void>;
}

const NO_RUNS: ClaimedRun[] = [];

/**
 * The copies in flight, as runs of adjacent chunks with the promise of each. Runs never
 * overlap (a chunk is claimed by one run at a time), and only a few are in flight at once (one
 * per request in flight at most), so a lookup walks them: a 1 MiB first write claims one entry
 * instead of one per chunk.
 */
export class CopyClaims {
  #runs: ClaimedRun[] = [];

  /** The copy in flight for `chunk`, if any. */
  get(chunk: number): Promise<void> | undefined {
    for (const r of this.#runs) if (r.first <= chunk && chunk <= r.last) return r.promise;
    return undefined;
  }

  has(chunk: number): boolean {
    return this.get(chunk) !== undefined;
  }

  /** Whether a copy is in flight for some chunk of first..last. */
  overlaps(first: number, last: number): boolean {
    for (const r of this.#runs) if (r.first <= last && first <= r.last) return true;
    return false;
  }

  /** The promises of every copy in flight. */
  promises(): Promise<void>[] {
    return this.#runs.map((r) => r.promise);
  }

  /**
   * For chunks first..last: start a copy for each run of adjacent chunks that `needsCopy` and
   * nobody copies yet (at most `maxRunChunks` each, `copyRun(runFirst, runLast)`), hold it as
   * claimed until it settles, and return what the caller must wait for: those copies and the
   * ones already in flight for its chunks (each once). Synchronous from the first look at the
   * claims to the last claim, which is what makes a chunk copied once.
   */
  claim(
    first: number,
    last: number,
    maxRunChunks: number,
    needsCopy: (chunk: number) => boolean,
    copyRun: (runFirst: number, runLast: number) => Promise<void>,
  ): Promise<void>[] {
    const waits: Promise<void>[] = [];
    const inFlight = this.#runs.length === 0 ? NO_RUNS : this.#runs.filter((r) => r.first <= last && first <= r.last).sort((a, b) => a.first - b.first);
    let next = 0;
    let runStart = -1;
    const endRun = (endChunk: number): void => {
      if (runStart < 0) return;
      waits.push(this.#start(runStart, endChunk, copyRun));
      runStart = -1;
    };
    for (let c = first; c <= last; c++) {
      const claimed = inFlight[next];
      if (claimed !== undefined && claimed.first <= c) {
        // Chunks c..claimed.last are being copied by someone else: wait for that copy once.
        endRun(c - 1);
        waits.push(claimed.promise);
        c = claimed.last;
        next++;
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

  #start(first: number, last: number, copyRun: (runFirst: number, runLast: number) => Promise<void>): Promise<void> {
    const run: ClaimedRun = { first, last, promise: copyRun(first, last) };
    this.#runs.push(run);
    // Released when the copy settles, before any waiter resumes (this reaction comes first),
    // and only after copyRun has marked its chunks preserved.
    const release = (): void => {
      const i = this.#runs.indexOf(run);
      if (i >= 0) this.#runs.splice(i, 1);
    };
    run.promise.then(release, release);
    return run.promise;
  }
}
