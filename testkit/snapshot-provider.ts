/**
 * A SnapshotProvider over a real `bdsnap serve` process, for driving backups without the daemon:
 * a snapshot is a copy of each image, served read-only; reads go over the real NBD client; a
 * change log stands in for the change map.
 */

import fs from 'node:fs';
import path from 'node:path';
import type { BlockDevice } from '../src/device/block-device.js';
import { NbdClient } from '../src/nbd/client.js';
import type { ByteRange, Snapshot, SnapshotProvider } from '../src/backup/index.js';
import { startServer, type NbdServer } from './server.js';

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
