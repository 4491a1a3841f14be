/**
 * Test helpers for backups: a SnapshotProvider over a real `bdsnap serve` process (a snapshot
 * is a copy of each image, served read-only; reads go over the real NBD client), a change log
 * standing in for the change map, and an ObjectStore that counts what goes through it.
 */

import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { BlockDevice } from '../../src/device/block-device.js';
import { NbdClient } from '../../src/nbd/client.js';
import type { GetOptions, ObjectInfo, ObjectStore } from '../../src/repository/object-store.js';
import { Repository, type ByteRange, type InitOptions, type Snapshot, type SnapshotProvider } from '../../src/backup/index.js';
import { startServer, type NbdServer } from '../helpers/server.js';

export interface ServeProviderOptions {
  /** Serve copies (default), so the originals can change while a backup reads; or the images themselves. */
  copy?: boolean;
  /** Delay each read by this long (to catch a backup in the middle). */
  readDelayMs?: number;
}

export class ServeSnapshotProvider implements SnapshotProvider {
  /** Bytes read through the image readers, per device. */
  readonly readBytes = new Map<string, number>();
  readonly destroyed: string[] = [];
  generation = 'g1';
  readonly #dir: string;
  readonly #options: ServeProviderOptions;
  readonly #counter = new Map<string, number>();
  readonly #changes: Array<{ device: string; after: number; range: ByteRange }> = [];
  readonly #live = new Map<string, { server: NbdServer; copies: string[] }>();
  #taken = 0;

  constructor(dir: string, options: ServeProviderOptions = {}) {
    this.#dir = dir;
    this.#options = options;
  }

  /** Write to a device and record the range, as the change map would. */
  write(device: string, offsetBytes: number, data: Buffer): void {
    const fd = fs.openSync(device, 'r+');
    try {
      fs.writeSync(fd, data, 0, data.length, offsetBytes);
    } finally {
      fs.closeSync(fd);
    }
    this.#changes.push({ device, after: this.#counter.get(device) ?? 0, range: { offsetBytes, lengthBytes: data.length } });
  }

  async take(devices: string[]): Promise<Snapshot> {
    const id = `snap${++this.#taken}`;
    const copies = devices.map((d) => {
      if (this.#options.copy === false) return d;
      const copy = path.join(this.#dir, `${id}-${path.basename(d)}`);
      fs.copyFileSync(d, copy);
      return copy;
    });
    const server = await startServer(undefined, { kind: 'bdsnap', images: copies, readOnly: true });
    this.#live.set(id, { server, copies });
    const images = devices.map((device, k) => {
      const number = (this.#counter.get(device) ?? 0) + 1;
      this.#counter.set(device, number);
      return {
        device,
        sizeBytes: deviceBytes(device),
        changeMap: { generation: this.generation, number },
        open: async (): Promise<BlockDevice & { close(): Promise<void> }> => {
          const client = await NbdClient.connect({ socketPath: server.socketPath, exportName: server.exportNames[k]! });
          const read = client.read.bind(client);
          client.read = async (target: Buffer, offsetBytes: number): Promise<void> => {
            if (this.#options.readDelayMs) await new Promise((r) => setTimeout(r, this.#options.readDelayMs));
            this.readBytes.set(device, (this.readBytes.get(device) ?? 0) + target.length);
            await read(target, offsetBytes);
          };
          return client;
        },
        changedSince: async (generation: string, since: number): Promise<ByteRange[] | null> => {
          if (generation !== this.generation) return null;
          return this.#changes.filter((c) => c.device === device && c.after >= since && c.after < number).map((c) => c.range);
        },
      };
    });
    return { id, images };
  }

  /** Pids of the servers of the snapshots not yet destroyed. */
  serverPids(): number[] {
    return [...this.#live.values()].map((l) => l.server.pid);
  }

  async destroy(id: string): Promise<void> {
    const live = this.#live.get(id);
    if (!live) throw new Error(`no snapshot ${id}`);
    this.#live.delete(id);
    await live.server.stop();
    if (this.#options.copy !== false) for (const c of live.copies) fs.rmSync(c, { force: true });
    this.destroyed.push(id);
  }
}

/** The size of an image file or block device (stat says 0 for a device node). */
function deviceBytes(device: string): number {
  const st = fs.statSync(device);
  if (!st.isBlockDevice()) return st.size;
  return Number(fs.readFileSync(`/sys/class/block/${path.basename(fs.realpathSync(device))}/size`, 'utf8').trim()) * 512;
}

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

/** Total size of the files under `dir`. */
export function dirBytes(dir: string): number {
  let total = 0;
  for (const e of fs.readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (e.isFile()) total += fs.statSync(path.join(e.parentPath, e.name)).size;
  }
  return total;
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
