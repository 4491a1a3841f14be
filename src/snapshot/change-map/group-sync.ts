/**
 * Group commit of the live map's file ('strict' durability): one fdatasync for every mark that
 * queued while the previous one ran. A batch covers exactly what was written before its sync
 * started; entry ranges written meanwhile wait for the next batch.
 */

import fs from 'node:fs';
import type { BdsnapError } from '../../errors.js';
import { fdatasyncFd } from '../../host/fd-io.js';

interface SyncBatch {
  promise: Promise<void>;
  resolve: () => void;
  reject: (err: BdsnapError) => void;
  /** [first, last, number] of each entry range written before this batch's sync starts. */
  ranges: number[];
  epoch: number;
}

/** What the group sync needs of the map it syncs. */
export interface GroupSyncHost {
  /** The map file's descriptor now (a reset replaces it). */
  fd(): number;
  /** Bumped by every reset, so a batch of the old file does not touch the new state. */
  epoch(): number;
  /** A batch of this epoch reached stable storage: its entry ranges ([first, last, number]...) are durable. */
  durable(ranges: readonly number[]): void;
  /** The sync failed: the error its waiters get. */
  failed(err: Error): BdsnapError;
}

export class GroupSync {
  readonly #host: GroupSyncHost;
  #syncing: SyncBatch | undefined;
  #next: SyncBatch | undefined;

  constructor(host: GroupSyncHost) {
    this.#host = host;
  }

  /** A sync is running now. */
  get inFlight(): boolean {
    return this.#syncing !== undefined;
  }

  /** A batch waits for the next sync. */
  get queued(): boolean {
    return this.#next !== undefined;
  }

  /**
   * A promise resolved once everything written so far is on stable storage. With `lo`..`hi`
   * and `n`: entries lo..hi were just written with number n, and count as durable after that sync.
   */
  wait(lo?: number, hi?: number, n?: number): Promise<void> {
    const marked = n !== undefined;
    // Everything written before the sync in flight started is covered by it.
    if (!marked && !this.#next && this.#syncing) return this.#syncing.promise;
    if (!this.#next) {
      let resolve!: () => void;
      let reject!: (err: BdsnapError) => void;
      const promise = new Promise<void>((res, rej) => {
        resolve = res;
        reject = rej;
      });
      this.#next = { promise, resolve, reject, ranges: [], epoch: this.#host.epoch() };
      if (!this.#syncing) queueMicrotask(() => this.#start());
    }
    if (marked) this.#next.ranges.push(lo!, hi!, n);
    return this.#next.promise;
  }

  /** Resolves when the sync in flight and the queued one are over, whatever their outcome. */
  async settled(): Promise<void> {
    await this.#syncing?.promise.catch(() => undefined);
    await this.#next?.promise.catch(() => undefined);
  }

  #start(): void {
    const batch = this.#next;
    if (!batch || this.#syncing) return;
    this.#next = undefined;
    this.#syncing = batch;
    const fd = this.#host.fd();
    const done = (err: Error | null): void => {
      this.#syncing = undefined;
      if (fd !== this.#host.fd()) {
        // A reset replaced the file meanwhile: its old fd was kept open for this sync only.
        fs.close(fd, () => undefined);
        batch.resolve();
      } else if (err) {
        batch.reject(this.#host.failed(err));
      } else {
        if (batch.epoch === this.#host.epoch()) this.#host.durable(batch.ranges);
        batch.resolve();
      }
      if (this.#next) this.#start();
    };
    fdatasyncFd(fd).then(() => done(null), done);
  }
}
