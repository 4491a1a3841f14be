/**
 * The SnapshotProvider of a running daemon: snapshots taken through its control socket,
 * images read over its NBD socket, and what changed since an earlier backup answered by the
 * image's own frozen change map (the daemon's `snapshot-changes`), which is exact for the
 * image and includes writes made to the image itself.
 *
 * A daemon that ends while a backup needs it (killed, crashed, stopped by its service manager)
 * fails whatever the backup was doing with it, in words of the layer that met it: the NBD
 * client's connect ("cannot connect to the NBD server: ..."), its handshake or a read ("NBD
 * connection failed: write EPIPE", "the NBD connection was closed"), the control client.
 * Every request to the daemon goes through DaemonLink.guard, which tells such an end from any
 * other failure by asking the daemon, on the backup's own control connection, whether it is
 * still there (that connection ends with the daemon), and backupThroughDaemon then says what
 * happened in one message, whichever layer met it first.
 */

import { BdsnapError } from '../errors.js';
import { NbdClient } from '../nbd/client.js';
import type { Repository } from '../repository/repository.js';
import { BdsnapClient } from '../service/client.js';
import { nbdSocketPath, resolveRunDir } from '../service/paths.js';
import { withTimeout } from '../timeout.js';
import { formatBytes } from '../units.js';
import { backupDevices, type AgentOptions, type ImageReader, type Snapshot, type SnapshotProvider } from './agent.js';
import type { BackupSummary } from './create.js';

/** How long a daemon that is there takes at most to answer the ping that asks (it answers in milliseconds). */
const PROBE_MS = 5000;

/**
 * `bdsnap backup create`: back `devices` up from one snapshot taken by the daemon of `runDir`
 * (default: the usual run directory). Errors: the daemon cannot be reached (with what to know
 * about it), its connection ended during the backup (ESHUTDOWN, saying so: nothing of the
 * backup is recorded, since its manifest is written last), or as backupDevices throws them.
 */
export async function backupThroughDaemon(repo: Repository, devices: string[], runDir: string | undefined, options: AgentOptions): Promise<BackupSummary> {
  let client: BdsnapClient;
  try {
    client = await BdsnapClient.connect(runDir);
  } catch (err) {
    throw new BdsnapError((err as BdsnapError).code ?? 'ENOENT', `backup create takes snapshots through the daemon: ${(err as Error).message}`, { cause: err });
  }
  const link = new DaemonLink(client);
  try {
    return await backupDevices(repo, daemonSnapshotProvider(client, resolveRunDir(runDir), link), devices, options);
  } catch (err) {
    const doing = link.endedWhile(err);
    if (doing === undefined) throw err;
    throw new BdsnapError('ESHUTDOWN', `the daemon's connection ended ${doing}: the daemon stopped or died; nothing of this backup was recorded in ${repo.store.location}; check that the daemon is running ('bdsnap status' answers when it is), then run the backup again`, { cause: err });
  } finally {
    client.close();
  }
}

/**
 * The requests of one backup to its daemon, each of which may meet the daemon's end; `guard`
 * marks the failure of one that did with what the backup was doing (endedWhile).
 */
export class DaemonLink {
  readonly #client: BdsnapClient;
  #gone: Promise<boolean> | undefined;
  readonly #doing = new WeakMap<object, string>();

  constructor(client: BdsnapClient) {
    this.#client = client;
  }

  /** `fn`, a request to the daemon; `doing` says what for ("while the backup read /dev/x at ..."). */
  async guard<T>(doing: () => string, fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (err) {
      if (err instanceof Error && (await this.#daemonGone())) this.#doing.set(err, doing());
      throw err;
    }
  }

  /** What the backup was doing when the daemon's connection ended, if `err` (or an error it wraps) is that end. */
  endedWhile(err: unknown): string | undefined {
    for (let e = err; e instanceof Error; e = e.cause) {
      const doing = this.#doing.get(e);
      if (doing !== undefined) return doing;
    }
    return undefined;
  }

  /**
   * Whether the daemon is gone: its answer to a ping on the backup's control connection, which
   * fails at once when that connection has ended. Asked once: a daemon gone stays gone for
   * this backup, whose snapshot went with it. A daemon that does not answer in PROBE_MS cannot
   * be told gone, and a failure keeps its own words.
   */
  #daemonGone(): Promise<boolean> {
    this.#gone ??= withTimeout(this.#client.ping().then(() => false, () => true), PROBE_MS, () => new Error('no answer')).catch(() => false);
    return this.#gone;
  }
}

export function daemonSnapshotProvider(client: BdsnapClient, runDir: string, link = new DaemonLink(client)): SnapshotProvider {
  const socketPath = nbdSocketPath(runDir);
  return {
    async take(devices: string[]): Promise<Snapshot> {
      // Owned: a backup killed before its destroy below leaves no snapshot behind; the daemon
      // destroys it once this client's connection closes (or, after a daemon restart, once this
      // process is gone).
      const info = await link.guard(() => `while it took the snapshot of ${devices.join(', ')}`, () => client.createSnapshot(devices, { owned: true }));
      return {
        id: info.id,
        images: info.images.map((image) => ({
          device: image.device,
          sizeBytes: image.sizeBytes,
          changeMap: image.cbt,
          open: async (): Promise<ImageReader> => {
            // Before a byte of the image is read: the connect, and the handshake that follows it.
            const nbd = await link.guard(() => `as the backup connected to read ${image.device}`, () => NbdClient.connect({ socketPath, exportName: image.exportName }));
            const at = (offsetBytes: number): string => `while the backup read ${image.device} (at ${formatBytes(offsetBytes)} of ${formatBytes(image.sizeBytes)})`;
            return {
              read: (target, offsetBytes) => link.guard(() => at(offsetBytes), () => nbd.read(target, offsetBytes)),
              extents: (offsetBytes, lengthBytes) => link.guard(() => at(offsetBytes), () => nbd.extents(offsetBytes, lengthBytes)),
              close: () => nbd.close(),
            };
          },
          changedSince: (generation: string, number: number) =>
            link.guard(() => `while the backup asked it what changed on ${image.device}`, () => client.snapshotChanges(info.id, image.device, generation, number)),
        })),
        check: async () => {
          // A device written around the snapshot while it was read (the daemon asks the
          // kernel's report first) makes what was read a mix of two points.
          const now = await link.guard(() => 'as the backup checked its snapshot before recording it', () => client.snapshotInfo(info.id));
          if (now.state !== 'ok') {
            throw new BdsnapError('EIO', `snapshot ${info.id} no longer holds its point (${now.state}: ${now.reason ?? 'see bdsnap events'}), so what the backup read is not one point in time; nothing was recorded: run the backup again`);
          }
        },
      };
    },
    async destroy(id: string): Promise<void> {
      // The backup's own snapshot: its readers are closed by now, and nothing else may keep it.
      await client.destroySnapshot(id, { force: true });
    },
  };
}
