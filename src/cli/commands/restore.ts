/**
 * `bdsnap restore <session-dir> [--output FILE] [--dry-run] [--force] [--json]`: offline, no
 * daemon needed. The logic lives in src/snapshot/restore.ts; this module parses, shows progress
 * (only on a terminal) and prints the summary.
 */

import type { Command } from 'commander';
import type { RestoreSummary } from '../../snapshot/index.js';

interface RestoreFlags {
  output?: string;
  dryRun?: boolean;
  force?: boolean;
  json?: boolean;
}

export function register(program: Command): void {
  program
    .command('restore')
    .description('put a device back as it was at the start of a session (applies newer sessions of the device first)')
    .argument('<session-dir>', 'the session directory under the snapshot root')
    .option('--output <file>', 'write a restored copy to FILE and leave the device alone')
    .option('--dry-run', 'check everything and print the plan; write nothing')
    .option('--force', 'restore even if the device does not match the end digests of the sessions')
    .option('--json', 'print the summary as JSON')
    .action(async (sessionDir: string, flags: RestoreFlags) => {
      await runRestore(sessionDir, flags);
    });
}

export async function runRestore(sessionDir: string, flags: RestoreFlags): Promise<void> {
  // The session engine is loaded only now, so that --help and the other commands start without it.
  const [{ restore }, { default: cliProgress }] = await Promise.all([import('../../snapshot/index.js'), import('cli-progress')]);
  const showBar = !flags.json && !flags.dryRun && process.stderr.isTTY === true;
  const bar = showBar
    ? new cliProgress.SingleBar({ stream: process.stderr, format: 'restoring [{bar}] {percentage}% {value}/{total} MiB', hideCursor: true }, cliProgress.Presets.shades_classic)
    : undefined;
  let started = false;
  const mib = (bytes: number): number => Math.round(bytes / 1048576);
  let summary: RestoreSummary;
  try {
    summary = await restore(sessionDir, {
      output: flags.output,
      dryRun: flags.dryRun,
      force: flags.force,
      onProgress: bar
        ? (done, total) => {
            if (!started) {
              bar.start(mib(total), 0);
              started = true;
            }
            bar.update(mib(done));
          }
        : undefined,
    });
  } finally {
    if (started) bar?.stop();
  }
  if (summary.leftovers.length > 0) (await import('../leftovers-note.js')).noteLeftovers(summary.targetPath, summary.leftovers);
  if (flags.json) {
    process.stdout.write(`${JSON.stringify(summary, null, 2)}\n`);
    return;
  }
  process.stdout.write(formatSummary(summary));
}

function formatSummary(s: RestoreSummary): string {
  const lines: string[] = [];
  for (const w of s.warnings) lines.push(`warning: ${w}`);
  const mib = (s.bytes / 1048576).toFixed(1);
  if (s.dryRun) {
    lines.push(`plan: restore ${s.targetPath} to the start of ${s.sessionDir}`);
    lines.push(`  sessions to apply, newest first: ${s.sessionsApplied.length}`);
    for (const dir of s.sessionsApplied) lines.push(`    ${dir}`);
    lines.push(`  chunks: ${s.chunks}, bytes: ${s.bytes} (${mib} MiB), digest check: ${s.digestCheck}`);
    lines.push('  nothing was written (--dry-run)');
  } else if (s.alreadyRestored && s.targetPath !== s.devicePath) {
    lines.push(`${s.devicePath} already holds the content from the start of ${s.sessionDir}: ${s.targetPath} was written as a copy of it`);
  } else if (s.alreadyRestored) {
    lines.push(`${s.targetPath} already holds the content from the start of ${s.sessionDir}: nothing to do`);
  } else {
    const seconds = s.durationMs / 1000;
    const rate = seconds > 0 ? ` (${(s.bytes / 1048576 / seconds).toFixed(0)} MiB/s)` : '';
    lines.push(`restored ${s.targetPath} to the start of ${s.sessionDir}`);
    lines.push(`  sessions applied: ${s.sessionsApplied.length}, chunks: ${s.chunks}, bytes: ${s.bytes} (${mib} MiB), time: ${seconds.toFixed(2)} s${rate}`);
    lines.push(`  digest check: ${s.digestCheck}`);
  }
  return `${lines.join('\n')}\n`;
}
