/**
 * A bounded soak of `bdsnap daemon` (run by scripts/soak.sh; needs root, FUSE, loop devices):
 *
 *     node dist/bench/soak.js --minutes 30 [--seed N]
 *
 * For the given time, at once:
 * - abuse on the control socket (junk, oversized lines, wrong types, floods, wrong passwords,
 *   half-open connections, valid status requests) and on the NBD socket (random and mutated
 *   frames against a registered, inactive image, while a well-behaved client checks its own);
 * - a cycle on two active ext4 images: `bdsnap mount`, write files, `bdsnap umount`; a snapshot
 *   taken, its images read and compared with the devices, destroyed; a backup to a local
 *   repository; old sessions forgotten.
 * Every 30 s it prints the daemon's resident memory and descriptors. At the end it checks every
 * device (e2fsck, the files of the last cycle), the repository (`backup verify`) and a restore
 * of the last backup against the devices' bytes at its point, and prints a JSON summary.
 * Exits 1 if anything failed.
 */

import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { NbdClient } from '../src/nbd/client.js';
import { benchOptions } from './options.js';
import { CleanupStack, makeImage, run, runControlCampaign, runNbdCampaign, gauge, startDaemon, type RunningDaemon } from './helpers.js';

interface Sample {
  minute: number;
  rssKiB: number;
  fds: number;
}

const IMAGE_BYTES = 64 << 20;
const FUZZ_BYTES = 8 << 20;
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

