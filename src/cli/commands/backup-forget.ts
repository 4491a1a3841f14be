/**
 * `bdsnap backup forget --repo REPO <id>...` removes the named backups;
 * `bdsnap backup forget --repo REPO [--host NAME] --keep-... [--dry-run]` removes what a retention
 * policy does not keep (restic's rules: src/backup/retention.ts), per host and device set, and
 * prints the plan with the reasons. Pieces stay until `backup prune`.
 */

import type { Command } from 'commander';
import { BdsnapError } from '../../errors.js';
import type { ForgetPlan, RetentionPolicy, Repository } from '../../backup/index.js';
import { parseKeepCount, parseKeepWithin } from '../keep-options.js';
import { formatTable } from './status.js';

interface ForgetFlags {
  repo: string;
  host?: string;
  keepLast?: string;
  keepHourly?: string;
  keepDaily?: string;
  keepWeekly?: string;
  keepMonthly?: string;
  keepYearly?: string;
  keepWithin?: string;
  dryRun?: boolean;
  json?: boolean;
}

function policyOf(flags: ForgetFlags): RetentionPolicy | undefined {
  const policy: RetentionPolicy = {
    keepLast: parseKeepCount('--keep-last', flags.keepLast),
    keepHourly: parseKeepCount('--keep-hourly', flags.keepHourly),
    keepDaily: parseKeepCount('--keep-daily', flags.keepDaily),
    keepWeekly: parseKeepCount('--keep-weekly', flags.keepWeekly),
    keepMonthly: parseKeepCount('--keep-monthly', flags.keepMonthly),
    keepYearly: parseKeepCount('--keep-yearly', flags.keepYearly),
    keepWithinMs: parseKeepWithin(flags.keepWithin),
  };
  return Object.values(policy).some((v) => v !== undefined) ? policy : undefined;
}

function formatPlan(plan: ForgetPlan, dryRun: boolean): string {
  const out: string[] = [];
  for (const g of plan.groups) {
    out.push(`host ${g.host ?? '(not recorded)'}, devices ${g.devices.join(' ')}: keep ${g.keep.length}, remove ${g.remove.length}`);
    const rows = [
      ...g.keep.map((b) => ['keep', b.id, b.startTime, b.reasons.join(', ')]),
      ...g.remove.map((b) => [dryRun ? 'would remove' : 'remove', b.id, b.startTime, '']),
    ].sort((a, b) => (a[1]! < b[1]! ? 1 : -1));
    out.push(formatTable(['ACTION', 'ID', 'TIME', 'REASONS'], rows).replace(/^/gm, '  '));
  }
  for (const u of plan.unreadable) out.push(`keep ${u.id}: its manifest cannot be read (${u.problem}); forget it by id if it is to go`);
  const removed = plan.groups.reduce((n, g) => n + g.remove.length, 0);
  out.push(dryRun
    ? `would remove ${removed} backup${removed === 1 ? '' : 's'} (dry run: nothing removed)`
    : `removed ${removed} backup${removed === 1 ? '' : 's'}${removed > 0 ? "; run 'bdsnap backup prune' to free their space" : ''}`);
  return `${out.join('\n')}\n`;
}

export function registerForget(command: Command, openRepo: (flags: { repo: string; passwordFile?: string }) => Promise<Repository>): void {
  command
    .description('remove backups by id, or those a retention policy does not keep (restic\'s rules, per host and device set); pieces stay until prune')
    .argument('[id...]', 'backups to remove')
    .option('--host <name>', 'apply the policy to this host\'s backups only')
    .option('--keep-last <n>', 'keep the N newest backups')
    .option('--keep-hourly <n>', 'keep the newest backup of each of the last N hours that have one')
    .option('--keep-daily <n>', 'keep the newest backup of each of the last N days that have one')
    .option('--keep-weekly <n>', 'keep the newest backup of each of the last N ISO weeks that have one')
    .option('--keep-monthly <n>', 'keep the newest backup of each of the last N months that have one')
    .option('--keep-yearly <n>', 'keep the newest backup of each of the last N years that have one')
    .option('--keep-within <duration>', 'keep every backup within DURATION (30d, 12h, 2w) of the newest of its group')
    .option('--dry-run', 'print the plan; remove nothing')
    .option('--json', 'print the plan as JSON')
    .action(async (ids: string[], flags: ForgetFlags) => {
      const policy = policyOf(flags);
      if (ids.length > 0) {
        if (policy || flags.host !== undefined || flags.dryRun) throw new BdsnapError('EINVAL', 'give backup ids, or a policy (--keep-...) with --host and --dry-run, not both');
        const repo = await openRepo(flags);
        await repo.forget(ids);
        if (flags.json) process.stdout.write(`${JSON.stringify({ removed: ids }, null, 2)}\n`);
        else process.stdout.write(`forgot ${ids.length} backup${ids.length === 1 ? '' : 's'}; run 'bdsnap backup prune' to free their space\n`);
        return;
      }
      if (!policy) throw new BdsnapError('EINVAL', 'say which backups to forget: their ids, or what to keep (--keep-last N, --keep-daily N, ..., --keep-within DURATION)');
      const repo = await openRepo(flags);
      const { forgetPlanned, planForget } = await import('../../backup/index.js');
      const plan = await planForget(repo, policy, { host: flags.host });
      if (!flags.dryRun) await forgetPlanned(repo, plan);
      if (flags.json) process.stdout.write(`${JSON.stringify({ dryRun: flags.dryRun === true, ...plan }, null, 2)}\n`);
      else process.stdout.write(formatPlan(plan, flags.dryRun === true));
    });
}
