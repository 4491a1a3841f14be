/**
 * `bdsnap status` (devices), `bdsnap list` (sessions) and `bdsnap forget` (old sessions), as tables
 * or JSON. `status` and `list` only ask the daemon, so this module imports the control client and
 * nothing heavier; forget's session engine (and zod with it) is loaded when forget runs.
 */

import fs from 'node:fs';
import path from 'node:path';
import type { Command } from 'commander';
import { withClient } from '../../service/client.js';
import { formatBytes, formatDuration } from '../../units.js';
import { RUN_DIR_HELP } from './client-options.js';

interface JsonOptions {
  json?: boolean;
  runDir?: string;
}

/** Left-aligned columns separated by two spaces. */
export function formatTable(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]): string => cells.map((c, i) => c.padEnd(widths[i] ?? 0)).join('  ').trimEnd();
  return [line(header), ...rows.map(line)].join('\n');
}

export function register(program: Command): void {
  program
    .command('status')
    .description('registered devices: active, attached, mount point, current session, bytes preserved')
    .option('--json', 'machine-readable output')
    .option('--run-dir <dir>', RUN_DIR_HELP)
    .action(async (options: JsonOptions) => {
      const status = await withClient(options.runDir, (c) => c.status());
      if (options.json) {
        process.stdout.write(`${JSON.stringify(status)}\n`);
        return;
      }
      const restores = (status.restores ?? []).map((r) => `restore of ${r.target} from backup ${r.backup}: ${r.state}, ${formatBytes(r.doneBytes)} of ${formatBytes(r.totalBytes)}`
        + (r.state === 'running' ? `, copying ${formatBytes(r.rateBytesPerSecond)}/s${r.readFilledBytesPerSecond > 0 ? ` (reads fill ${formatBytes(r.readFilledBytesPerSecond)}/s more)` : ''}${r.secondsLeft !== null ? `, ${r.secondsLeft} s left` : ''}` : '')
        + (r.mountpoint ? `, mounted at ${r.mountpoint}` : r.connections ? `, ${r.connections} conn` : '')
        + (r.state === 'stopped' ? ' (the target is refused to every client meanwhile)' : '')
        + (r.error ? `; ${r.state === 'running' ? 'retrying: ' : ''}${r.error}` : '') + '\n').join('')
        + (status.replicas ?? []).map((r) => `replica ${r.id}: ${r.state}, ${r.lagMs !== null ? `lag ${formatDuration(r.lagMs)}` : 'no complete point yet'}`
          + `${r.lagging ? ` LAGGING (past ${formatDuration(r.laggingAfterMs ?? 0)})` : ''}${r.state === 'failed' && r.lastError !== null ? `; ${r.lastError}` : ''}\n`).join('');
      if (status.devices.length === 0) {
        process.stdout.write(`no devices registered\n${restores}`);
        return;
      }
      // Each mounted snapshot image, and each open as-of view (which holds its device still), gets a row of its own under its device.
      const rows = status.devices.flatMap((d) => [[
        d.device,
        d.active ? 'yes' : 'no',
        d.attached ? (d.mountpoint ? 'mounted' : `${d.connections} conn`) : 'no',
        d.mountpoint ?? '-',
        // A failed session goes on without copying: say so where the session is named, restore will refuse it.
        d.currentSession !== null ? `${d.sessionState === 'failed' ? 'FAILED ' : ''}${d.currentSession}` : d.inSession ? '(no write yet)' : '-',
        d.inSession ? formatBytes(d.bytesPreserved) : '-',
        d.dirtyOutsideSession ? 'yes' : 'no',
      ], ...d.imageMounts.map((m) => [m.exportName, '-', 'mounted', m.mountpoint, '-', '-', '-']),
      ...(d.asOfViews ?? []).map((v) => [v.exportName, '-', v.mountpoint !== null ? 'mounted' : `${v.connections} conn`, v.mountpoint ?? '-', '-', '-', '-'])]);
      process.stdout.write(`${formatTable(['DEVICE', 'ACTIVE', 'ATTACHED', 'MOUNTPOINT', 'SESSION', 'PRESERVED', 'WRITTEN-OUTSIDE-SESSION'], rows)}\n${restores}`);
    });

  program
    .command('list [dev_name]')
    .description('session directories with device, times, state and size')
    .option('--json', 'machine-readable output')
    .option('--run-dir <dir>', RUN_DIR_HELP)
    .action(async (device: string | undefined, options: JsonOptions) => {
      const result = await withClient(options.runDir, (c) => c.list(device));
      if (options.json) {
        process.stdout.write(`${JSON.stringify(result)}\n`);
        return;
      }
      if (result.sessions.length === 0) {
        process.stdout.write('no sessions\n');
        return;
      }
      const rows = result.sessions.map((s) => [s.dir, s.device, s.mountTime ?? '-', s.endTime ?? '-', s.undoneAt ? `${s.state}, undone by a restore` : s.state, formatBytes(s.preservedBytes), formatBytes(s.sizeBytes)]);
      process.stdout.write(`${formatTable(['SESSION', 'DEVICE', 'MOUNTED', 'ENDED', 'STATE', 'PRESERVED', 'SIZE'], rows)}\n`);
    });

  program
    .command('forget <dev_name>')
    .description('remove the oldest sessions of a device, keeping the newest ones (and every session they need to restore)')
    .option('--keep-last <n>', 'keep the newest N sessions that can still be restored')
    .option('--keep-within <duration>', 'keep the sessions mounted within this long (30d, 12h, 2w)')
    .option('--dry-run', 'print what would be removed; remove nothing')
    .option('--snapshot-root <dir>', 'where the sessions are (default: the running daemon\'s, else /snapshot)')
    .option('--json', 'machine-readable output')
    .option('--run-dir <dir>', RUN_DIR_HELP)
    .action(async (device: string, options: JsonOptions & { keepLast?: string; keepWithin?: string; dryRun?: boolean; snapshotRoot?: string }) => {
      const { parseKeepCount, parseKeepWithin } = await import('../keep-options.js');
      const { DEFAULT_SNAPSHOT_ROOT, forgetSessions, planForget } = await import('../../snapshot/index.js');
      const keepLast = parseKeepCount('--keep-last', options.keepLast);
      const keepWithinMs = parseKeepWithin(options.keepWithin);
      const root = options.snapshotRoot ?? await withClient(options.runDir, (c) => c.status()).then((s) => s.snapshotRoot, () => DEFAULT_SNAPSHOT_ROOT);
      let devicePath = path.resolve(device);
      try {
        devicePath = fs.realpathSync(devicePath);
      } catch {
        // A deleted image's sessions are still its own: they are listed by the recorded path.
      }
      const plan = await planForget(root, devicePath, { ...(keepLast !== undefined ? { keepLast } : {}), ...(keepWithinMs !== undefined ? { keepWithinMs } : {}) });
      if (!options.dryRun) await forgetSessions(root, plan);
      if (options.json) {
        process.stdout.write(`${JSON.stringify({ ...plan, dryRun: options.dryRun === true })}\n`);
        return;
      }
      const verb = options.dryRun ? 'would remove' : 'removed';
      for (const r of plan.remove) process.stdout.write(`${verb} ${r.dir}: ${r.reason}\n`);
      process.stdout.write(`${plan.remove.length} session(s) ${options.dryRun ? 'would be removed' : 'removed'}, ${plan.keep.length} kept${plan.stoppedBy ? ` (stopped there: ${plan.stoppedBy})` : ''}\n`);
    });
}
