/**
 * `bdsnap demo`: the whole story on a built-in example, with the real commands.
 *
 * It makes an ext4 image, starts a daemon in a temporary directory, sets a password,
 * activates the image, mounts it through bdsnap, changes files, backs it up while it stays
 * mounted (a full backup, then an incremental one through the change map, verified and one
 * restored to a file that e2fsck checks), unmounts, shows the session directory, restores,
 * and checks that the image's sha256 equals the pre-mount one. Every
 * step runs the `bdsnap` binary as an operator would, and prints the command first.
 * Everything is cleaned up at the end, also on failure.
 */

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Command } from 'commander';
import { BdsnapError } from '../../errors.js';
import { runTool } from '../../host/run-tool.js';
import { RUN_DIR_ENV, controlSocketPath, nbdSocketPath } from '../../service/paths.js';

const MAIN = fileURLToPath(new URL('../main.js', import.meta.url));
const DEMO_PASSWORD = 'demo-password-only-for-this-run';

interface DemoOptions {
  keep?: boolean;
  sizeMib: string;
}

export function register(program: Command): void {
  program
    .command('demo')
    .description('run the whole story on a built-in example image (needs root): activate, mount, change files, back up, unmount, restore, compare')
    .option('--size-mib <n>', 'size of the example image in MiB', '64')
    .option('--keep', 'keep the temporary directory for inspection')
    .action(async (options: DemoOptions) => {
      await runDemo(options);
    });
}

function say(text: string): void {
  process.stdout.write(`\n== ${text}\n`);
}

function sha256File(file: string): string {
  const hash = createHash('sha256');
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.allocUnsafe(1 << 20);
    let n: number;
    while ((n = fs.readSync(fd, buf, 0, buf.length, null)) > 0) hash.update(buf.subarray(0, n));
  } finally {
    fs.closeSync(fd);
  }
  return hash.digest('hex');
}

/** Run a system tool, showing its command line first. */
async function tool(cmd: string, args: string[]): Promise<string> {
  process.stdout.write(`$ ${cmd} ${args.join(' ')}\n`);
  return runTool(cmd, args).catch((err: unknown) => {
    throw err instanceof BdsnapError && err.code === 'ENOTSUP' ? new BdsnapError('ENOENT', `${err.message}: run bash scripts/setup.sh`, { cause: err }) : err;
  });
}

