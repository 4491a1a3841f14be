/**
 * Attaching a device to the kernel through the daemon's own NBD server, and mounting it.
 *
 * Without the nbd kernel module (the usual case here): nbdfuse exposes the export as a file
 * in a private FUSE directory, `losetup -f --show` turns that file into /dev/loopN, and mount
 * puts the filesystem on the loop device. Where /dev/nbd0 exists and nbd-client is installed,
 * nbd-client attaches the export to a free /dev/nbdN instead. Every step is undone in reverse
 * order on failure and at unmount; unmount returns only after the NBD client has exited, so
 * every write the kernel made has reached the server.
 */

import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { z } from 'zod';
import { BdsnapError } from '../errors.js';
import { loopBackingFile } from '../host/loop-devices.js';
import { isMountpoint } from '../host/mountinfo.js';
import { oneLine, runTool } from '../host/run-tool.js';
import { processCommandLine, processStartTime } from '../host/processes.js';
import { readJsonFile } from '../stored-json.js';

export interface MountRequest {
  /** The daemon's NBD unix socket. */
  nbdSocket: string;
  /** The export (device path). */
  exportName: string;
  mountpoint: string;
  type?: string;
  options?: string;
  /** A private directory the helper may use for the FUSE mount. */
  workDir: string;
  /** The export refuses writes: attach and mount read-only. */
  readOnly?: boolean;
}

export interface AttachedMount {
  mountpoint: string;
  /** /dev/loopN or /dev/nbdN. */
  blockDevice: string;
  via: 'nbdfuse' | 'nbd-client';
  fuseDir: string | null;
  nbdfuse: ChildProcess | null;
  /** The nbdfuse process's start time (see host/processes.ts), to know it again after a crash. */
  nbdfuseStartTime: string | null;
}

const READY_TIMEOUT_MS = 15000;
const EXIT_TIMEOUT_MS = 30000;
const SYNC_TIMEOUT_MS = 60000;

