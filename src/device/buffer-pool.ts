/**
 * BufferPool: reuse of the big buffers of the data path (the NBD server's READ replies and
 * WRITE payloads, the copy-before-write layer's copy buffers).
 * Allocating a fresh megabyte per request costs page faults and, worse, garbage-collector
 * pressure from external memory; a free list per exact size avoids both.
 *
 * Only buffers that own their whole ArrayBuffer are taken back, and the pool holds at most
 * `maxPooledBytes`, so it never grows past what the connections had in flight at once.
 * A buffer must not be touched after it was put back.
 */

export class BufferPool {
  #free = new Map<number, Buffer[]>();
  #pooledBytes = 0;
  #maxPooledBytes: number;

  constructor(maxPooledBytes: number) {
    this.#maxPooledBytes = maxPooledBytes;
  }

  get pooledBytes(): number {
    return this.#pooledBytes;
  }

  /** A buffer of exactly `sizeBytes` bytes, contents undefined. */
  get(sizeBytes: number): Buffer {
    const b = this.#free.get(sizeBytes)?.pop();
    if (b) {
      this.#pooledBytes -= sizeBytes;
      return b;
    }
    return Buffer.allocUnsafeSlow(sizeBytes);
  }

  /** Drop every pooled buffer (the owner is closing). */
  clear(): void {
    this.#free.clear();
    this.#pooledBytes = 0;
  }

  put(b: Buffer): void {
    if (b.byteOffset !== 0 || b.buffer.byteLength !== b.length || b.length === 0) return;
    if (this.#pooledBytes + b.length > this.#maxPooledBytes) return;
    let list = this.#free.get(b.length);
    if (!list) {
      list = [];
      this.#free.set(b.length, list);
    }
    list.push(b);
    this.#pooledBytes += b.length;
  }
}
