/**
 * BufferPool: reuse of the big buffers of the data path (the NBD server's READ replies and
 * WRITE payloads, the copy-before-write layer's copy buffers).
 * Allocating a fresh megabyte per request costs page faults and, worse, garbage-collector
 * pressure from external memory; a free list per exact size avoids both.
 *
 * Only buffers that own their whole ArrayBuffer are taken back, and the pool holds at most
 * `maxPooledBytes`, so it never grows past what the connections had in flight at once.
 * A buffer must not be touched after it was put back.
 *
 * It keeps at most MAX_SIZES sizes, dropping the one taken from least recently: real clients
 * ask for a handful of sizes over and over, while a client sending random lengths would
 * otherwise fill the pool to its cap with buffers of sizes nobody asks for again (a fuzz run of
 * a million frames left 1,082 sizes and 64 MiB there, memory held for good).
 */

const MAX_SIZES = 16;

export class BufferPool {
  #free = new Map<number, Buffer[]>();
  #pooledBytes = 0;
  #maxPooledBytes: number;
  /** The size last moved to the end of #free (most recently used): a client asking for one size over and over moves nothing. */
  #recent = -1;

  constructor(maxPooledBytes: number) {
    this.#maxPooledBytes = maxPooledBytes;
  }

  get pooledBytes(): number {
    return this.#pooledBytes;
  }

  /** A buffer of exactly `sizeBytes` bytes, contents undefined. */
  get(sizeBytes: number): Buffer {
    const list = this.#free.get(sizeBytes);
    const b = list?.pop();
    if (b) {
      this.#pooledBytes -= sizeBytes;
      // Most recently used last: the first key is the one to drop.
      if (sizeBytes !== this.#recent) {
        this.#free.delete(sizeBytes);
        this.#free.set(sizeBytes, list!);
        this.#recent = sizeBytes;
      }
      return b;
    }
    return Buffer.allocUnsafeSlow(sizeBytes);
  }

  /** Drop every pooled buffer (the owner is closing). */
  clear(): void {
    this.#free.clear();
    this.#pooledBytes = 0;
    this.#recent = -1;
  }

  put(b: Buffer): void {
    if (b.byteOffset !== 0 || b.buffer.byteLength !== b.length || b.length === 0) return;
    if (b.length > this.#maxPooledBytes) return;
    let list = this.#free.get(b.length);
    if (list) {
      if (this.#pooledBytes + b.length > this.#maxPooledBytes) return;
    } else {
      // A size new to the pool makes room by dropping the least recently used ones.
      while (this.#free.size > 0 && (this.#free.size >= MAX_SIZES || this.#pooledBytes + b.length > this.#maxPooledBytes)) this.#dropLeastRecent();
      list = [];
      this.#free.set(b.length, list);
      this.#recent = b.length;
    }
    list.push(b);
    this.#pooledBytes += b.length;
  }

  #dropLeastRecent(): void {
    const [size, list] = this.#free.entries().next().value as [number, Buffer[]];
    this.#pooledBytes -= size * list.length;
    this.#free.delete(size);
  }
}