async function sha256Of(file: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of fs.createReadStream(file)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

async function sha256Export(socketPath: string, exportName: string, sizeBytes: number): Promise<string> {
  const client = await NbdClient.connect({ socketPath, exportName });
  try {
    const hash = createHash('sha256');
    const buf = Buffer.alloc(1 << 20);
    for (let at = 0; at < sizeBytes; at += buf.length) {
      await client.read(buf, at);
      hash.update(buf);
    }
    return hash.digest('hex');
  } finally {
    await client.close();
  }
}

async function ok(daemon: RunningDaemon, args: string[], input?: string): Promise<string> {
  return (await daemon.cli(args, input)).stdout;
}

function ext4Image(dir: string, name: string): string {
  const image = path.join(dir, name);
  makeImage(image, IMAGE_BYTES, 'zero');
  return image;
}

const values = benchOptions('node dist/bench/soak.js --minutes N [--seed N]', { minutes: { type: 'string', default: '30' }, seed: { type: 'string', default: String(Date.now() % 1_000_000) } });
const minutes = Number(values.minutes);
const seed = Number(values.seed);
if (!(minutes > 0)) throw new Error('--minutes must be a positive number');
const cleanup = new CleanupStack();
const failures: string[] = [];
const samples: Sample[] = [];
const counts = { mountCycles: 0, snapshots: 0, backups: 0, controlMessages: 0, controlConnections: 0, nbdFrames: 0, nbdConnections: 0 };
const startedMs = Date.now();
const endMs = startedMs + minutes * 60_000;
const fail = (what: string): void => {
  failures.push(what);
  console.error(`FAILED: ${what}`);
};
try {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-soak-'));
  cleanup.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const devices = [ext4Image(dir, 'a.img'), ext4Image(dir, 'b.img')];
  for (const d of devices) await run('mkfs.ext4', ['-q', '-F', '-E', 'lazy_itable_init=0,lazy_journal_init=0', d]);
  const fuzzImage = makeImage(path.join(dir, 'fuzz.img'), FUZZ_BYTES, 'blocks');
  const checkerImage = makeImage(path.join(dir, 'checker.img'), FUZZ_BYTES, 'zero');
  const daemon = await startDaemon(cleanup, { activate: [...devices, fuzzImage, checkerImage] });
  // Registered but inactive: served without sessions, so random writes leave no session behind.
  for (const d of [fuzzImage, checkerImage]) await daemon.cli(['deactivate', d, '--password-stdin'], 'correct horse battery staple\n');
  const repo = path.join(dir, 'repo');
  await ok(daemon, ['backup', 'init', '--repo', repo]);
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  cleanup.after(async () => {
    await daemon.cli(['umount', mnt], undefined, true);
  });
  const pid = daemon.server.pid;
  const sample = (): void => {
    const g = gauge(pid);
    const s = { minute: Math.round((Date.now() - startedMs) / 6000) / 10, rssKiB: g.rssKiB, fds: g.fds };
    samples.push(s);
    console.error(`[soak] ${s.minute} min: rss ${s.rssKiB} KiB, fds ${s.fds}, ${JSON.stringify(counts)}`);
  };
  sample();
  const done = (): boolean => Date.now() >= endMs || failures.length > 20;

  const sampler = (async () => {
    while (!done()) {
      await sleep(Math.min(30_000, Math.max(0, endMs - Date.now())));
      sample();
    }
  })();

  const controlAbuse = (async () => {
    for (let round = 0; !done(); round++) {
      const r = await runControlCampaign({ runDir: daemon.runDir, pid, messages: 5000, maxDurationMs: Math.max(1000, endMs - Date.now()), seed: seed + round * 10_000, concurrency: 4 });
      counts.controlMessages += r.messages;
      counts.controlConnections += r.connections;
      // The campaign's own descriptor check assumes it is alone with the daemon; here mounts and
      // the other socket open descriptors too, and the samples watch them instead.
      for (const f of r.failures.filter((x) => !x.startsWith('descriptors:')).slice(0, 5)) fail(`control: ${f}`);
    }
  })();

  const nbdAbuse = (async () => {
    for (let round = 0; !done(); round++) {
      const r = await runNbdCampaign({
        socketPath: daemon.server.socketPath, pid, target: { exportName: fuzzImage, sizeBytes: FUZZ_BYTES }, checkerExport: checkerImage,
        frames: 20_000, maxDurationMs: Math.max(1000, endMs - Date.now()), seed: seed + round * 100_000, concurrency: 4,
      });
      counts.nbdFrames += r.frames;
      counts.nbdConnections += r.connections;
      for (const f of r.failures.filter((x) => !x.startsWith('descriptors:')).slice(0, 5)) fail(`nbd: ${f}`);
    }
  })();

  // The cycle on the ext4 devices. What each device should hold at the last backup, and the
  // files the last mount cycle wrote, are checked at the end.
  let lastBackup: { id: string; hashes: string[] } | undefined;
  const expectedFiles = new Map<string, Buffer>();
  const cycle = (async () => {
    for (let n = 0; !done(); n++) {
      try {
        const device = devices[n % devices.length]!;
        await ok(daemon, ['mount', device, mnt, '-t', 'ext4']);
        const name = `f${n % 50}.bin`;
        const data = Buffer.alloc((64 << 10) + (n % 7) * 4096, n & 0xff);
        fs.writeFileSync(path.join(mnt, name), data);
        expectedFiles.set(`${device}:${name}`, data);
        await ok(daemon, ['umount', mnt]);
        counts.mountCycles++;

        // Nothing writes the devices now: a snapshot's images and a backup must equal them.
        const hashes = await Promise.all(devices.map((d) => sha256Of(d)));
        const snap = JSON.parse(await ok(daemon, ['snapshot', 'create', ...devices, '--json'])) as { id: string };
        for (const [i, d] of devices.entries()) {
          const got = await sha256Export(daemon.server.socketPath, `${d}@${snap.id}`, IMAGE_BYTES);
          if (got !== hashes[i]) fail(`snapshot ${snap.id}: the image of ${d} differs from the device`);
        }
        await ok(daemon, ['snapshot', 'destroy', snap.id]);
        counts.snapshots++;
        if (n % 3 === 0) {
          const created = JSON.parse(await ok(daemon, ['backup', 'create', ...devices, '--repo', repo, '--json'])) as { id: string };
          lastBackup = { id: created.id, hashes };
          counts.backups++;
        }
        if (n % 10 === 9) for (const d of devices) await ok(daemon, ['forget', d, '--keep-last', '3']);
      } catch (err) {
        fail(`cycle ${n}: ${(err as Error).message.slice(0, 500)}`);
        await daemon.cli(['umount', mnt], undefined, true);
      }
    }
  })();

  await Promise.all([sampler, controlAbuse, nbdAbuse, cycle]);
  await sleep(2000);
  sample();

  // The end: every device, the repository and a restore.
  if (!daemon.server.running()) fail('the daemon is not running');
  for (const d of devices) {
    const fsck = await run('e2fsck', ['-fn', d], { allowFailure: true });
    if (fsck.exitCode !== 0) fail(`e2fsck -fn ${d}: ${fsck.stdout}${fsck.stderr}`);
  }
  for (const [i, d] of devices.entries()) {
    await ok(daemon, ['mount', d, mnt, '-t', 'ext4', '-o', 'ro']);
    try {
      for (const [key, data] of expectedFiles) {
        const [device, name] = key.split(':') as [string, string];
        if (device !== d) continue;
        if (!fs.readFileSync(path.join(mnt, name)).equals(data)) fail(`${name} on ${d} is not what the last cycle wrote`);
      }
    } finally {
      await ok(daemon, ['umount', mnt]);
    }
    if (i === 0) await ok(daemon, ['backup', 'verify', '--repo', repo]);
  }
  if (lastBackup) {
    for (const [i, d] of devices.entries()) {
      const out = path.join(dir, `restored-${i}.img`);
      await ok(daemon, ['backup', 'restore', '--repo', repo, lastBackup.id, d, '--output', out]);
      if ((await sha256Of(out)) !== lastBackup.hashes[i]) fail(`backup ${lastBackup.id} restores ${d} to other bytes than it had`);
      fs.rmSync(out);
    }
  } else {
    fail('no backup was taken');
  }
  const first = samples[0]!;
  const last = samples[samples.length - 1]!;
  console.log(JSON.stringify({ minutes, seed, counts, rss: { startKiB: first.rssKiB, peakKiB: Math.max(...samples.map((s) => s.rssKiB)), endKiB: last.rssKiB }, fds: { start: first.fds, end: last.fds }, samples, failures }, null, 2));
} catch (err) {
  fail(`soak aborted: ${(err as Error).stack ?? String(err)}`);
} finally {
  await cleanup.run();
}
process.exitCode = failures.length > 0 ? 1 : 0;