export async function runDemo(options: DemoOptions): Promise<void> {
  if (process.getuid?.() !== 0) throw new BdsnapError('EPERM', 'the demo mounts a filesystem and needs root: run it with sudo');
  const sizeMib = Number(options.sizeMib);
  if (!Number.isInteger(sizeMib) || sizeMib < 16) throw new BdsnapError('EINVAL', '--size-mib must be an integer of at least 16');

  const top = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-demo-'));
  const runDir = path.join(top, 'run');
  const stateDir = path.join(top, 'state');
  const snapshotRoot = path.join(top, 'snapshot');
  const image = path.join(top, 'disk.img');
  const mnt = path.join(top, 'mnt');
  fs.mkdirSync(mnt);
  const env = { ...process.env, [RUN_DIR_ENV]: runDir };
  let daemon: ChildProcess | undefined;
  let mounted = false;

  const bdsnap = (args: string[], input?: string): string => {
    process.stdout.write(`$ bdsnap ${args.join(' ')}${input !== undefined ? '   (password on stdin)' : ''}\n`);
    const r = spawnSync(process.execPath, [MAIN, ...args], { encoding: 'utf8', env, input: input ?? '' });
    if (r.stdout) process.stdout.write(r.stdout.replace(/^(?=.)/gm, '  '));
    if (r.status !== 0) throw new BdsnapError('EIO', `bdsnap ${args[0]} failed: ${r.stderr.trim()}`);
    return r.stdout;
  };

  try {
    say(`1. Make an example image with ext4 (${sizeMib} MiB) and put some files on it`);
    const seed = path.join(top, 'seed');
    fs.mkdirSync(path.join(seed, 'docs'), { recursive: true });
    fs.writeFileSync(path.join(seed, 'docs', 'report.txt'), 'draft numbers\n'.repeat(500));
    fs.writeFileSync(path.join(seed, 'README'), 'an example filesystem protected by bdsnap\n');
    fs.writeFileSync(image, '');
    fs.truncateSync(image, sizeMib * 1024 * 1024);
    await tool('mkfs.ext4', ['-q', '-F', '-d', seed, '-E', 'lazy_itable_init=0,lazy_journal_init=0', image]);
    const before = sha256File(image);
    process.stdout.write(`sha256 before mount: ${before}\n`);

    say('2. Start the daemon in a temporary directory');
    process.stdout.write(`$ bdsnap daemon --run-dir ${runDir} --state-dir ${stateDir} --snapshot-root ${snapshotRoot} &\n`);
    daemon = spawn(process.execPath, [MAIN, 'daemon', '--run-dir', runDir, '--state-dir', stateDir, '--snapshot-root', snapshotRoot], {
      env,
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let daemonErr = '';
    daemon.stderr?.on('data', (d: Buffer) => (daemonErr += d.toString()));
    await waitFor(() => fs.existsSync(controlSocketPath(runDir)) && fs.existsSync(nbdSocketPath(runDir)), 15000,
      () => `the daemon did not start: ${daemonErr.trim()}`);

    say('3. Set the service password and activate the image');
    bdsnap(['passwd', '--password-stdin'], `${DEMO_PASSWORD}\n`);
    bdsnap(['activate', image, '--password-stdin'], `${DEMO_PASSWORD}\n`);

    say('4. Mount it through bdsnap and change files: create, overwrite, append, rename, delete');
    bdsnap(['mount', image, mnt, '-t', 'ext4']);
    mounted = true;
    fs.writeFileSync(path.join(mnt, 'docs', 'report.txt'), 'quarterly numbers\n'.repeat(2000));
    fs.writeFileSync(path.join(mnt, 'big.bin'), Buffer.alloc(4 * 1024 * 1024, 0x5a));
    await tool('sync', []); // push the new blocks through to the device before changing them again
    fs.appendFileSync(path.join(mnt, 'docs', 'report.txt'), 'an appended line\n');
    fs.renameSync(path.join(mnt, 'docs', 'report.txt'), path.join(mnt, 'docs', 'final.txt'));
    fs.rmSync(path.join(mnt, 'big.bin'));
    process.stdout.write(`files now: ${fs.readdirSync(mnt).join(', ')}; docs/: ${fs.readdirSync(path.join(mnt, 'docs')).join(', ')}\n`);

    say('5. While it stays mounted: a consistent snapshot for backups, a full backup, more changes, an incremental backup');
    // The repository is encrypted; its password is read from a file (never from the command line).
    const passwordFile = path.join(top, 'repo-password');
    fs.writeFileSync(passwordFile, `${randomBytes(18).toString('base64')}\n`, { mode: 0o600 });
    const repoArgs = ['--repo', path.join(top, 'backups'), '--password-file', passwordFile];
    bdsnap(['backup', 'init', ...repoArgs]);
    const full = JSON.parse(bdsnap(['backup', 'create', image, ...repoArgs, '--json'])) as { id: string };
    for (let i = 0; i < 8; i++) fs.writeFileSync(path.join(mnt, 'docs', `note-${i}.txt`), `note ${i}\n`.repeat(300));
    await tool('sync', []);
    bdsnap(['backup', 'create', image, ...repoArgs]);
    bdsnap(['backup', 'list', ...repoArgs]);
    bdsnap(['backup', 'verify', ...repoArgs]);
    const restoredFull = path.join(top, 'full-backup.img');
    bdsnap(['backup', 'restore', ...repoArgs, full.id, image, '--output', restoredFull]);
    await tool('e2fsck', ['-fn', restoredFull]);
    bdsnap(['events']);

    say('6. Unmount: the session is closed and durable when this returns');
    bdsnap(['umount', mnt]);
    mounted = false;
    const changed = sha256File(image);
    process.stdout.write(`sha256 after unmount: ${changed} (${changed === before ? 'unchanged?!' : 'changed, as expected'})\n`);

    say('7. The session directory that holds the original blocks');
    bdsnap(['status']);
    const listJson = bdsnap(['list', image, '--json']);
    const sessions = JSON.parse(listJson) as Array<{ dir: string }> | { sessions: Array<{ dir: string }> };
    const list = Array.isArray(sessions) ? sessions : sessions.sessions;
    const sessionDir = list[list.length - 1]?.dir;
    if (!sessionDir) throw new BdsnapError('EIO', 'no session directory was recorded for the mount');
    for (const name of fs.readdirSync(sessionDir)) {
      process.stdout.write(`  ${name}  ${fs.statSync(path.join(sessionDir, name)).size} bytes\n`);
    }

    say('8. Restore the image as it was before the mount');
    bdsnap(['restore', sessionDir]);
    const after = sha256File(image);
    process.stdout.write(`sha256 before mount:  ${before}\nsha256 after restore: ${after}\n`);
    if (after !== before) throw new BdsnapError('EMISMATCH', 'the restored image differs from the pre-mount image');
    say('Done: the restored image is byte-identical to the image before the mount.');
  } finally {
    if (mounted) spawnSync(process.execPath, [MAIN, 'umount', mnt], { env, stdio: 'ignore' });
    if (daemon && daemon.exitCode === null) {
      daemon.kill('SIGTERM');
      await new Promise((resolve) => {
        const timer = setTimeout(() => { daemon?.kill('SIGKILL'); resolve(undefined); }, 10000);
        daemon?.once('exit', () => { clearTimeout(timer); resolve(undefined); });
      });
    }
    if (options.keep) process.stdout.write(`\nkept ${top}\n`);
    else fs.rmSync(top, { recursive: true, force: true });
  }
}

async function waitFor(ready: () => boolean, timeoutMs: number, why: () => string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!ready()) {
    if (Date.now() > deadline) throw new BdsnapError('EIO', why());
    await new Promise((r) => setTimeout(r, 50));
  }
}
