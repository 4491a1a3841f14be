/**
 * InFlightBudget: the bytes that all the connections of one NBD server may hold at once, so
 * that many clients asking for a few bytes each (a 28-byte READ header asks for 32 MiB) cannot
 * make the server hold more than this between them.
 *
 * Invariants:
 * - A request is admitted only when its bytes fit (or nothing at all is held, so that one
 *   request larger than the whole budget still gets through, alone); otherwise it waits in
 *   line and its connection stops reading. Requests wait, they are never refused.
 * - First come, first served: while anyone waits, a newcomer waits behind it, so a stream of
 *   small requests cannot starve a big one.
 * - Replies already built are charged whatever the balance (charge()), and everything taken is
 *   given back exactly once (release()); the balance may run over the limit by those replies,
 *   which only holds up further admissions.
 * - After a burst (the balance reached `burstBytes`) `onBurstOver` is called once the balance is
 *   back under a quarter of that: the memory of the burst is free again and can be handed back.
 */

import { BdsnapError } from '../errors.js';

interface Waiter {
  bytes: number;
  granted: () => void;
}

export class InFlightBudget {
  readonly limitBytes: number;
  #usedBytes = 0;
  #waiting: Waiter[] = [];
  readonly #burstBytes: number;
  readonly #onBurstOver: (() => void) | undefined;
  #inBurst = false;

  constructor(limitBytes: number, burst?: { bytes: number; over: () => void }) {
    if (!Number.isSafeInteger(limitBytes) || limitBytes <= 0) throw new BdsnapError('EINVAL', `bad in-flight budget ${limitBytes}`);
    this.limitBytes = limitBytes;
    this.#burstBytes = burst?.bytes ?? Number.POSITIVE_INFINITY;
    this.#onBurstOver = burst?.over;
  }

  get usedBytes(): number {
    return this.#usedBytes;
  }

  /** Connections waiting for room. */
  get waitingCount(): number {
    return this.#waiting.length;
  }

  /**
   * Take `bytes` now if they fit and nobody waits ahead (returns true); otherwise queue, and
   * call `granted` once they have been taken for the caller (returns false).
   */
  acquire(bytes: number, granted: () => void): boolean {
    if (this.#waiting.length === 0 && this.#fits(bytes)) {
      this.#usedBytes += bytes;
      if (this.#usedBytes >= this.#burstBytes) this.#inBurst = true;
      return true;
    }
    this.#waiting.push({ bytes, granted });
    return false;
  }

  /** Take `bytes` whatever the balance: memory that is already in use (a reply being sent). */
  charge(bytes: number): void {
    this.#usedBytes += bytes;
    if (this.#usedBytes >= this.#burstBytes) this.#inBurst = true;
  }

  /** Give back bytes taken by acquire() (once granted) or charge(). */
  release(bytes: number): void {
    if (bytes === 0) return;
    this.#usedBytes -= bytes;
    if (this.#inBurst && this.#usedBytes < this.#burstBytes / 4) {
      this.#inBurst = false;
      this.#onBurstOver?.();
    }
    this.#grantWaiting();
  }

  /** Leave the line (the connection closed while waiting); nothing was taken. */
  cancel(granted: () => void): void {
    const at = this.#waiting.findIndex((w) => w.granted === granted);
    if (at < 0) return;
    this.#waiting.splice(at, 1);
    // Whoever waited behind it may fit now.
    if (at === 0) this.#grantWaiting();
  }

  #grantWaiting(): void {
    // Every release of every request comes here: nothing to do, nothing allocated.
    if (this.#waiting.length === 0 || !this.#fits(this.#waiting[0]!.bytes)) return;
    const granted: Array<() => void> = [];
    while (this.#waiting.length > 0 && this.#fits(this.#waiting[0]!.bytes)) {
      const w = this.#waiting.shift()!;
      this.#usedBytes += w.bytes;
      if (this.#usedBytes >= this.#burstBytes) this.#inBurst = true;
      granted.push(w.granted);
    }
    // Called once the balance is settled: a granted connection may take or give back more.
    for (const g of granted) g();
  }

  #fits(bytes: number): boolean {
    return this.#usedBytes === 0 || this.#usedBytes + bytes <= this.limitBytes;
  }
}
