/**
 * StaticExports: a fixed list of devices, each under its name. The empty name selects the
 * first. Handles share the device (it is closed by whoever opened it, not by the server), so
 * release() only counts connections.
 */

import type { BlockDevice } from '../device/block-device.js';
import { BdsnapError } from '../errors.js';
import type { ExportHandle, ExportProvider, MetaContextSource } from './exports.js';

export interface StaticExport {
  name: string;
  device: BlockDevice;
  description?: string;
  /** Metadata contexts besides base:allocation. */
  metaContexts?: MetaContextSource[];
}

export class StaticExports implements ExportProvider {
  #exports: StaticExport[];
  #openHandles = 0;

  constructor(exports: StaticExport[]) {
    if (exports.length === 0) throw new BdsnapError('EINVAL', 'no exports given');
    const names = new Set<string>();
    for (const e of exports) {
      if (names.has(e.name)) throw new BdsnapError('EINVAL', `export "${e.name}" is given twice`);
      names.add(e.name);
    }
    this.#exports = [...exports];
  }

  /** Handles given out and not yet released. */
  get openHandles(): number {
    return this.#openHandles;
  }

  async list(): Promise<string[]> {
    return this.#exports.map((e) => e.name);
  }

  async open(name: string, _purpose: 'info' | 'go'): Promise<ExportHandle | undefined> {
    const found = name === '' ? this.#exports[0] : this.#exports.find((e) => e.name === name);
    if (!found) return undefined;
    this.#openHandles++;
    let released = false;
    return {
      name: found.name,
      description: found.description,
      device: found.device,
      metaContexts: found.metaContexts,
      release: async () => {
        if (released) return;
        released = true;
        this.#openHandles--;
      },
    };
  }
}
