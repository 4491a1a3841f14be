/**
 * `backup forget` by policy: group the backups by host and device set (restic groups by host
 * and paths), apply the retention policy (retention.ts) to each group on its own, and remove
 * the manifests the plan says. Pieces stay until prune.
 *
 * Any backup can go: a manifest lists every piece of every device it holds, and restore reads
 * only that manifest. An incremental's `base` says only where its reading started; nothing of
 * the base is needed once the incremental is written (create re-reads in full if its base is
 * forgotten while it runs). A manifest that cannot be read is never removed by a policy: which
 * group it belongs to is unknown. It is reported, to be forgotten by id.
 */

import type { Manifest } from '../repository/format.js';
import type { Repository } from '../repository/repository.js';
import { applyRetention, checkPolicy, type RetentionPolicy } from './retention.js';

export interface ForgetOptions {
  /** Only the backups of this host. */
  host?: string;
  /** For tests; default Date.now(). */
  nowMs?: number;
}

export interface PlannedBackup {
  id: string;
  startTime: string;
}

export interface ForgetGroup {
  /** null: backups made before hosts were recorded. */
  host: string | null;
  devices: string[];
  /** Newest first. */
  keep: Array<PlannedBackup & { reasons: string[] }>;
  /** Newest first. */
  remove: PlannedBackup[];
}

export interface ForgetPlan {
  groups: ForgetGroup[];
  /** Kept whatever the policy: their group is unknown. */
  unreadable: Array<{ id: string; problem: string }>;
}

interface Dated extends PlannedBackup {
  timeMs: number;
}

/** What forgetting by `policy` would remove. Errors: EINVAL (a bad or empty policy), the store's. */
export async function planForget(repo: Repository, policy: RetentionPolicy, options: ForgetOptions = {}): Promise<ForgetPlan> {
  checkPolicy(policy);
  const groups = new Map<string, { host: string | null; devices: string[]; backups: Dated[] }>();
  const unreadable: ForgetPlan['unreadable'] = [];
  for (const record of await repo.backups()) {
    if (!record.manifest) {
      unreadable.push({ id: record.id, problem: record.error.message });
      continue;
    }
    const m = record.manifest;
    const timeMs = Date.parse(m.startTime);
    if (Number.isNaN(timeMs)) {
      unreadable.push({ id: record.id, problem: `its start time "${m.startTime}" is not a time` });
      continue;
    }
    if (options.host !== undefined && m.host !== options.host) continue;
    const devices = deviceSetOf(m);
    const key = JSON.stringify([m.host ?? null, devices]);
    let group = groups.get(key);
    if (!group) groups.set(key, (group = { host: m.host ?? null, devices, backups: [] }));
    group.backups.push({ id: record.id, startTime: m.startTime, timeMs });
  }
  const nowMs = options.nowMs ?? Date.now();
  const out: ForgetGroup[] = [];
  for (const g of [...groups.values()].sort((a, b) => compareGroups(a, b))) {
    const plan = applyRetention(g.backups, policy, nowMs);
    out.push({
      host: g.host, devices: g.devices,
      keep: plan.keep.map((k) => ({ id: k.backup.id, startTime: k.backup.startTime, reasons: k.reasons })),
      remove: plan.remove.map((b) => ({ id: b.id, startTime: b.startTime })),
    });
  }
  return { groups: out, unreadable };
}

/** Remove what `plan` says. Errors: ENOENT if a backup went meanwhile (nothing is removed then). */
export async function forgetPlanned(repo: Repository, plan: ForgetPlan): Promise<string[]> {
  const ids = plan.groups.flatMap((g) => g.remove.map((b) => b.id));
  await repo.forget(ids);
  return ids;
}

function deviceSetOf(m: Manifest): string[] {
  return [...new Set(m.devices.map((d) => d.device))].sort();
}

/** By host (none first), then device by device, a set that is a prefix of another first. */
function compareGroups(a: { host: string | null; devices: string[] }, b: { host: string | null; devices: string[] }): number {
  const byText = (x: string, y: string): number => (x < y ? -1 : x > y ? 1 : 0);
  const host = byText(a.host ?? '', b.host ?? '');
  if (host !== 0) return host;
  for (let i = 0; i < Math.min(a.devices.length, b.devices.length); i++) {
    const d = byText(a.devices[i]!, b.devices[i]!);
    if (d !== 0) return d;
  }
  return a.devices.length - b.devices.length;
}
