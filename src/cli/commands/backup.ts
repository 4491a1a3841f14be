/**
 * `bdsnap backup init|create|list|verify|restore|serve|prune|copy|key --repo REPO` (forget:
 * backup-forget.ts): the logic
 * lives in src/backup/ and src/repository/; this module parses, finds passwords, draws progress
 * bars (only when stdout and stderr are terminals and --json is not given) and prints results.
 *
 * A repository password comes from `--password-file FILE` (its first line), else
 * BDSNAP_REPO_PASSWORD, else a prompt on the terminal; never from argv. It is asked for only
 * when the repository is encrypted.
 */

import fs from 'node:fs';
import path from 'node:path';
import type { Command } from 'commander';
import { BdsnapError } from '../../errors.js';
import type { BackupSummary, ObjectStore, ProgressSink, Repository, SizeBefore } from '../../backup/index.js';
import type { PruneSummary } from '../../repository/index.js';
import { CODEC_CHOICES, type CodecChoice } from '../../repository/codec-choices.js';
import { registerForget } from './backup-forget.js';
import { promptHidden } from '../password-input.js';
import { withClient } from '../../service/client.js';
import { countOf, formatBytes } from '../../units.js';
import { choiceOption, sizeOption } from '../option-values.js';
import { formatTable } from './status.js';
import { RUN_DIR_HELP } from './client-options.js';
import { addTlsOptions, parseListen, printWarnings, serveInForeground, tlsSettings, type TlsCliOptions } from './serve.js';
import { loadTls } from '../../nbd/tls.js';

interface RepoFlags {
  repo: string;
  json?: boolean;
  passwordFile?: string;
}

const MiB = 1024 * 1024;

/** The backup agent and repository, loaded when a backup command runs (not for --help). */
function agent(): Promise<typeof import('../../backup/index.js')> {
  return import('../../backup/index.js');
}

