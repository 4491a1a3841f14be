/**
 * DeferredSync: when a session in 'process' durability seals and syncs its store in the
 * background. Not after every record (a sync while first writes go on competes with them for
 * the disk and the store's inode: measured, 4 KiB first writes at depth 1 ran at 0.6x of their
 * speed with a sync every second), but once the session has stored nothing new for IDLE_MS,
 * or MAX_MS after the first unsynced record under a steady stream of first writes; the
 * kernel's own writeback starts after about 30 s too, so the longer bound changes little.
 */

const IDLE_MS = 1000;
const MAX_MS = 30_000;

export class DeferredSync {
  readonly #clockMs: () => number;
  readonly #run: () => Promise<void>;
  readonly #stopped: () => boolean;
  #timer: NodeJS.Timeout | undefined;
  /** When the oldest record not yet covered by a background sync was stored (ms, monotonic). */
  #unsyncedSince: number | undefined;
  /** When the latest record was stored (ms, monotonic). */
  #lastStoredAt = 0;
  #running: Promise<void> | undefined;

  /** `run` seals and syncs; `stopped` says the session is closing (it syncs then itself). */
  constructor(clockMs: () => number, run: () => Promise<void>, stopped: () => boolean) {
    this.#clockMs = clockMs;
    this.#run = run;
    this.#stopped = stopped;
  }

  /** Called for every stored run: one timer, re-armed only when it fires (not per chunk). */
  stored(): void {
    const now = this.#clockMs();
    this.#lastStoredAt = now;
    this.#unsyncedSince ??= now;
    if (!this.#timer) this.#arm(IDLE_MS);
  }

  /** No more background syncs; waits for one running. */
  async stop(): Promise<void> {
    if (this.#timer) clearTimeout(this.#timer);
    await this.#running;
  }

  #arm(delayMs: number): void {
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      if (this.#stopped()) return;
      const now = this.#clockMs();
      const idleFor = now - this.#lastStoredAt;
      const unsyncedFor = now - (this.#unsyncedSince ?? now);
      if (idleFor < IDLE_MS && unsyncedFor < MAX_MS) {
        // Still storing: wait for a pause, but not past the longer bound.
        this.#arm(Math.min(IDLE_MS - idleFor, MAX_MS - unsyncedFor));
        return;
      }
      this.#unsyncedSince = undefined;
      this.#running = this.#run().finally(() => (this.#running = undefined));
    }, delayMs);
    this.#timer.unref();
  }
}