function run(cmd: string, args: string[], timeoutMs?: number): Promise<string> {
  return runTool(cmd, args, timeoutMs !== undefined ? { timeoutMs } : {});
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** The NBD URI of an export on a unix socket, as libnbd parses it. */
export function nbdUnixUri(socketPath: string, exportName: string): string {
  return `nbd+unix:///${encodeURIComponent(exportName)}?socket=${encodeURIComponent(socketPath)}`;
}

/** Check the mount point: an existing directory that nothing is mounted on. */
export async function checkMountpoint(mountpoint: string): Promise<void> {
  let st: fs.Stats;
  try {
    st = await fs.promises.stat(mountpoint);
  } catch {
    throw new BdsnapError('ENOENT', `mount point ${mountpoint} does not exist`);
  }
  if (!st.isDirectory()) throw new BdsnapError('EINVAL', `mount point ${mountpoint} is not a directory`);
  if (await isMountpoint(mountpoint)) throw new BdsnapError('EBUSY', `something is already mounted on ${mountpoint}`);
}

function useNbdClient(): boolean {
  return fs.existsSync('/dev/nbd0') && fs.existsSync('/sys/block/nbd0');
}

export async function attachAndMount(req: MountRequest): Promise<AttachedMount> {
  await checkMountpoint(req.mountpoint);
  if (useNbdClient()) return attachWithNbdClient(req);
  return attachWithNbdfuse(req);
}

async function mountBlockDevice(blockDevice: string, req: MountRequest): Promise<void> {
  const args: string[] = [];
  if (req.type) args.push('-t', req.type);
  const options = [...(req.readOnly ? ['ro'] : []), ...(req.options ? [req.options] : [])].join(',');
  if (options) args.push('-o', options);
  await run('mount', [...args, blockDevice, req.mountpoint]);
}

async function attachWithNbdfuse(req: MountRequest): Promise<AttachedMount> {
  const fuseDir = await fs.promises.mkdtemp(path.join(req.workDir, 'fuse-'));
  const pidFile = `${fuseDir}.pid`;
  const file = path.join(fuseDir, 'disk');
  const child = spawn('nbdfuse', [...(req.readOnly ? ['-r'] : []), '-P', pidFile, file, nbdUnixUri(req.nbdSocket, req.exportName)], { stdio: ['ignore', 'ignore', 'pipe'], detached: true });
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => { stderr = (stderr + d.toString()).slice(-4096); });
  // Read for as long as nbdfuse lives (closing it would kill nbdfuse with SIGPIPE), but never
  // keep a stopping daemon alive for it: a mount left behind at shutdown keeps nbdfuse running.
  (child.stderr as (NodeJS.ReadableStream & { unref?: () => void }) | null)?.unref?.();
  const spawnError = new Promise<Error>((resolve) => child.once('error', resolve));
  let loop: string | undefined;
  // Its own process group: a Ctrl-C meant for a foreground daemon must not cut the mount off
  // before the daemon unmounts it.
  child.unref();
  try {
    const deadline = Date.now() + READY_TIMEOUT_MS;
    for (;;) {
      if (fs.existsSync(pidFile)) break;
      const failed = await Promise.race([spawnError, sleep(20).then(() => undefined)]);
      if (failed) throw new BdsnapError('ENOTSUP', `cannot run nbdfuse: ${failed.message}`, { cause: failed });
      if (child.exitCode !== null) throw new BdsnapError('EIO', `nbdfuse exited (${child.exitCode}): ${oneLine(stderr)}`);
      if (Date.now() > deadline) throw new BdsnapError('EIO', `nbdfuse did not become ready in ${READY_TIMEOUT_MS} ms: ${oneLine(stderr)}`);
    }
    const nbdfuseStartTime = child.pid === undefined ? null : await processStartTime(child.pid);
    // Direct I/O: the FUSE file has a page cache of its own, and a loop device buffering over
    // it copies every block twice and writes it back late and in small pieces (measured: a
    // third of the random 4 KiB writes per second). The filesystem's page cache stays the one
    // cache of the device, so an O_DIRECT read in the filesystem now goes to the server where
    // a buffered loop device could answer it from memory: nbdkit behind this route served
    // 0.2-0.4 of the random 4 KiB reads it served behind a buffered loop device (bench
    // row mount-rr4k-floor), and a session behind a buffered loop device took a third of the
    // sequential MB/s and fewer random writes. A FLUSH on the loop device still
    // reaches the server, as the fsync of the FUSE file that nbdfuse turns into an NBD FLUSH;
    // a loop device has no FUA, so the block layer sends a FLUSH after such a write instead.
    loop = (await run('losetup', [...(req.readOnly ? ['-r'] : []), '-f', '--show', '--direct-io=on', file])).trim();
    await mountBlockDevice(loop, req);
    return { mountpoint: req.mountpoint, blockDevice: loop, via: 'nbdfuse', fuseDir, nbdfuse: child, nbdfuseStartTime };
  } catch (err) {
    if (loop) await run('losetup', ['-d', loop]).catch(() => undefined);
    await stopNbdfuse(fuseDir, child).catch(() => undefined);
    throw err;
  }
}

async function attachWithNbdClient(req: MountRequest): Promise<AttachedMount> {
  const nbd = await freeNbdDevice();
  await run('nbd-client', ['-unix', req.nbdSocket, nbd, '-N', req.exportName]);
  try {
    await mountBlockDevice(nbd, req);
  } catch (err) {
    await run('nbd-client', ['-d', nbd]).catch(() => undefined);
    throw err;
  }
  return { mountpoint: req.mountpoint, blockDevice: nbd, via: 'nbd-client', fuseDir: null, nbdfuse: null, nbdfuseStartTime: null };
}

async function freeNbdDevice(): Promise<string> {
  const names = (await fs.promises.readdir('/sys/block')).filter((n) => /^nbd\d+$/.test(n));
  for (const name of names.sort((a, b) => Number(a.slice(3)) - Number(b.slice(3)))) {
    // A connected nbd device has a pid file in sysfs.
    if (!fs.existsSync(`/sys/block/${name}/pid`)) return `/dev/${name}`;
  }
  throw new BdsnapError('EBUSY', 'no free /dev/nbd device');
}

/**
 * Write a mounted filesystem's dirty data and journal out (syncfs, through `sync -f`). It runs
 * as a child process on purpose: the writes travel back into this daemon (loop device ->
 * nbdfuse -> NBD), so the event loop must stay free to serve them. Errors: EIO.
 */
export async function flushFilesystem(mountpoint: string, timeoutMs = SYNC_TIMEOUT_MS): Promise<void> {
  await run('sync', ['-f', mountpoint], timeoutMs);
}