/** A progress bar on stderr, or nothing when output is not for a person at a terminal. */
async function progressBar(label: string, json: boolean | undefined): Promise<{ sink?: ProgressSink; stop(): void }> {
  if (json || !process.stdout.isTTY || !process.stderr.isTTY) return { stop: () => undefined };
  const { default: cliProgress } = await import('cli-progress');
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
 * An unencrypted repository (made with --no-encryption, or version 1) carries no key: its
 * pieces are checked against their hashes, which catches damage but not a forgery. Said after
 * every command that makes or trusts one.
 */
function noteUnauthenticated(repo: Repository): void {
  if (repo.encrypted) return;
  process.stderr.write(`bdsnap: note: backups in ${repo.store.location} are not encrypted nor authenticated: whoever can read there can read them, and whoever can write there can add or replace backups that list and restore accept\n`);
}

/** The store a --repo names (a directory, or an S3 bucket: see repository/location.ts). */
async function openStore(repo: string, create = false): Promise<ObjectStore> {
  const { openRepoStore } = await agent();
  return openRepoStore(repo, create ? { create: true } : {});
}

const MAX_PASSWORD_FILE_BYTES = 64 * 1024;

/** The first line of a password file. */
function readPasswordFile(file: string): string {
  let text: string;
  try {
    const fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
    try {
      const st = fs.fstatSync(fd);
      if (st.size > MAX_PASSWORD_FILE_BYTES) throw new BdsnapError('EINVAL', `${file} is too large for a password file`);
      // As a TLS key is held (nbd/tls.ts): whoever could write the file would choose the password
      // of a repository made or keyed with it, and whoever could read it would know it.
      const euid = process.geteuid?.() ?? 0;
      if (st.uid !== euid && st.uid !== 0) throw new BdsnapError('EPERM', `the password file ${file} is owned by uid ${st.uid}, who could change it; it must belong to this user (${euid}) or root`);
      if ((st.mode & 0o077) !== 0) throw new BdsnapError('EPERM', `the password file ${file} is open to other users (mode ${(st.mode & 0o777).toString(8)}), so the password in it is not; chmod 600 it`);
      text = fs.readFileSync(fd, 'utf8');
    } finally {
      fs.closeSync(fd);
    }
  } catch (err) {
    if (err instanceof BdsnapError) throw err;
    throw new BdsnapError('ENOENT', `cannot read the password file ${file}: ${(err as Error).message}`, { cause: err });
  }
  const first = text.split(/\r?\n/)[0] ?? '';
  if (first === '') throw new BdsnapError('EINVAL', `the password file ${file} is empty`);
  return first;
}

/** A password from a file, else the environment variable, else a prompt (twice with `confirm`). */
async function passwordFrom(file: string | undefined, envName: string, question: string, confirm = false): Promise<string> {
  if (file !== undefined) return readPasswordFile(file);
  const fromEnv = process.env[envName];
  if (fromEnv !== undefined && fromEnv !== '') return fromEnv;
  if (!process.stdin.isTTY) throw new BdsnapError('EAUTH', `no password: set ${envName}, give --password-file FILE, or run at a terminal to be asked`);
  const answer = await promptHidden(question);
  if (confirm && (await promptHidden('again: ')) !== answer) throw new BdsnapError('EINVAL', 'the two passwords differ');
  if (answer === '') throw new BdsnapError('EINVAL', 'an empty password');
  return answer;
}

/**
 * The password an instant restore hands to the daemon: the one given (file or environment),
 * else, at a terminal, one asked for when the repository is encrypted. Without either the
 * daemon refuses an encrypted repository, saying how to give the password.
 */
async function instantRestorePassword(flags: Pick<RepoFlags, 'repo' | 'passwordFile'>): Promise<string | undefined> {
  const given = flags.passwordFile !== undefined || Boolean(process.env.BDSNAP_REPO_PASSWORD);
  if (!given) {
    if (!process.stdin.isTTY) return undefined;
    const { Repository } = await agent();
    if (!(await Repository.needsPassword(await openStore(flags.repo)))) return undefined;
  }
  return passwordFrom(flags.passwordFile, 'BDSNAP_REPO_PASSWORD', `password of ${flags.repo}: `);
}

async function openRepo(flags: Pick<RepoFlags, 'repo' | 'passwordFile'>, envName = 'BDSNAP_REPO_PASSWORD'): Promise<Repository> {
  const { Repository } = await agent();
  return Repository.open(await openStore(flags.repo), { password: () => passwordFrom(flags.passwordFile, envName, `password of ${flags.repo}: `) });
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

/** A prune's one line: what went, and why a pack went that held no unused piece (no index named it). */
export function pruneSummaryLine(s: PruneSummary): string {
  const unindexed = s.unindexedPacks === 0 ? '' : `, ${s.unindexedPacks} of them named by no index (written by a backup or prune that ended before its index)`;
  return `pruned ${countOf(s.deletedPieces, 'unused piece')} (${formatBytes(s.deletedBytes)} freed, ${countOf(s.deletedPacks, 'pack')} removed${unindexed}, ${s.repackedPacks} repacked); `
    + `${countOf(s.referencedPieces, 'piece')} kept for ${countOf(s.backups, 'backup')}`;
}

/** What a restore did to a target whose size was not the backup's. */
function sizeBeforeNote(target: string, before: SizeBefore, sizeBytes: number): string {
  const held = `${target} held ${before.bytes} bytes, the backup ${sizeBytes}`;
  switch (before.tail) {
    case 'cut': return `${held}: the file was cut to the backup's size (the ${before.bytes - sizeBytes} bytes past it are gone)`;
    case 'grown': return `${held}: the file was grown to the backup's size`;
    case 'kept': return `${held}: the ${before.bytes - sizeBytes} bytes past the backup's end were left as they were`;
  }
}

function formatCreate(s: BackupSummary): string {
  const lines = s.devices.map((d) =>
    `${d.device}: ${d.kind} (${d.why}); read ${formatBytes(d.readBytes)}, ${d.newPieces} new pieces (${formatBytes(d.newStoredBytes)} stored), ${d.reusedPieces} reused, ${d.zeroPieces} zero`);
  lines.push(`backup ${s.id} created in ${(s.durationMs / 1000).toFixed(2)} s`);
  return `${lines.join('\n')}\n`;
}

export function register(program: Command): void {
  const backup = program.command('backup').description('full and incremental backups of devices into a deduplicated, verified repository');
  const repoOption = (c: Command): Command => c.requiredOption('--repo <repo>', 'the repository: a directory or s3:http[s]://HOST[:PORT]/BUCKET[/PREFIX] (credentials from AWS_* or ~/.aws)')
    .option('--password-file <file>', 'read the repository password from the first line of FILE (else BDSNAP_REPO_PASSWORD, else a prompt)');

  repoOption(backup.command('init').description('create an empty repository'))
    .addOption(sizeOption('--piece-size <size>', 'piece size, a power of two from 64K to 16M (default 256K)'))
    .addOption(choiceOption('--codec <codec>', 'compression of new pieces (default zstd, or brotli where libzstd is missing; lz4 is fastest and larger)', CODEC_CHOICES))
    .addOption(sizeOption('--pack-size <size>', 'pieces are grouped into packs of about this size (default 16M)'))
    .option('--no-encryption', 'store backups in the clear: readable by anyone who can read the repository, alterable by anyone who can write it')
    .action(async (flags: RepoFlags & { pieceSize?: number; packSize?: number; codec?: CodecChoice; encryption: boolean }) => {
      const { pieceSize: pieceSizeBytes, packSize: packSizeBytes, codec } = flags;
      const { Repository, parseRepoLocation } = await agent();
      // A misspelt --repo is refused before the password is asked for, twice, in vain.
      parseRepoLocation(flags.repo);
      const password = flags.encryption ? await passwordFrom(flags.passwordFile, 'BDSNAP_REPO_PASSWORD', `new password for ${flags.repo}: `, true) : undefined;
      const repo = await Repository.init(await openStore(flags.repo, true), { pieceSizeBytes, packSizeBytes, codec, encryption: flags.encryption, password });
      process.stdout.write(`initialized backup repository ${repo.store.location} (pieces of ${formatBytes(repo.pieceSizeBytes)}, ${repo.encrypted ? 'encrypted with AES-256-GCM; keep the password: without it nothing can be restored' : 'NOT encrypted'})\n`);
      if (!repo.encrypted) {
        process.stderr.write(`bdsnap: WARNING: ${repo.store.location} is NOT encrypted (--no-encryption): anyone who can read it reads every backed-up byte, and anyone who can write it can alter backups without bdsnap noticing\n`);
      }
    });

  repoOption(backup.command('create').description('snapshot the devices and back them up (incremental where the change map allows)'))
    .argument('<dev_name...>', 'devices to back up together, from one consistent snapshot')
    .option('--full', 'read every device whole')
    .option('--host <name>', 'the host the backup is recorded as made by (default: this machine\'s hostname)')
    .option('--json', 'print the result as JSON')
    .option('--run-dir <dir>', RUN_DIR_HELP)
    .action(async (devices: string[], flags: RepoFlags & { full?: boolean; host?: string; runDir?: string }) => {
      const { backupThroughDaemon, hostOf } = await agent();
      const host = hostOf(flags);
      const repo = await openRepo(flags);
      const bar = await progressBar('backing up', flags.json);
      let summary;
      try {
        summary = await withInterrupt((signal) => backupThroughDaemon(repo, devices, flags.runDir, {
          full: flags.full, host, signal, progress: bar.sink,
          onPlan: (plans) => {
            if (!flags.json) for (const p of plans) process.stderr.write(`${p.device}: ${p.kind} backup (${p.why})\n`);
          },
        }));
      } finally {
        bar.stop();
      }
      if (flags.json) printJson(summary);
      else process.stdout.write(formatCreate(summary));
    });

  repoOption(backup.command('list').description('backups, oldest first'))
    .option('--host <name>', 'only the backups of this host (damaged ones, whose host is unknown, are listed too)')
    .option('--json', 'print the backups as JSON')
    .action(async (flags: RepoFlags & { host?: string }) => {
      const repo = await openRepo(flags);
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
      const { parseDataSubset, verifyRepository, mendAdvice, whereOf } = await agent();
      const subset = flags.readDataSubset === undefined ? undefined : parseDataSubset(flags.readDataSubset);
      const repo = await openRepo(flags);
      const bar = await progressBar('verifying', flags.json);
      let summary;
      try {
        summary = await withInterrupt((signal) => verifyRepository(repo, { id, signal, progress: bar.sink, subset }));
      } finally {
        bar.stop();
      }
      if (flags.json) printJson(summary);
      else {
        const lines = summary.backups.map((b) => `${b.id}: ${b.ok ? 'ok' : `${b.unchecked ? 'NOT CHECKED' : 'DAMAGED'} (${b.problem})`}`);
        for (const p of summary.badPieces) lines.push(`piece ${p.hash}: ${p.problem}, used by ${p.backups.join(', ')} (${whereOf(p)})`);
        const byPack = new Map<string, typeof summary.unreadPieces>();
        for (const p of summary.unreadPieces) {
          const list = byPack.get(p.pack);
          if (list) list.push(p);
          else byPack.set(p.pack, [p]);
        }
        for (const [pack, these] of byPack) {
          const users = [...new Set(these.flatMap((p) => p.backups))].sort();
          const others = new Set(these.map((p) => p.detail)).size - 1;
          lines.push(`pack ${pack}: ${countOf(these.length, 'piece')} not read (${these[0]!.detail}${others > 0 ? `; ${countOf(others, 'other error')}` : ''}), used by ${users.join(', ')}`);
        }
        lines.push(`${summary.checkedPieces} pieces (${formatBytes(summary.checkedBytes)}) checked${summary.subset ? ` (slice ${summary.subset})` : ''}`);
        process.stdout.write(`${lines.join('\n')}\n`);
      }
      if (!summary.ok) {
        const damaged = summary.backups.filter((b) => !b.ok && !b.unchecked).map((b) => b.id);
        const devices = [...new Set(summary.badPieces.flatMap((p) => p.devices))].sort();
        const unread = summary.unreadPieces;
        const reasons = [...new Set(unread.map((p) => p.detail))];
        const notRead = unread.length === 0 ? '' : `${countOf(unread.length, 'piece')} could not be read (${reasons[0]}${reasons.length > 1 ? `; ${countOf(reasons.length - 1, 'other error')}` : ''}): not checked, and kept in the index; run 'bdsnap backup verify' again once ${repo.store.location} can be read`;
        if (damaged.length === 0) throw new BdsnapError('EIO', notRead);
        throw new BdsnapError('ECORRUPT', `${countOf(damaged.length, 'damaged backup')}: ${damaged.join(', ')}; ${mendAdvice(repo.store.location, damaged, devices, false)}${notRead === '' ? '' : `; also ${notRead}`}`);
      }
    });

  repoOption(backup.command('restore').description('write a device of a backup, whole, back to the device or to a new file'))
    .argument('<id>', 'the backup')
    .argument('<dev_name>', 'which device of the backup (and the target unless --output is given)')
    .option('--output <file>', 'write the image to FILE instead of the device')
    .option('--instant', 'through the daemon: serve the target with the backup at once (bdsnap mount works right away) and copy the rest behind')
    .option('--abandon', 'with --instant: give up the stopped instant restore of this backup onto the target, leaving the target incomplete')
    .option('--run-dir <dir>', RUN_DIR_HELP)
    .option('--json', 'print the result as JSON')
    .action(async (id: string, device: string, flags: RepoFlags & { output?: string; instant?: boolean; abandon?: boolean; runDir?: string }) => {
      if (flags.abandon && !flags.instant) throw new BdsnapError('EINVAL', '--abandon gives up an instant restore: give it with --instant');
      if (flags.instant) {
        // The daemon reads the repository for as long as the copy runs: it gets the absolute path
        // and the password, and checks the password before it acts (a wrong one is refused before
        // anything is written). The key is derived there only: each derivation is a scrypt.
        const { parseRepoLocation } = await import('../../repository/location.js');
        const at = parseRepoLocation(flags.repo);
        const spec = at.kind === 'local' ? path.resolve(at.dir) : flags.repo;
        const password = flags.abandon ? undefined : await instantRestorePassword(flags);
        const info = await withClient(flags.runDir, (c) => c.instantRestore(spec, id, device, flags.output, password, { abandon: flags.abandon === true }));
        if (flags.json) printJson(info);
        else if (info.state === 'abandoned') process.stdout.write(`gave up the instant restore of ${info.target}: ${info.error ?? ''}\n`);
        else process.stdout.write(`serving ${info.target} from backup ${id} now; the copy runs behind it (bdsnap status shows it, bdsnap events --follow says when it is done)\n`);
        return;
      }
      const { restoreBackup } = await agent();
      const repo = await openRepo(flags);
      const bar = await progressBar('restoring', flags.json);
      let summary;
      try {
        summary = await withInterrupt((signal) => restoreBackup(repo, id, device, { output: flags.output, signal, progress: bar.sink }));
      } finally {
        bar.stop();
      }
      noteUnauthenticated(repo);
      if (summary.leftovers.length > 0) (await import('../leftovers-note.js')).noteLeftovers(summary.target, summary.leftovers);
      if (flags.json) printJson(summary);
      else {
        if (summary.finished) {
          process.stdout.write(`finished the interrupted restore of backup ${summary.finished.backup} into ${summary.target} (started at ${summary.finished.startedAt}): every byte of it was written again from backup ${id}\n`);
        }
        process.stdout.write(`restored ${summary.device} from backup ${id} into ${summary.target}: ${formatBytes(summary.sizeBytes)} in ${(summary.durationMs / 1000).toFixed(2)} s\n`);
        if (summary.sizeBefore) process.stdout.write(`${sizeBeforeNote(summary.target, summary.sizeBefore, summary.sizeBytes)}\n`);
      }
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
      const repo = await openRepo(flags);
      const [{ openBackupToServe }, { checkTcpPolicy, listenOn }] = await Promise.all([agent(), import('../../nbd/listen.js')]);
      await serveInForeground(async () => {
        const tls = await loadTls(tlsSettings(flags));
        if (listen) checkTcpPolicy(listen, tls, flags.insecureTcp ?? false, 'read the backup');
        const opened = await openBackupToServe(repo, id);
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

  repoOption(backup.command('prune').description('delete pieces no backup uses (refused while a backup is being created, served or copied, or an instant restore reads the repository)'))
    .option('--json', 'print the result as JSON')
    .action(async (flags: RepoFlags) => {
      const repo = await openRepo(flags);
      const s = await repo.prune();
      if (flags.json) printJson(s);
      else process.stdout.write(`${pruneSummaryLine(s)}\n`);
    });

  repoOption(backup.command('copy').description('copy backups from another repository (those the destination lacks), checking what is copied'))
    .argument('[id...]', 'only these backups')
    .requiredOption('--from <repo>', 'the repository to copy from')
    .option('--from-password-file <file>', 'the source password (else BDSNAP_FROM_REPO_PASSWORD, else a prompt)')
    .option('--json', 'print the result as JSON')
    .action(async (ids: string[], flags: RepoFlags & { from: string; fromPasswordFile?: string }) => {
      const { copyBackups } = await agent();
      const from = await openRepo({ repo: flags.from, passwordFile: flags.fromPasswordFile }, 'BDSNAP_FROM_REPO_PASSWORD');
      const to = await openRepo(flags);
      const bar = await progressBar('copying', flags.json);
      let s;
      try {
        s = await withInterrupt((signal) => copyBackups(from, to, { ids: ids.length > 0 ? ids : undefined, signal, progress: bar.sink }));
      } finally {
        bar.stop();
      }
      noteUnauthenticated(to);
      if (flags.json) printJson(s);
      else process.stdout.write(`copied ${s.copied.length} backup${s.copied.length === 1 ? '' : 's'} (${s.skipped.length} already there): ${s.readPieces} pieces read and checked, ${s.newPieces} new (${formatBytes(s.newStoredBytes)} stored)\n`);
    });

  const key = backup.command('key').description('repository passwords: each one a key object that unlocks the master key');
  repoOption(key.command('list').description('the keys of an encrypted repository'))
    .option('--json', 'print the keys as JSON')
    .action(async (flags: RepoFlags) => {
      const repo = await openRepo(flags);
      const keys = await repo.keys();
      if (flags.json) printJson(keys);
      else process.stdout.write(`${formatTable(['', 'ID', 'CREATED', 'HOST'], keys.map((k) => [k.current ? '*' : '', k.id.slice(0, 16), k.createdAt, k.host]))}\n`);
    });
  repoOption(key.command('add').description('add a password'))
    .option('--new-password-file <file>', 'read the new password from the first line of FILE (else a prompt)')
    .action(async (flags: RepoFlags & { newPasswordFile?: string }) => {
      const repo = await openRepo(flags);
      const password = await passwordFrom(flags.newPasswordFile, 'BDSNAP_NEW_REPO_PASSWORD', 'new password: ', true);
      const id = await repo.addKey(password);
      process.stdout.write(`added key ${id.slice(0, 16)}\n`);
    });
  repoOption(key.command('remove').description('remove a password (not the one given, and never the last)'))
    .argument('<id>', 'the key (at least 4 characters of its id, from key list)')
    .action(async (id: string, flags: RepoFlags) => {
      const repo = await openRepo(flags);
      const removed = await repo.removeKey(id);
      process.stdout.write(`removed key ${removed.slice(0, 16)}\n`);
    });
}
