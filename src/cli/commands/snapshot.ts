/**
 * `bdsnap snapshot create|list|info|extend|destroy` and `bdsnap events`: point-in-time
 * snapshots of live devices for backups, and the daemon's event stream.
 */

import { setTimeout as delay } from 'node:timers/promises';
import type { Command } from 'commander';
import { BdsnapError, toBdsnapError } from '../../errors.js';
import { BdsnapClient, withClient } from '../../service/client.js';
import type { DaemonEvent, SnapshotInfo } from '../../service/control-protocol.js';
import { formatBytes } from '../../units.js';
import { sizeOption } from '../option-values.js';
import { formatTable } from './status.js';
import { clientOptions, printResult, type ClientOptions } from './client-options.js';

/** One long poll of `events --follow`; the loop asks again at once when it ends. */
const FOLLOW_WAIT_MS = 30_000;
/** How long `events --follow` waits for a daemon that went away (a restart) to come back. */
const RECONNECT_WINDOW_MS = 60_000;
const RECONNECT_INTERVAL_MS = 250;

/**
 * Print every event from the first on, for ever. A daemon restart closes the connection: the
 * follower reconnects, says so on stderr (stdout stays one event a line) and goes on after the
 * last event it printed, since the daemon keeps numbering events across restarts. A daemon not
 * back within RECONNECT_WINDOW_MS ends the command with the reason.
 */
async function followEvents(runDir: string | undefined, print: (e: DaemonEvent) => void): Promise<never> {
  let client = await BdsnapClient.connect(runDir);
  let lastSeq = 0;
  for (;;) {
    try {
      const result = await client.events(lastSeq, FOLLOW_WAIT_MS);
      result.events.forEach(print);
      lastSeq = result.lastSeq;
      continue;
    } catch (err) {
      client.close();
      const e = toBdsnapError(err);
      if (e.code !== 'ESHUTDOWN' && e.code !== 'EIO') throw e;
    }
    client = await reconnect(runDir);
    process.stderr.write(`bdsnap: reconnected to the daemon; following events after #${lastSeq}\n`);
  }
}

function describeSnapshot(s: SnapshotInfo): string {
  const limit = s.storage.limitBytes !== null ? ` of ${formatBytes(s.storage.limitBytes)}` : '';
  const lines = [
    `snapshot ${s.id}: ${s.state}${s.reason ? ` (${s.reason})` : ''}, taken ${s.createdAt}`,
    `  storage: ${formatBytes(s.storage.usedBytes)}${limit} in ${s.storage.dirs.join(', ')}`,
    `  writes held for ${s.stallMs} ms${s.frozen.length > 0 ? `; frozen: ${s.frozen.join(', ')}` : ''}`,
  ];
  if (s.owner !== null) lines.push(`  taken for process ${s.owner.pid} (a backup create): destroyed when it ends`);
  for (const image of s.images) {
    const cbt = image.cbt ? ` (change map ${image.cbt.generation} #${image.cbt.number})` : '';
    lines.push(`  ${image.exportName}${cbt}`, `    ${image.uri}`);
    if (image.mountpoint !== null) lines.push(`    mounted at ${image.mountpoint}${image.loopDevice ? ` (${image.loopDevice})` : ''}`);
    if (image.connections > 0) lines.push(`    ${image.connections} NBD connection${image.connections === 1 ? '' : 's'}`);
  }
  return `${lines.join('\n')}\n`;
}

