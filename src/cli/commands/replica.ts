/**
 * `bdsnap replica add|list|sync|pause|resume|remove|failover`: standby copies of devices on
 * another NBD server, kept in step through the change map. The daemon does the work; these
 * commands ask it.
 */

import path from 'node:path';
import type { Command } from 'commander';
import { BdsnapError } from '../../errors.js';
import { withClient } from '../../service/client.js';
import type { ReceivedReplicaInfo, ReplicaInfo } from '../../service/control-protocol.js';
import { formatBytes, formatDuration } from '../../units.js';
import { sizeOption } from '../option-values.js';
import { formatTable } from './status.js';
import { clientOptions, printResult, type ClientOptions } from './client-options.js';

const LAGGING_DEFAULT_HELP = '3 times --every; none without --every';
const DURATION_UNITS_MS: Record<string, number> = { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** `90`, `90s`, `5m`, `2h`, `1d` in milliseconds; at least a second. */
export function parseDuration(text: string, what: string): number {
  const m = /^(\d+(?:\.\d+)?)([smhd]?)$/.exec(text.trim());
  const ms = m ? Number(m[1]) * (DURATION_UNITS_MS[m[2] || 's'] ?? 1000) : NaN;
  if (!Number.isFinite(ms) || ms < 1000) throw new BdsnapError('EINVAL', `${what} wants a duration of at least 1s, like 30s, 5m or 1h (got "${text}")`);
  return Math.round(ms);
}

function describeReplica(r: ReplicaInfo): string {
  const lines = [
    `replica ${r.id}: ${r.state}${r.lastError && r.state !== 'idle' ? ` (${r.lastError})` : ''}`,
    `  to ${r.target} (${r.targetKind === 'bdsnap' ? 'bdsnap standby: each sync inside sessions, undone if cut short' : 'plain NBD server: incomplete until a sync finishes'})`,
    ...r.devices.map((d, i) => `  ${d} -> ${r.exports[i] ?? ''}`),
    `  last complete point: ${r.lastComplete ?? 'none yet'}${r.lagMs !== null ? ` (lag ${formatDuration(r.lagMs)})` : ''}${r.lagging ? `, LAGGING (past ${formatDuration(r.laggingAfterMs ?? 0)})` : ''}`,
    `  sent ${formatBytes(r.bytesSent)}${r.everyMs !== null ? `, every ${formatDuration(r.everyMs)}` : ''}${r.limitBytesPerSecond !== null ? `, at most ${formatBytes(r.limitBytesPerSecond)}/s` : ''}`,
  ];
  if (r.lastSync) {
    const s = r.lastSync;
    lines.push(`  last sync: ${s.full ? 'full' : 'incremental'} (${s.why}), ${formatBytes(s.bytesSent)} sent, ${formatBytes(s.zeroBytes)} zeroed, ${s.durationMs} ms`);
  }
  return `${lines.join('\n')}\n`;
}

function describeReceived(r: ReceivedReplicaInfo): string {
  const state = r.failedOverAt ? `failed over at ${r.failedOverAt}` : r.broken !== null ? `not at a complete point: ${r.broken}` : r.receiving ? 'receiving a sync' : 'standby';
  return `received replica ${r.id}: ${state}; last complete point ${r.point ?? 'none yet'}\n${r.devices.map((d) => `  ${d}\n`).join('')}`;
}

export function register(program: Command): void {
  const replica = program.command('replica').description('standby copies of devices on another NBD server (a bdsnap daemon or any), sending only what changed');

  clientOptions(replica
    .command('add <dev_name...>')
    .description('replicate the devices (one instant across them) to the NBD server at URI')
    .requiredOption('--to <uri>', 'nbd+unix:///EXPORT?socket=PATH or nbd://HOST:PORT/EXPORT (EXPORT ending in /: each device goes to that directory and its file name; no EXPORT: to its own path)')
    .option('--every <duration>', 'sync on a schedule, e.g. 5m (default: only on bdsnap replica sync)')
    .option('--lagging-after <duration>', `announce replica-lagging once the last complete point is older than this (default: ${LAGGING_DEFAULT_HELP})`)
    .addOption(sizeOption('--limit-rate <size>', 'at most this many bytes a second, e.g. 50M'))
    .option('--standby-run-dir <dir>', 'the run directory of the bdsnap daemon behind the URI (found by itself for its nbd.sock), so each sync is applied inside sessions there')
    .option('--insecure-tcp', 'allow nbd:// (the devices\' content in the clear over TCP)'), 'print the replica as JSON (with its id)')
    .action(async (devices: string[], options: ClientOptions & { to: string; every?: string; laggingAfter?: string; limitRate?: number; standbyRunDir?: string; insecureTcp?: boolean }) => {
      const everyMs = options.every !== undefined ? parseDuration(options.every, '--every') : undefined;
      const laggingAfterMs = options.laggingAfter !== undefined ? parseDuration(options.laggingAfter, '--lagging-after') : undefined;
      const limitBytesPerSecond = options.limitRate;
      const info = await withClient(options.runDir, (c) => c.request('replica-add', {
        devices: devices.map((d) => path.resolve(d)), to: options.to,
        ...(everyMs !== undefined ? { everyMs } : {}),
        ...(laggingAfterMs !== undefined ? { laggingAfterMs } : {}),
        ...(limitBytesPerSecond !== undefined ? { limitBytesPerSecond } : {}),
        ...(options.standbyRunDir !== undefined ? { standbyRunDir: path.resolve(options.standbyRunDir) } : {}),
        ...(options.insecureTcp ? { insecureTcp: true } : {}),
      }));
      printResult(options, info, describeReplica);
    });

  clientOptions(replica
    .command('list')
    .description('the replicas this daemon sends (target, last complete point, lag, bytes sent, state) and those it receives'))
    .action(async (options: ClientOptions) => {
      const result = await withClient(options.runDir, (c) => c.request('replica-list', {}));
      if (options.json) {
        process.stdout.write(`${JSON.stringify(result)}\n`);
        return;
      }
      if (result.replicas.length === 0 && result.received.length === 0) {
        process.stdout.write('no replicas\n');
        return;
      }
      if (result.replicas.length > 0) {
        const rows = result.replicas.map((r) => [r.id, r.state, r.target, r.lastComplete ?? '-', r.lagMs !== null ? `${formatDuration(r.lagMs)}${r.lagging ? ' LAGGING' : ''}` : '-', formatBytes(r.bytesSent), r.devices.join(' ')]);
        process.stdout.write(`${formatTable(['ID', 'STATE', 'TARGET', 'LAST COMPLETE', 'LAG', 'SENT', 'DEVICES'], rows)}\n`);
      }
      for (const r of result.received) process.stdout.write(describeReceived(r));
    });

  const action = (name: 'sync' | 'pause' | 'resume' | 'remove' | 'failover', description: string): void => {
    const command = replica.command(`${name} <id>`).description(description);
    if (name === 'remove') command.option('--force', 'remove even when the standby cannot let go of it (run remove on the standby too, later)');
    clientOptions(command)
      .action(async (id: string, options: ClientOptions & { force?: boolean }) => {
        const result = await withClient(options.runDir, (c) => c.request('replica-action', { action: name, replica: id, ...(options.force ? { force: true } : {}) }));
        printResult(options, result, (r) => {
          if ('removed' in r) return `removed replica ${r.id}${r.standbyReleased ? ' (the standby let go of it; its devices stay at the last complete point)' : ''}\n`;
          return 'target' in r ? describeReplica(r) : describeReceived(r);
        });
      });
  };
  action('sync', 'sync now (waits for a sync already running, then runs one); prints the replica after it');
  action('pause', 'stop the schedule (a sync running is cut short; the target keeps its last complete point)');
  action('resume', 'start the schedule again');
  action('remove', 'forget the replica; a bdsnap standby undoes a sync half applied, lets go of its sessions and keeps the last complete point');
  action('failover', 'on the standby: the last complete point becomes the devices, ordinary devices of this daemon from now on');
}
