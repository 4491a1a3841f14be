/** `bdsnap status` (devices) and `bdsnap list` (sessions), as tables or JSON. */

import type { Command } from 'commander';
import { withClient } from '../../service/client.js';
import { formatBytes } from '../../units.js';
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
      if (status.devices.length === 0) {
        process.stdout.write('no devices registered\n');
        return;
      }
      // Each mounted snapshot image gets a row of its own under its device.
      const rows = status.devices.flatMap((d) => [[
        d.device,
        d.active ? 'yes' : 'no',
        d.attached ? (d.mountpoint ? 'mounted' : `${d.connections} conn`) : 'no',
        d.mountpoint ?? '-',
        d.currentSession ?? (d.inSession ? '(no write yet)' : '-'),
        d.inSession ? formatBytes(d.bytesPreserved) : '-',
        d.dirtyOutsideSession ? 'yes' : 'no',
      ], ...d.imageMounts.map((m) => [m.exportName, '-', 'mounted', m.mountpoint, '-', '-', '-'])]);
      process.stdout.write(`${formatTable(['DEVICE', 'ACTIVE', 'ATTACHED', 'MOUNTPOINT', 'SESSION', 'PRESERVED', 'WRITTEN-OUTSIDE-SESSION'], rows)}\n`);
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
}