function describeEvent(e: DaemonEvent): string {
  const who = [e.snapshot ? `snapshot ${e.snapshot}` : '', e.device ?? ''].filter((w) => w).join(' ');
  const details = Object.entries(e.details).map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`).join(' ');
  return `${e.time}  ${e.type}${who ? `  ${who}` : ''}${details ? `  ${details}` : ''}\n`;
}

/** Connect again, trying every RECONNECT_INTERVAL_MS while the daemon is down, for RECONNECT_WINDOW_MS at most. */
async function reconnect(runDir: string | undefined): Promise<BdsnapClient> {
  const deadline = Date.now() + RECONNECT_WINDOW_MS;
  for (;;) {
    try {
      return await BdsnapClient.connect(runDir);
    } catch (err) {
      const e = toBdsnapError(err);
      // ENOENT: no socket yet, or a stale one (the daemon is starting again). Anything else is not a restart.
      if (e.code !== 'ENOENT') throw e;
      if (Date.now() >= deadline) {
        throw new BdsnapError('ENOENT', `lost the daemon and it did not come back within ${RECONNECT_WINDOW_MS / 1000} s: ${e.message}`, { cause: err });
      }
    }
    await delay(RECONNECT_INTERVAL_MS);
  }
}

export function register(program: Command): void {
  const snapshot = program.command('snapshot').description('point-in-time snapshots of live devices, served as NBD images');

  clientOptions(snapshot
    .command('create <dev_name...>')
    .description('take one point in time across all the devices; prints the id and each image\'s export and NBD URI')
    .option('--storage <dir>', 'directory for the difference storage (default: under the state directory)')
    .addOption(sizeOption('--limit <size>', 'cap on the difference storage, e.g. 20G'))
    .option('--no-freeze', 'do not freeze the filesystems the daemon mounted around the barrier'))
    .action(async (devices: string[], options: ClientOptions & { storage?: string; limit?: number; freeze: boolean }) => {
      const limitBytes = options.limit;
      const info = await withClient(options.runDir, (c) => c.createSnapshot(devices, {
        ...(options.storage !== undefined ? { storageDir: options.storage } : {}),
        ...(limitBytes !== undefined ? { limitBytes } : {}),
        freeze: options.freeze,
      }));
      printResult(options, info, describeSnapshot);
    });

  clientOptions(snapshot
    .command('list')
    .description('the snapshots, oldest first'))
    .action(async (options: ClientOptions) => {
      const snapshots = await withClient(options.runDir, (c) => c.listSnapshots());
      if (options.json) {
        process.stdout.write(`${JSON.stringify({ snapshots })}\n`);
        return;
      }
      if (snapshots.length === 0) {
        process.stdout.write('no snapshots\n');
        return;
      }
      const rows = snapshots.map((s) => [
        s.id, s.state, s.createdAt, formatBytes(s.storage.usedBytes), s.owner !== null ? `pid ${s.owner.pid}` : '-', s.images.map((i) => i.device).join(' '),
      ]);
      process.stdout.write(`${formatTable(['ID', 'STATE', 'TAKEN', 'STORAGE', 'OWNER', 'DEVICES'], rows)}\n`);
    });

  clientOptions(snapshot
    .command('info <id>')
    .description('one snapshot: state, storage, images'))
    .action(async (id: string, options: ClientOptions) => {
      const info = await withClient(options.runDir, (c) => c.snapshotInfo(id));
      printResult(options, info, describeSnapshot);
    });

  clientOptions(snapshot
    .command('extend <id>')
    .description('raise the storage limit or add a storage directory on another filesystem, while writes go on')
    .addOption(sizeOption('--limit <size>', 'the new cap, e.g. 40G'))
    .option('--storage <dir>', 'another directory for the difference storage'))
    .action(async (id: string, options: ClientOptions & { storage?: string; limit?: number }) => {
      const limitBytes = options.limit;
      const info = await withClient(options.runDir, (c) => c.extendSnapshot(id, {
        ...(limitBytes !== undefined ? { limitBytes } : {}),
        ...(options.storage !== undefined ? { storageDir: options.storage } : {}),
      }));
      printResult(options, info, describeSnapshot);
    });

  clientOptions(snapshot
    .command('destroy <id>')
    .description('remove a snapshot: its storage and its image exports (refused while an image is mounted or attached)')
    .option('--force', 'unmount the images bdsnap mounted first, and cut off their other NBD clients'))
    .action(async (id: string, options: ClientOptions & { force?: boolean }) => {
      const result = await withClient(options.runDir, (c) => c.destroySnapshot(id, { force: options.force ?? false }));
      printResult(options, result, (r) => `destroyed snapshot ${r.id}\n`);
    });

  clientOptions(program
    .command('events')
    .description('the daemon\'s events: sessions, snapshots, low space, overflow, change-map resets')
    .option('--follow', 'keep printing events as they happen'), 'one JSON object per line')
    .action(async (options: ClientOptions & { follow?: boolean }) => {
      const print = (e: DaemonEvent): void => {
        process.stdout.write(options.json ? `${JSON.stringify(e)}\n` : describeEvent(e));
      };
      if (!options.follow) {
        const { events } = await withClient(options.runDir, (c) => c.events(0, 0));
        events.forEach(print);
        return;
      }
      await followEvents(options.runDir, print);
    });
}
