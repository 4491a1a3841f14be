/**
 * Exports `<device>@asof:<session mount time>`: a registered device as it was at the start of
 * an earlier session, read-only (`snapshot/restore/as-of.ts`), built from the same chain and
 * checked the same way as a restore of that session, without writing the device.
 *
 * The view reads the device for every chunk no session kept, so the device must not change
 * while the view is open: opening it is refused while the device has users (a mount, an NBD
 * client), and while it is open the device table refuses new users (`checkUserAttach`). The
 * daemon holds the device open like a snapshot does (its lock keeps offline tools out).
 * Connections to one name share one view; the last to leave closes it.
 */

import type { Logger } from 'pino';
import { BdsnapError } from '../errors.js';
import type { AsOfViewStatus } from './control-protocol.js';
import { describeAsOfView } from './device-holders.js';
import { checkNotInUse } from '../host/in-use.js';
import type { ExportHandle } from '../nbd/exports.js';
import { findSessionByMountTime, openAsOf, type AsOfDevice } from '../snapshot/restore/index.js';
import type { DeviceTable } from './device-table.js';
import { KeyedQueue } from '../serial-queue.js';
import { canonicalDevicePath, type Registry } from './registry.js';

const MARK = '@asof:';
const TIME = /^\d{4}-?\d{2}-?\d{2}T\d{2}:?\d{2}:?\d{2}(\.\d{1,3})?Z$/;

/** The device and session mount time of `<device>@asof:<time>`; undefined when it is not one. */
export function parseAsOfName(name: string): { device: string; mountTime: string } | undefined {
  const at = name.lastIndexOf(MARK);
  const mountTime = name.slice(at + MARK.length);
  return at > 0 && TIME.test(mountTime) ? { device: name.slice(0, at), mountTime } : undefined;
}

interface OpenView {
  devicePath: string;
  mountTime: string;
  view: AsOfDevice | undefined;
  connections: number;
}

export interface AsOfExportsOptions {
  table: DeviceTable;
  registry: Registry;
  snapshotRoot: string;
  log: Logger;
  /** Where bdsnap mounted the export `name`, if it did: the mount manager knows. */
  mountpointOf?: (name: string) => string | undefined;
}

export class AsOfExports {
  readonly #options: AsOfExportsOptions;
  /** By export name as the client gave it. */
  readonly #views = new Map<string, OpenView>();
  readonly #queue = new KeyedQueue();

  constructor(options: AsOfExportsOptions) {
    this.#options = options;
  }

  /** The names of the views open now (a view exists only while a client has it open). */
  names(): string[] {
    return [...this.#views.keys()];
  }

  /** The views of `devicePath` open now, as status shows them. */
  viewsOf(devicePath: string): AsOfViewStatus[] {
    return [...this.#views].filter(([, v]) => v.devicePath === devicePath).map(([name, v]) => ({
      exportName: name, mountTime: v.mountTime, connections: v.connections, mountpoint: this.#options.mountpointOf?.(name) ?? null,
    }));
  }

  /** Throws EBUSY while `devicePath` is served as of an earlier session (its content must not move), naming the view and how it ends. */
  checkUserAttach(devicePath: string): void {
    const view = this.viewsOf(devicePath)[0];
    if (view) throw new BdsnapError('EBUSY', `${devicePath} is ${describeAsOfView(view)}`);
  }

  /** The export of an as-of name, or undefined when `name` is not one or names no registered device. */
  async open(name: string): Promise<ExportHandle | undefined> {
    const parsed = parseAsOfName(name);
    if (!parsed) return undefined;
    const devicePath = await canonicalDevicePath(parsed.device).catch(() => undefined);
    if (devicePath === undefined || !this.#options.registry.get(devicePath)) return undefined;
    return this.#queue.run(name, async () => {
      let entry = this.#views.get(name);
      if (!entry) {
        entry = { devicePath, mountTime: parsed.mountTime, view: undefined, connections: 0 };
        // Listed before the hold is taken, so a user attaching meanwhile is refused.
        this.#views.set(name, entry);
        try {
          entry.view = await this.#openView(devicePath, parsed.mountTime);
        } catch (err) {
          this.#views.delete(name);
          throw err;
        }
      }
      entry.connections++;
      const view = entry.view!;
      let released = false;
      return {
        name, device: view,
        release: async () => {
          if (released) return;
          released = true;
          await this.#queue.run(name, async () => {
            if (--entry.connections > 0) return;
            this.#views.delete(name);
            await view.close();
            await this.#options.table.detach(devicePath, 'snapshot');
          });
        },
      };
    });
  }

  async #openView(devicePath: string, mountTime: string): Promise<AsOfDevice> {
    const { table, snapshotRoot, log } = this.#options;
    const busy = (): BdsnapError | undefined => {
      const att = table.use(devicePath);
      if (!att || att.userHolds === 0) return undefined;
      const where = att.mount ? `mounted through bdsnap at ${att.mount.mountpoint}` : `open by ${att.connections} NBD client(s)`;
      return new BdsnapError('EBUSY', `${devicePath} is ${where}: its content is moving; an as-of view needs it still (unmount or disconnect first)`);
    };
    const early = busy();
    if (early) throw early;
    await checkNotInUse(devicePath, {}, { exclusiveProbe: !table.isAttached(devicePath) });
    const session = await findSessionByMountTime(snapshotRoot, devicePath, mountTime);
    const att = await table.attach(devicePath, { holder: 'snapshot' });
    try {
      const late = busy();
      if (late) throw late;
      const { view, warnings } = await openAsOf(session.dir, att.file);
      log.info({ event: 'as-of-open', device: devicePath, session: session.dir, ...(warnings.length > 0 ? { warnings } : {}) }, 'serving a device as at an earlier session start');
      return view;
    } catch (err) {
      await table.detach(devicePath, 'snapshot');
      throw err;
    }
  }
}