/** Unmount the filesystem and detach; returns after the NBD client has exited. */
export async function unmountAndDetach(m: AttachedMount): Promise<void> {
  for (let attempt = 0; ; attempt++) {
    try {
      if (await isMountpoint(m.mountpoint)) await run('umount', [m.mountpoint]);
      break;
    } catch (err) {
      if (attempt >= 20) throw new BdsnapError('EBUSY', `cannot unmount ${m.mountpoint}: ${(err as Error).message}`, { cause: err });
      await sleep(250);
    }
  }
  if (m.via === 'nbd-client') {
    await run('nbd-client', ['-d', m.blockDevice]);
    return;
  }
  await run('losetup', ['-d', m.blockDevice]).catch(async (err: unknown) => {
    // Already gone (autoclear) is fine; anything else is retried once.
    if (!fs.existsSync(`/sys/block/${path.basename(m.blockDevice)}/loop`)) return;
    await sleep(200);
    await run('losetup', ['-d', m.blockDevice]).catch(() => { throw err; });
  });
  if (m.fuseDir && m.nbdfuse) await stopNbdfuse(m.fuseDir, m.nbdfuse);
}

/** fusermount3 -u, retried while the loop device lets go of the file, then wait for nbdfuse to exit. */
async function stopNbdfuse(fuseDir: string, child: ChildProcess): Promise<void> {
  const exited = child.exitCode !== null || child.signalCode !== null
    ? Promise.resolve()
    : new Promise<void>((resolve) => child.once('exit', () => resolve()));
  if (child.exitCode === null && child.signalCode === null) {
    for (let attempt = 0; ; attempt++) {
      try {
        await run('fusermount3', ['-u', fuseDir]);
        break;
      } catch (err) {
        if (!(await isMountpoint(fuseDir))) break;
        if (attempt >= 20) {
          await run('fusermount3', ['-u', '-z', fuseDir]).catch(() => undefined);
          break;
        }
        void err;
        await sleep(250);
      }
    }
    const timer = setTimeout(() => child.kill('SIGTERM'), EXIT_TIMEOUT_MS);
    await exited;
    clearTimeout(timer);
  }
  await fs.promises.rm(`${fuseDir}.pid`, { force: true });
  await fs.promises.rmdir(fuseDir).catch(() => undefined);
}

/** What the daemon records of each mount in its run directory, to clean up after a crash. */
const mountRecordSchema = z.object({
  device: z.string().min(1),
  mountpoint: z.string().min(1),
  blockDevice: z.string().regex(/^\/dev\/[A-Za-z0-9]+$/, 'a /dev/ node name'),
  via: z.enum(['nbdfuse', 'nbd-client']),
  fuseDir: z.string().min(1).nullable(),
  nbdfusePid: z.number().int().positive().nullable(),
  /** Absent in files written before it was recorded: then the pid is never signalled. */
  nbdfuseStartTime: z.string().regex(/^\d+$/).nullable().optional(),
}).strict();

const mountsFileSchema = z.array(mountRecordSchema);

export type MountRecordOnDisk = z.infer<typeof mountRecordSchema>;

export function toRecord(device: string, m: AttachedMount): MountRecordOnDisk {
  return {
    device, mountpoint: m.mountpoint, blockDevice: m.blockDevice, via: m.via, fuseDir: m.fuseDir,
    nbdfusePid: m.nbdfuse?.pid ?? null, nbdfuseStartTime: m.nbdfuseStartTime,
  };
}

/**
 * The records in `mountsFile`: [] when there is none. Errors: ECORRUPT when it does not parse
 * or does not match the schema (with where), EIO when it cannot be read.
 */
export async function readMountRecords(mountsFile: string): Promise<MountRecordOnDisk[]> {
  const records = await readJsonFile(mountsFile, mountsFileSchema, (problem) => `${mountsFile} is ${problem.startsWith('not valid JSON') ? problem : `not a list of mount records (${problem})`}`);
  return records ?? [];
}

/**
 * Whether `pid` is still the nbdfuse this record describes: same start time (a pid is reused
 * after its process exits), and its command line is nbdfuse serving this record's FUSE file.
 * Returns why not, or null when it is.
 */
