/**
 * `bdsnap backup init|create|list|verify|restore|serve|prune --repo REPO` (forget: backup-forget.ts): the logic lives in
 * src/backup/; this module parses, draws progress bars (only when stdout and stderr are
 * terminals and --json is not given) and prints results.
 */

import path from 'node:path';
import cliProgress from 'cli-progress';
import type { Command } from 'commander';
import { BdsnapError } from '../../errors.js';
import {
  CODEC_CHOICES, Repository, openRepoStore, backupDevices, daemonSnapshotProvider, hostOf, openBackupDevices, parseDataSubset, restoreBackup, verifyRepository,
  type BackupSummary, type ProgressSink,
} from '../../backup/index.js';
import { registerForget } from './backup-forget.js';
import { BdsnapClient, withClient } from '../../service/client.js';
import { resolveRunDir } from '../../service/paths.js';
import { formatBytes, parseBytes } from '../../units.js';
import { formatTable } from './status.js';
import { RUN_DIR_HELP } from './client-options.js';
import { addTlsOptions, checkTcpPolicy, listenOn, parseListen, printWarnings, serveInForeground, tlsSettings, type TlsCliOptions } from './serve.js';
import { loadTls } from '../../nbd/tls.js';

interface RepoFlags {
  repo: string;
  json?: boolean;
}

const MiB = 1024 * 1024;

/** A progress bar on stderr, or nothing when output is not for a person at a terminal. */
function progressBar(label: string, json: boolean | undefined): { sink?: ProgressSink; stop(): void } {
  if (json || !process.stdout.isTTY || !process.stderr.isTTY) return { stop: () => undefined };
  const bar = new cliProgress.SingleBar({
    stream: process.stderr, hideCursor: true, etaBuffer: 50,
    format: `${label} [{bar}] {percentage}% {done}/{all} MiB {rate} MiB/s, {eta_formatted} left`,
  }, cliProgress.Presets.shades_classic);
  const startedMs = Date.now();
  let started = false;
  let done = 0;
  let total = 0;
  const payload = (): Record<string, string> => ({
    done: (done / MiB).toFixed(0), all: (total / MiB).toFixed(0), rate: (done / MiB / Math.max(0.001, (Date.now() - startedMs) / 1000)).toFixed(0),
  });
  return {
    sink: {
      start(totalBytes) {
        total = totalBytes;
        bar.start(Math.max(1, totalBytes), 0, payload());
        started = true;
      },
      advance(bytes) {
        done += bytes;
        bar.update(done, payload());
      },
    },
    stop: () => {
      if (started) bar.stop();
    },
  };
}

/**
 * Repositories carry no key: a manifest and its pieces are checked against their hashes, which
 * catches damage but not a forgery. Said after every command that makes or trusts one.
 */
function noteUnauthenticated(repo: Repository): void {
  process.stderr.write(`bdsnap: note: backups in ${repo.store.location} are not authenticated: whoever can write there can add or replace backups that list and restore accept; keep it writable by you alone\n`);
}

async function openRepo(spec: string): Promise<Repository> {
  return Repository.open(await openRepoStore(spec));
}

