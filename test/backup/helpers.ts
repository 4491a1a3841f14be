/**
 * Test helpers for backups: an ObjectStore that counts what goes through it, repositories with
 * cheap keys, and ways to find, damage and recognise pieces. The SnapshotProvider over a real
 * `bdsnap serve` process is in testkit/, since the benchmarks use it too.
 */

import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { GetOptions, ObjectInfo, ObjectStore } from '../../src/repository/object-store.js';
import { Repository, type InitOptions } from '../../src/backup/index.js';

/** An ObjectStore wrapper that counts puts (by name prefix) and gets. */
export class CountingStore implements ObjectStore {
  readonly puts: string[] = [];
  gets = 0;
  readonly #inner: ObjectStore;

  constructor(inner: ObjectStore) {
    this.#inner = inner;
  }
  get location(): string {
    return this.#inner.location;
  }
  put(name: string, data: Buffer | readonly Buffer[]): Promise<void> {
    this.puts.push(name);
    return this.#inner.put(name, data);
  }
  stage(name: string, data: Buffer | readonly Buffer[]): Promise<void> {
    this.puts.push(name);
    return this.#inner.stage(name, data);
  }
  commit(): Promise<void> {
    return this.#inner.commit();
  }
  discard(): Promise<void> {
    return this.#inner.discard();
  }
  get(name: string, options?: GetOptions): Promise<Buffer> {
    this.gets++;
    return this.#inner.get(name, options);
  }
  stat(name: string): Promise<ObjectInfo | undefined> {
    return this.#inner.stat(name);
  }
  list(prefix: string): Promise<ObjectInfo[]> {
    return this.#inner.list(prefix);
  }
  names(prefix: string): Promise<string[]> {
    return this.#inner.names(prefix);
  }
  delete(name: string): Promise<void> {
    return this.#inner.delete(name);
  }
  removeIncomplete(olderThanMs: number): Promise<number> {
    return this.#inner.removeIncomplete(olderThanMs);
  }
  /** Objects written that hold pieces (packs, or v1 piece objects). */
  piecePuts(): number {
    return this.puts.filter((n) => n.startsWith('pieces/') || n.startsWith('packs/')).length;
  }
}

/** The password of the test repositories, and cheap scrypt parameters for the library's keys (the CLI uses the defaults). */
export const TEST_PASSWORD = 'correct horse battery staple';
export const TEST_SCRYPT = { N: 1024, r: 8, p: 1 };

/** A new encrypted repository (the default) with the test password. */
export function initRepo(store: ObjectStore, options: InitOptions = {}): Promise<Repository> {
  return Repository.init(store, { password: TEST_PASSWORD, scrypt: TEST_SCRYPT, ...options });
}

export function openRepo(store: ObjectStore): Promise<Repository> {
  return Repository.open(store, { password: () => TEST_PASSWORD });
}

/** Where a piece's stored bytes are in a local repository: a file and a byte range of it. */
export async function pieceBytes(repo: Repository, repoDir: string, id: string): Promise<{ file: string; offsetBytes: number; lengthBytes: number }> {
  const at = (await repo.pieceIndex()).get(id);
  if (!at) throw new Error(`piece ${id} is not stored`);
  const file = path.join(repoDir, at.object);
  return { file, offsetBytes: at.offsetBytes, lengthBytes: at.lengthBytes ?? fs.statSync(file).size };
}

/** Flip one byte of a file, in place. */
export function flipByteAt(file: string, offsetBytes: number): void {
  const fd = fs.openSync(file, 'r+');
  try {
    const b = Buffer.alloc(1);
    fs.readSync(fd, b, 0, 1, offsetBytes);
    b[0]! ^= 0x5a;
    fs.writeSync(fd, b, 0, 1, offsetBytes);
  } finally {
    fs.closeSync(fd);
  }
}

/** Text that an unencrypted piece keeps readable and an encrypted repository must never show. */
export const PLAINTEXT_MARKER = 'BDSNAP-PLAINTEXT-MARKER-7f3a9c';

export function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

/** An image: text holding the marker, random bytes, zeroes, and a repeated piece. */
export function markedImage(sizeBytes: number, seed: number): Buffer {
  const img = Buffer.alloc(sizeBytes);
  img.write(`${PLAINTEXT_MARKER} the quick brown fox jumps over the lazy dog\n`.repeat(Math.floor(sizeBytes / 4 / 80)), 0);
  const random = randomBytes(sizeBytes / 4);
  random[0] = seed;
  // In incompressible bytes too, where an unencrypted piece is stored raw and shows it as it is.
  for (let at = 0; at + 4096 < random.length; at += 64 * 1024) random.write(PLAINTEXT_MARKER, at + 1000);
  random.copy(img, sizeBytes / 4);
  img.copy(img, (3 * sizeBytes) / 4, 0, sizeBytes / 8);
  return img;
}

/**
 * What of `img` shows in stored objects: the marker in any object's bytes, and the plain sha256
 * (hex or binary) of any of its pieces in any object's name or bytes.
 */
export function plaintextIn(img: Buffer, pieceSizeBytes: number, objects: Iterable<{ name: string; bytes?: Buffer }>): { marker: boolean; hashes: string[] } {
  const plainIds = new Set<string>();
  for (let at = 0; at < img.length; at += pieceSizeBytes) plainIds.add(sha256(img.subarray(at, at + pieceSizeBytes)));
  const needles = [...plainIds].flatMap((h) => [Buffer.from(h), Buffer.from(h, 'hex')]);
  let marker = false;
  const hashes = new Set<string>();
  for (const o of objects) {
    for (const h of plainIds) if (o.name.includes(h)) hashes.add(h);
    if (o.bytes === undefined) continue;
    if (o.bytes.includes(PLAINTEXT_MARKER)) marker = true;
    for (const n of needles) if (o.bytes.includes(n)) hashes.add(n.length === 64 ? n.toString() : n.toString('hex'));
  }
  return { marker, hashes: [...hashes] };
}