export async function whyNotOurNbdfuse(m: MountRecordOnDisk, proc?: string): Promise<string | null> {
  const pid = m.nbdfusePid;
  if (pid === null) return 'no pid recorded';
  if (m.nbdfuseStartTime === undefined || m.nbdfuseStartTime === null) return `no start time recorded for pid ${pid}: its identity cannot be checked`;
  const startTime = await processStartTime(pid, proc);
  if (startTime === null) return `process ${pid} is gone`;
  if (startTime !== m.nbdfuseStartTime) return `process ${pid} started at tick ${startTime}, not ${m.nbdfuseStartTime}: the pid was reused`;
  const argv = (await processCommandLine(pid, proc)) ?? [];
  const disk = m.fuseDir === null ? undefined : path.join(m.fuseDir, 'disk');
  if (path.basename(argv[0] ?? '') !== 'nbdfuse' || disk === undefined || !argv.includes(disk)) {
    return `process ${pid} is not the nbdfuse of ${m.fuseDir ?? '(no FUSE directory)'} (${argv.join(' ').slice(0, 200)})`;
  }
  return null;
}

export interface StaleMountOptions {
  /** Where process facts are read (default /proc); for tests. */
  proc?: string;
}

/**
 * Tear down a mount left by a daemon that died: its NBD client lost the server, so the
 * filesystem only gets I/O errors now. Lazy unmount (a process may still sit in it), detach,
 * end the FUSE mount and its nbdfuse (only if that pid is still that nbdfuse). Returns the
 * steps that failed or were skipped, for the log.
 */
export async function cleanUpStaleMount(m: MountRecordOnDisk, options: StaleMountOptions = {}): Promise<string[]> {
  const problems: string[] = [];
  const step = async (what: string, fn: () => Promise<unknown>): Promise<void> => {
    try {
      await fn();
    } catch (err) {
      problems.push(`${what}: ${(err as Error).message}`);
    }
  };
  await step('umount', async () => {
    if (await isMountpoint(m.mountpoint)) await run('umount', ['-l', m.mountpoint]);
  });
  if (m.via === 'nbd-client') {
    await step('nbd-client -d', () => run('nbd-client', ['-d', m.blockDevice]));
    return problems;
  }
  const fuseDir = m.fuseDir;
  if (fuseDir) {
    await step('losetup -d', async () => {
      const backing = await loopBackingFile(m.blockDevice);
      if (backing?.startsWith(fuseDir)) await run('losetup', ['-d', m.blockDevice]);
    });
    await step('fusermount3 -u', async () => {
      if (await isMountpoint(fuseDir)) await run('fusermount3', ['-u', '-z', fuseDir]);
    });
    await fs.promises.rm(`${fuseDir}.pid`, { force: true });
    await fs.promises.rmdir(fuseDir).catch(() => undefined);
  }
  if (m.nbdfusePid !== null) {
    const pid = m.nbdfusePid;
    await step('stop nbdfuse', async () => {
      const why = await whyNotOurNbdfuse(m, options.proc);
      if (why !== null) {
        // Gone is the usual case after fusermount; anything else is worth a line in the log.
        if (!why.endsWith('is gone')) throw new BdsnapError('EPERM', `not signalled: ${why}`);
        return;
      }
      try {
        process.kill(pid, 'SIGTERM');
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ESRCH') throw err;
      }
    });
  }
  return problems;
}

/**
 * Mounts recorded by a daemon that died without unmounting: their NBD client lost the server,
 * so the filesystems can only fail now. Take them down (lazily) and say so loudly, so the
 * devices can be attached again and their sessions recovered. A file that cannot be read or
 * does not parse is logged as an error and kept aside (`<file>.invalid`) for the operator,
 * never ignored in silence.
 */
export async function cleanUpStaleMounts(mountsFile: string, log: Logger, options: StaleMountOptions = {}): Promise<void> {
  let records: MountRecordOnDisk[];
  try {
    records = await readMountRecords(mountsFile);
  } catch (err) {
    const aside = `${mountsFile}.invalid`;
    const kept = await fs.promises.rename(mountsFile, aside).then(() => aside, () => null);
    log.error({ event: 'mounts-file-invalid', file: mountsFile, keptAs: kept, reason: (err as Error).message },
      'the mounts recorded by the previous daemon cannot be read: any mount it left behind must be cleaned up by hand');
    return;
  }
  for (const m of records) {
    const problems = await cleanUpStaleMount(m, options);
    log.error({ event: 'stale-mount-cleaned', device: m.device, mountpoint: m.mountpoint, blockDevice: m.blockDevice, problems },
      'a mount of the previous daemon lost its device when that daemon died; it was unmounted');
  }
  await fs.promises.rm(mountsFile, { force: true });
}