/** Abort on SIGINT/SIGTERM so that the work stops cleanly (snapshot destroyed, lock released). */
async function withInterrupt<T>(fn: (signal: AbortSignal) => Promise<T>): Promise<T> {
  const controller = new AbortController();
  const onSignal = (): void => controller.abort(new BdsnapError('ESHUTDOWN', 'interrupted'));
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  try {
    return await fn(controller.signal);
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}

function printJson(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
}

function formatCreate(s: BackupSummary): string {
  const lines = s.devices.map((d) =>
    `${d.device}: ${d.kind} (${d.why}); read ${formatBytes(d.readBytes)}, ${d.newPieces} new pieces (${formatBytes(d.newStoredBytes)} stored), ${d.reusedPieces} reused, ${d.zeroPieces} zero`);
  lines.push(`backup ${s.id} created in ${(s.durationMs / 1000).toFixed(2)} s`);
  return `${lines.join('\n')}\n`;
}

export function register(program: Command): void {
  const backup = program.command('backup').description('full and incremental backups of devices into a deduplicated, verified repository');
  const repoOption = (c: Command): Command => c.requiredOption('--repo <repo>', 'the repository: a directory or s3:http[s]://HOST[:PORT]/BUCKET[/PREFIX] (credentials from AWS_* or ~/.aws)');

  repoOption(backup.command('init').description('create an empty repository'))
    .option('--piece-size <size>', 'piece size, a power of two from 64K to 16M (default 256K)')
    .option('--codec <codec>', `compression of new pieces: ${CODEC_CHOICES.join(', ')} (default zstd, or brotli where libzstd is missing; lz4 is fastest and larger)`)
    .action(async (flags: RepoFlags & { pieceSize?: string; codec?: string }) => {
      const pieceSizeBytes = flags.pieceSize !== undefined ? parseBytes(flags.pieceSize, '--piece-size') : undefined;
      const codec = CODEC_CHOICES.find((c) => c === flags.codec);
      if (flags.codec !== undefined && !codec) throw new BdsnapError('EINVAL', `bad --codec "${flags.codec}": one of ${CODEC_CHOICES.join(', ')}`);
      const repo = await Repository.init(await openRepoStore(flags.repo, { create: true }), { pieceSizeBytes, codec });
      process.stdout.write(`initialized backup repository ${repo.store.location} (pieces of ${formatBytes(repo.pieceSizeBytes)})\n`);
      noteUnauthenticated(repo);
    });

  repoOption(backup.command('create').description('snapshot the devices and back them up (incremental where the change map allows)'))
    .argument('<dev_name...>', 'devices to back up together, from one consistent snapshot')
    .option('--full', 'read every device whole')
    .option('--host <name>', 'the host the backup is recorded as made by (default: this machine\'s hostname)')
    .option('--json', 'print the result as JSON')
    .option('--run-dir <dir>', RUN_DIR_HELP)
    .action(async (devices: string[], flags: RepoFlags & { full?: boolean; host?: string; runDir?: string }) => {
      const host = hostOf(flags);
      const repo = await openRepo(flags.repo);
      let client: BdsnapClient;
      try {
        client = await BdsnapClient.connect(flags.runDir);
      } catch (err) {
        throw new BdsnapError((err as BdsnapError).code ?? 'ENOENT', `backup create takes snapshots through the daemon: ${(err as Error).message}`, { cause: err });
      }
      const bar = progressBar('backing up', flags.json);
      try {
        const provider = daemonSnapshotProvider(client, resolveRunDir(flags.runDir));
        const summary = await withInterrupt((signal) => backupDevices(repo, provider, devices, {
          full: flags.full, host, signal, progress: bar.sink,
          onPlan: (plans) => {
            if (!flags.json) for (const p of plans) process.stderr.write(`${p.device}: ${p.kind} backup (${p.why})\n`);
          },
        }));
        bar.stop();
        if (flags.json) printJson(summary);
        else process.stdout.write(formatCreate(summary));
      } finally {
        bar.stop();
        client.close();
      }
    });

  repoOption(backup.command('list').description('backups, oldest first'))
    .option('--host <name>', 'only the backups of this host (damaged ones, whose host is unknown, are listed too)')
    .option('--json', 'print the backups as JSON')
    .action(async (flags: RepoFlags & { host?: string }) => {
      const repo = await openRepo(flags.repo);
      const records = (await repo.backups()).filter((r) => flags.host === undefined || !r.manifest || r.manifest.host === flags.host);
      noteUnauthenticated(repo);
      if (flags.json) {
        printJson(records.map((r) => (r.manifest
          ? { id: r.id, host: r.manifest.host ?? null, startTime: r.manifest.startTime, endTime: r.manifest.endTime, tags: r.manifest.tags,
              devices: r.manifest.devices.map((d) => ({ device: d.device, sizeBytes: d.sizeBytes, kind: d.kind, base: d.base, why: d.why, readBytes: d.readBytes, newStoredBytes: d.newStoredBytes })) }
          : { id: r.id, error: r.error.message })));
        return;
      }
      if (records.length === 0) {
        process.stdout.write('no backups\n');
        return;
      }
      const rows = records.flatMap((r) => (r.manifest
        ? r.manifest.devices.map((d) => [r.id, d.device, formatBytes(d.sizeBytes), d.kind, d.base ?? '-', formatBytes(d.newStoredBytes), r.manifest.host ?? '-'])
        : [[r.id, `DAMAGED: ${r.error.message}`, '', '', '', '', '']]));
      process.stdout.write(`${formatTable(['ID', 'DEVICE', 'SIZE', 'KIND', 'BASE', 'ADDED', 'HOST'], rows)}\n`);
    });

  repoOption(backup.command('verify').description('read every piece of all backups (or one) and check it against its hash'))
    .argument('[id]', 'only this backup')
    .option('--read-data-subset <N/T>', 'read only slice N of T of the pieces (the same slice every run; 1/T to T/T read everything once)')
    .option('--json', 'print the result as JSON')
    .action(async (id: string | undefined, flags: RepoFlags & { readDataSubset?: string }) => {
      const subset = flags.readDataSubset === undefined ? undefined : parseDataSubset(flags.readDataSubset);
      const repo = await openRepo(flags.repo);
      const bar = progressBar('verifying', flags.json);
      let summary;
      try {
        summary = await withInterrupt((signal) => verifyRepository(repo, { id, signal, progress: bar.sink, subset }));
      } finally {
        bar.stop();
      }
      if (flags.json) printJson(summary);
      else {
        const lines = summary.backups.map((b) => `${b.id}: ${b.ok ? 'ok' : `DAMAGED (${b.problem})`}`);
        for (const p of summary.badPieces) lines.push(`piece ${p.hash}: ${p.problem}, used by ${p.backups.join(', ')}`);
        lines.push(`${summary.checkedPieces} pieces (${formatBytes(summary.checkedBytes)}) checked${summary.subset ? ` (slice ${summary.subset})` : ''}`);
        process.stdout.write(`${lines.join('\n')}\n`);
      }
      if (!summary.ok) {
        const damaged = summary.backups.filter((b) => !b.ok).map((b) => b.id);
        throw new BdsnapError('ECORRUPT', `${damaged.length} damaged backup${damaged.length === 1 ? '' : 's'}: ${damaged.join(', ')}`);
      }
    });

  repoOption(backup.command('restore').description('write a device of a backup, whole, back to the device or to a new file'))
    .argument('<id>', 'the backup')
    .argument('<dev_name>', 'which device of the backup (and the target unless --output is given)')
    .option('--output <file>', 'write the image to FILE instead of the device')
    .option('--instant', 'through the daemon: serve the target with the backup at once (bdsnap mount works right away) and copy the rest behind')
    .option('--run-dir <dir>', RUN_DIR_HELP)
    .option('--json', 'print the result as JSON')
    .action(async (id: string, device: string, flags: RepoFlags & { output?: string; instant?: boolean; runDir?: string }) => {
      if (flags.instant) {
        // The daemon reads the repository for as long as the copy runs: it gets the absolute path.
        const info = await withClient(flags.runDir, (c) => c.instantRestore(path.resolve(flags.repo), id, device, flags.output));
        if (flags.json) printJson(info);
        else process.stdout.write(`serving ${info.target} from backup ${id} now; the copy runs behind it (bdsnap status shows it, bdsnap events --follow says when it is done)\n`);
        return;
      }
      const repo = await openRepo(flags.repo);
      const bar = progressBar('restoring', flags.json);
      let summary;
      try {
        summary = await withInterrupt((signal) => restoreBackup(repo, id, device, { output: flags.output, signal, progress: bar.sink }));
      } finally {
        bar.stop();
      }
      noteUnauthenticated(repo);
      if (flags.json) printJson(summary);
      else process.stdout.write(`restored ${summary.device} from backup ${id} into ${summary.target}: ${formatBytes(summary.sizeBytes)} in ${(summary.durationMs / 1000).toFixed(2)} s\n`);
    });

  const serve = repoOption(backup.command('serve').description('serve every device of a backup as a read-only NBD export, in the foreground'))
    .argument('<id>', 'the backup')
    .option('--socket <path>', 'unix socket to listen on (default: ./bdsnap-backup.sock unless --listen is given)')
    .option('--listen <host:port>', 'also listen on TCP; a bare port means 127.0.0.1 (needs TLS required, or --insecure-tcp)')
    .option('--insecure-tcp', 'allow --listen without TLS required: whoever can connect can read the backup');
  addTlsOptions(serve)
    .addHelpText('after', `
Each device is exported under its path as recorded in the backup; reads are checked piece by
piece, and the holes of the device are reported as holes (base:allocation).

Example:
  bdsnap backup serve --repo /backup 20261123T104714.273Z-1a2b3c4d --socket /tmp/b.sock &
  nbdcopy 'nbd+unix:///%2Fimages%2Fdisk.img?socket=/tmp/b.sock' disk-then.img`)
    .action(async (id: string, flags: RepoFlags & TlsCliOptions & { socket?: string; listen?: string; insecureTcp?: boolean }) => {
      const listen = flags.listen !== undefined ? parseListen(flags.listen) : undefined;
      const socketPath = flags.socket ?? (listen ? undefined : 'bdsnap-backup.sock');
      const repo = await openRepo(flags.repo);
      await serveInForeground(async () => {
        const tls = await loadTls(tlsSettings(flags));
        if (listen) checkTcpPolicy(listen, tls, flags.insecureTcp ?? false, 'read the backup');
        const opened = await openBackupDevices(repo, id);
        try {
          const { server, endpoints } = await listenOn(opened.devices, { ...(socketPath !== undefined ? { socketPath } : {}), ...(listen ? { listen } : {}), log: printWarnings }, tls);
          return {
            server, endpoints, tls, exportNames: opened.devices.map((d) => d.name),
            stop: async () => {
              await server.close();
              await opened.close();
            },
          };
        } catch (err) {
          await opened.close();
          throw err;
        }
      }, listen, 'read the backup');
    });

  registerForget(repoOption(backup.command('forget')), openRepo);

  repoOption(backup.command('prune').description('delete pieces no backup uses (refused while a backup is being created)'))
    .option('--json', 'print the result as JSON')
    .action(async (flags: RepoFlags) => {
      const repo = await openRepo(flags.repo);
      const s = await repo.prune();
      if (flags.json) printJson(s);
      else process.stdout.write(`pruned ${s.deletedPieces} unused pieces (${formatBytes(s.deletedBytes)}); ${s.referencedPieces} pieces kept for ${s.backups} backups\n`);
    });
}
