/**
 * A qemu guest whose one disk (/dev/vda, virtio) is an NBD export, reached by qemu's own NBD
 * client. No KVM is needed: the guest runs under TCG, with Debian's kernel (unpacked, not
 * installed, by scripts/setup.sh into .cache/guest-kernel, or BDSNAP_GUEST_KERNEL) and an
 * initramfs of busybox-static, the modules the disk and ext4 need, and the caller's files.
 *
 * The guest runs the caller's shell script as /init's body and powers off. Its console is the
 * only channel back: a script prints what the test checks, and the last line /init prints,
 * `GUEST-EXIT <status>`, says how the script ended. A guest that panics or hangs never prints it.
 */

import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { PROJECT_ROOT } from '../../testkit/bdsnap-cli.js';
import { requireTool, run } from '../../testkit/process.js';

/** Where setup.sh unpacks the guest kernel package (boot/vmlinuz-*, lib/modules/*). */
export function guestKernelRoot(): string {
  return process.env.BDSNAP_GUEST_KERNEL ?? path.join(PROJECT_ROOT, '.cache', 'guest-kernel');
}

/** The tools a guest run needs, for needs(). */
export const GUEST_TOOLS = ['qemu-system-x86_64', 'busybox', 'cpio', 'gzip', 'modprobe', 'xz'];

/** The modules for a virtio disk with ext4 on it, in an order insmod accepts. */
const GUEST_MODULES = ['virtio_pci', 'virtio_blk', 'ext4'];

export interface GuestRun {
  /** Everything the guest printed on its console. */
  console: string;
  /** The script's exit status, from the `GUEST-EXIT` line. */
  scriptStatus: number;
  durationMs: number;
}

export interface GuestOptions {
  /** A directory of the caller's to build the initramfs in. */
  workDir: string;
  socketPath: string;
  exportName: string;
  /** Shell (busybox sh) run with /dev/vda present; `set -e` is on. */
  script: string;
  /** Files put into the initramfs, by their path in the guest. */
  files?: Record<string, Buffer>;
  timeoutMs?: number;
}

function kernelVersion(root: string): string {
  const vmlinuz = fs.readdirSync(path.join(root, 'boot')).find((f) => f.startsWith('vmlinuz-'));
  if (vmlinuz === undefined) throw new Error(`no vmlinuz-* under ${root}/boot: run scripts/setup.sh`);
  return vmlinuz.slice('vmlinuz-'.length);
}

/** The module files `modprobe` would load for GUEST_MODULES, dependencies first, each once. */
async function moduleFiles(root: string, version: string): Promise<string[]> {
  const files: string[] = [];
  for (const name of GUEST_MODULES) {
    const { stdout } = await run(requireTool('modprobe'), ['-d', root, '-S', version, '--show-depends', name]);
    for (const line of stdout.split('\n')) {
      const m = /^insmod (\S+)/.exec(line.trim());
      if (m && !files.includes(m[1]!)) files.push(m[1]!);
    }
  }
  return files;
}

async function buildInitramfs(options: GuestOptions, root: string, version: string): Promise<string> {
  const tree = path.join(options.workDir, 'initramfs');
  for (const d of ['bin', 'dev', 'proc', 'sys', 'mnt', 'modules']) fs.mkdirSync(path.join(tree, d), { recursive: true });
  fs.copyFileSync(requireTool('busybox'), path.join(tree, 'bin', 'busybox'));
  fs.chmodSync(path.join(tree, 'bin', 'busybox'), 0o755);
  const order: string[] = [];
  for (const [k, file] of (await moduleFiles(root, version)).entries()) {
    const name = `${k}-${path.basename(file).replace(/\.xz$/, '')}`;
    if (file.endsWith('.xz')) fs.writeFileSync(path.join(tree, 'modules', name), unxz(file));
    else fs.copyFileSync(file, path.join(tree, 'modules', name));
    order.push(name);
  }
  for (const [guestPath, data] of Object.entries(options.files ?? {})) {
    const at = path.join(tree, guestPath);
    fs.mkdirSync(path.dirname(at), { recursive: true });
    fs.writeFileSync(at, data);
  }
  fs.writeFileSync(path.join(tree, 'script.sh'), `set -e\n${options.script}\n`);
  fs.writeFileSync(path.join(tree, 'init'), [
    '#!/bin/busybox sh',
    '/bin/busybox --install -s /bin',
    'mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev',
    ...order.map((m) => `insmod /modules/${m}`),
    'n=0; while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done',
    'status=0; sh /script.sh || status=$?',
    'echo "GUEST-EXIT $status"',
    'poweroff -f',
    '',
  ].join('\n'), { mode: 0o755 });
  const initrd = path.join(options.workDir, 'initrd.gz');
  await run('sh', ['-c', `cd "${tree}" && find . | cpio -o -H newc --quiet | gzip -1 > "${initrd}"`]);
  return initrd;
}

function unxz(file: string): Buffer {
  const r = spawnSync(requireTool('xz'), ['-dc', file], { maxBuffer: 256 << 20 });
  if (r.status !== 0) throw new Error(`xz -dc ${file} failed: ${r.stderr.toString()}`);
  return r.stdout;
}

/**
 * Boot a guest on the export, run the script, and wait for qemu to exit. Throws, with the
 * console, when qemu fails or the guest never reports the script's end.
 */
export async function runGuest(options: GuestOptions): Promise<GuestRun> {
  const root = guestKernelRoot();
  const version = kernelVersion(root);
  const initrd = await buildInitramfs(options, root, version);
  const drive = [
    'driver=raw', 'if=virtio', 'cache=none', 'file.driver=nbd', 'file.server.type=unix',
    `file.server.path=${options.socketPath}`, `file.export=${options.exportName}`,
  ].join(',');
  const result = await run(requireTool('qemu-system-x86_64'), [
    '-accel', 'tcg', '-m', '512', '-nographic', '-no-reboot', '-nic', 'none', '-serial', 'mon:stdio',
    '-kernel', path.join(root, 'boot', `vmlinuz-${version}`), '-initrd', initrd,
    '-append', 'console=ttyS0 quiet panic=-1', '-drive', drive,
  ], { timeoutMs: options.timeoutMs ?? 180_000, allowFailure: true });
  const exit = /GUEST-EXIT (\d+)/.exec(result.stdout);
  if (result.exitCode !== 0 || exit === null) {
    throw new Error(`the guest did not finish (qemu exit ${result.exitCode}): ${result.stderr}\n${result.stdout.slice(-4000)}`);
  }
  return { console: result.stdout, scriptStatus: Number(exit[1]), durationMs: result.durationMs };
}
