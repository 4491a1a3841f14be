/**
 * `node dist/bench/backup.js`: bdsnap backup against restic, side by side in one run, on an
 * image of mixed content (a quarter each of random bytes, zeroes, one repeated MiB, text).
 *
 *   node dist/bench/backup.js [--size-mib N] [--runs N] [--big-gib N | --no-big] [--piece-size BYTES] [--json FILE]
 *                             [--s3 http://HOST:PORT | --s3 start]
 *
 * With --s3 both tools back up into buckets of that S3 server (`start`: a throwaway radosgw
 * of scripts/ceph-rgw-up.sh, stopped at the end) with the AWS_* variables' keys, restic as
 * `restic -r s3:URL/BUCKET -o s3.bucket-lookup=path`; sizes are the buckets' object bytes, and
 * the sparse big image is left out.
 *
 * Per run, each tool in a fresh repository, the tools taking turns to go first:
 * - full backup of the image: time, and the repository's size on disk afterwards;
 * - 1% of the image's 4 KiB blocks rewritten with random bytes, in runs of 16 blocks
 *   (64 KiB) at random places; then bdsnap's incremental (the change log gives the ranges)
 *   against restic's second backup of the same file;
 * - the incremental restored into a new file by each tool (bdsnap's restore ends with an
 *   fdatasync; restic's does not, so a second row adds the fdatasync of restic's file);
 * - the same changes on a sparse image of --big-gib GiB (its first part holding the same
 *   content) after a full bdsnap backup of it: the incremental time should follow the
 *   changed bytes, not the device size.
 *
 * bdsnap reads the image over NBD from a `bdsnap serve` started before the clock starts (in
 * the product the daemon serves the snapshot image; taking it is a barrier of milliseconds);
 * restic reads the file. Both find the file in the page cache, and every timed step starts
 * after a `sync`, so no step pays for writing back what an earlier one left dirty. Before each
 * restore an image's worth of scratch data is written and deleted (fillPageCache), so that
 * neither tool pays for memory the machine handed back to its host.
 */

import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { S3Store } from '../src/repository/s3-store.js';
import { LocalDirStore, Repository, backupDevices, restoreBackup, type ByteRange, type SnapshotProvider } from '../src/backup/index.js';
import { NbdClient } from '../src/nbd/client.js';
import { dirBytes, makeImage, type NbdServer, run, startServer } from './helpers.js';
import { benchOptions } from './options.js';
import { fillPageCache } from './page-cache.js';
import { startRadosgw } from './radosgw.js';
import { spread } from './report.js';


/** Both tools encrypt (restic always does; bdsnap by default). */
const BENCH_PASSWORD = 'bench-password';
const MiB = 1024 * 1024;
const BLOCK = 4096;
const RUN_BLOCKS = 16;

interface Options {
  sizeBytes: number;
  runs: number;
  bigBytes: number;
  pieceSizeBytes: number | undefined;
  jsonPath: string | undefined;
  /** The S3 endpoint both tools use, or undefined for local directories. */
  s3: string | undefined;
}

function parseOptions(): Options {
  const values = benchOptions('node dist/bench/backup.js [--size-mib N] [--runs N] [--big-gib N | --no-big] [--piece-size BYTES] [--json FILE] [--s3 http://HOST:PORT | --s3 start]', {
    'size-mib': { type: 'string', default: '1024' },
    runs: { type: 'string', default: '3' },
    'big-gib': { type: 'string', default: '8' },
    'no-big': { type: 'boolean', default: false },
    'piece-size': { type: 'string' },
    json: { type: 'string' },
    s3: { type: 'string' },
  });
  const sizeBytes = Number(values['size-mib']) * MiB;
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % (4 * MiB) !== 0) throw new Error('--size-mib must be a positive multiple of 4');
  return {
    sizeBytes,
    runs: Math.max(1, Number(values.runs)),
    bigBytes: values['no-big'] || values.s3 !== undefined ? 0 : Number(values['big-gib']) * 1024 * MiB,
    pieceSizeBytes: values['piece-size'] !== undefined ? Number(values['piece-size']) : undefined,
    jsonPath: values.json,
    s3: values.s3,
  };
}

/** A provider over one running `bdsnap serve`: take() is instant, the change log is the test's. */
class ServedImages implements SnapshotProvider {
  changes: ByteRange[] = [];
  #number = 0;
  constructor(private readonly server: NbdServer) {}
  async take(devices: string[]) {
    const number = ++this.#number;
    const changes = this.changes;
    this.changes = [];
    return {
      id: `bench${number}`,
      images: devices.map((device) => ({
        device,
        sizeBytes: fs.statSync(device).size,
        changeMap: { generation: 'bench', number },
        open: async () => NbdClient.connect({ socketPath: this.server.socketPath, exportName: fs.realpathSync(device) }),
        changedSince: async () => changes,
      })),
    };
  }
  async destroy(): Promise<void> {}
}

/** 1% of the 4 KiB blocks of the first `sizeBytes`, in runs of 16 blocks at random places. */
function changeRanges(sizeBytes: number): ByteRange[] {
  const runs = Math.round((sizeBytes / BLOCK) * 0.01 / RUN_BLOCKS);
  const out: ByteRange[] = [];
  for (let i = 0; i < runs; i++) {
    const at = Math.floor(Math.random() * (sizeBytes / BLOCK - RUN_BLOCKS)) * BLOCK;
    out.push({ offsetBytes: at, lengthBytes: RUN_BLOCKS * BLOCK });
  }
  return out;
}

function applyChanges(file: string, ranges: ByteRange[]): void {
  const fd = fs.openSync(file, 'r+');
  try {
    for (const r of ranges) fs.writeSync(fd, randomBytes(r.lengthBytes), 0, r.lengthBytes, r.offsetBytes);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

async function timed<T>(fn: () => Promise<T>): Promise<[number, T]> {
  const t0 = process.hrtime.bigint();
  const value = await fn();
  return [Number(process.hrtime.bigint() - t0) / 1e9, value];
}

function restic(env: NodeJS.ProcessEnv, ...args: string[]): Promise<unknown> {
  const s3 = env.RESTIC_REPOSITORY?.startsWith('s3:') ? ['-o', 's3.bucket-lookup=path'] : [];
  return run('restic', ['--quiet', ...s3, ...args], { env, timeoutMs: 600_000 });
}

/** Bytes of every object of an S3 repository (bucket and prefix). */
async function s3Bytes(store: S3Store): Promise<number> {
  return (await store.list('')).reduce((sum, o) => sum + o.sizeBytes, 0);
}

/** The two repositories of a run: directories in `work`, or new buckets on `opts.s3`. */
async function makeRepos(work: string, opts: Options): Promise<{ repo: Repository; env: NodeJS.ProcessEnv; bytes(): Promise<[number, number]>; close(): void }> {
  const env = { ...process.env, RESTIC_PASSWORD: 'x', RESTIC_CACHE_DIR: path.join(work, 'restic-cache') };
  fs.rmSync(env.RESTIC_CACHE_DIR, { recursive: true, force: true });
  if (opts.s3 === undefined) {
    const bRepoDir = path.join(work, 'bdsnap-repo');
    const rRepoDir = path.join(work, 'restic-repo');
    fs.rmSync(bRepoDir, { recursive: true, force: true });
    fs.rmSync(rRepoDir, { recursive: true, force: true });
    const store = new LocalDirStore(bRepoDir);
    return {
      repo: await Repository.init(store, { pieceSizeBytes: opts.pieceSizeBytes, password: BENCH_PASSWORD }), env: { ...env, RESTIC_REPOSITORY: rRepoDir },
      bytes: async () => [dirBytes(bRepoDir), dirBytes(rRepoDir)], close: () => store.close(),
    };
  }
  const tag = randomBytes(4).toString('hex');
  const endpoint = opts.s3;
  const bStore = new S3Store({ endpoint, bucket: `bench-bdsnap-${tag}`, prefix: '' });
  const rStore = new S3Store({ endpoint, bucket: `bench-restic-${tag}`, prefix: '' });
  await bStore.createBucket();
  return {
    repo: await Repository.init(bStore, { pieceSizeBytes: opts.pieceSizeBytes, password: BENCH_PASSWORD }), env: { ...env, RESTIC_REPOSITORY: `s3:${endpoint}/bench-restic-${tag}` },
    bytes: async () => [await s3Bytes(bStore), await s3Bytes(rStore)], close: () => [bStore, rStore].forEach((st) => st.close()),
  };
}

interface Sample {
  bdsnapFullSec: number; resticFullSec: number;
  bdsnapRepoBytes: number; resticRepoBytes: number;
  bdsnapIncSec: number; resticIncSec: number;
  bdsnapIncReadBytes: number;
  bdsnapRestoreSec: number; resticRestoreSec: number;
  /** restic's restore and then an fdatasync of the restored file (bdsnap's restore includes one). */
  resticRestoreDurableSec: number;
  bigFullSec?: number; bigIncSec?: number;
}

async function oneRun(work: string, image: string, server: NbdServer, opts: Options, resticFirst: boolean, big?: { image: string; server: NbdServer }): Promise<Sample> {
  const pristine = path.join(work, 'pristine.img');
  fs.copyFileSync(pristine, image);
  const repos = await makeRepos(work, opts);
  const { repo, env } = repos;
  await restic(env, 'init');
  const provider = new ServedImages(server);

  // Each timed step starts with nothing dirty in the page cache (`sync` first, outside the
  // clock): otherwise a step pays for writing back what the step before it left, which is the
  // other tool's work half of the time.
  // A step that fills new page cache (a restore writes a whole image) is first given that much
  // memory back from the host (see fillPageCache), whichever tool goes first.
  const settled = <T>(fn: () => Promise<T>, fillBytes = 0): Promise<[number, T]> => {
    if (fillBytes > 0) fillPageCache(work, fillBytes);
    execFileSync('sync');
    return timed(fn);
  };
  const both = async <A, B>(b: () => Promise<A>, r: () => Promise<B>, fillBytes = 0): Promise<[[number, A], [number, B]]> => {
    if (resticFirst) {
      const rr = await settled(r, fillBytes);
      return [await settled(b, fillBytes), rr];
    }
    const bb = await settled(b, fillBytes);
    return [bb, await settled(r, fillBytes)];
  };

  const [[bdsnapFullSec], [resticFullSec]] = await both(() => backupDevices(repo, provider, [image]), () => restic(env, 'backup', image));
  const [bdsnapRepoBytes, resticRepoBytes] = await repos.bytes();

  const changes = changeRanges(opts.sizeBytes);
  applyChanges(image, changes);
  provider.changes = changes;
  const [[bdsnapIncSec, inc], [resticIncSec]] = await both(() => backupDevices(repo, provider, [image]), () => restic(env, 'backup', image));
  if (inc.devices[0]!.kind !== 'incremental') throw new Error('the second bdsnap backup was not incremental');

  const bOut = path.join(work, 'bdsnap-restored.img');
  const rOut = path.join(work, 'restic-restored');
  fs.rmSync(bOut, { force: true });
  fs.rmSync(rOut, { recursive: true, force: true });
  let resticSyncSec = 0;
  const [[bdsnapRestoreSec], [resticRestoreAndSyncSec]] = await both(
    () => restoreBackup(repo, inc.id, image, { output: bOut }),
    async () => {
      await restic(env, 'restore', 'latest', '--target', rOut);
      // restic returns with the restored file still in the page cache; bdsnap's restore ends
      // with an fdatasync. The time to make restic's file as durable is kept apart.
      const t0 = process.hrtime.bigint();
      const fd = fs.openSync(path.join(rOut, image), 'r');
      fs.fdatasyncSync(fd);
      fs.closeSync(fd);
      resticSyncSec = Number(process.hrtime.bigint() - t0) / 1e9;
    },
    opts.sizeBytes,
  );
  const want = execFileSync('cmp', [image, bOut]).toString();
  if (want !== '') throw new Error('bdsnap restore differs');
  execFileSync('cmp', [image, path.join(rOut, image)]);
  const resticRestoreSec = resticRestoreAndSyncSec - resticSyncSec;
  fs.rmSync(bOut, { force: true });
  fs.rmSync(rOut, { recursive: true, force: true });
  repos.close();

  const sample: Sample = {
    bdsnapFullSec, resticFullSec, bdsnapRepoBytes, resticRepoBytes, bdsnapIncSec, resticIncSec, bdsnapIncReadBytes: inc.readBytes, bdsnapRestoreSec, resticRestoreSec,
    resticRestoreDurableSec: resticRestoreAndSyncSec,
  };
  if (big) {
    const bigRepoDir = path.join(work, 'bdsnap-big-repo');
    fs.rmSync(bigRepoDir, { recursive: true, force: true });
    const bigRepo = await Repository.init(new LocalDirStore(bigRepoDir), { pieceSizeBytes: opts.pieceSizeBytes, password: BENCH_PASSWORD });
    const bigProvider = new ServedImages(big.server);
    [sample.bigFullSec] = await settled(() => backupDevices(bigRepo, bigProvider, [big.image]));
    applyChanges(big.image, changes);
    bigProvider.changes = changes;
    [sample.bigIncSec] = await settled(() => backupDevices(bigRepo, bigProvider, [big.image]));
    fs.rmSync(bigRepoDir, { recursive: true, force: true });
  }
  return sample;
}

async function main(): Promise<void> {
  const opts = parseOptions();
  const rgw = opts.s3 === 'start' ? startRadosgw() : undefined;
  if (rgw) opts.s3 = rgw.endpoint;
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-bench-backup-'));
  const servers: NbdServer[] = [];
  try {
    const pristine = path.join(work, 'pristine.img');
    makeImage(pristine, opts.sizeBytes, 'mixed', 7);
    const image = path.join(work, 'disk.img');
    fs.copyFileSync(pristine, image);
    const server = await startServer(undefined, { kind: 'bdsnap', images: [image], readOnly: true });
    servers.push(server);
    let big: { image: string; server: NbdServer } | undefined;
    if (opts.bigBytes > 0) {
      const bigImage = path.join(work, 'big.img');
      fs.copyFileSync(pristine, bigImage);
      fs.truncateSync(bigImage, opts.bigBytes);
      big = { image: bigImage, server: await startServer(undefined, { kind: 'bdsnap', images: [bigImage], readOnly: true }) };
      servers.push(big.server);
    }
    const resticVersion = execFileSync('restic', ['version']).toString().trim();
    process.stderr.write(`image ${opts.sizeBytes / MiB} MiB, ${opts.runs} runs, ${resticVersion}, ${opts.s3 ? `both into S3 at ${opts.s3}` : 'local repositories'}, load ${os.loadavg()[0]!.toFixed(1)}\n`);
    const samples: Sample[] = [];
    for (let i = 0; i < opts.runs; i++) {
      if (big) {
        fs.copyFileSync(pristine, big.image);
        fs.truncateSync(big.image, opts.bigBytes);
      }
      const s = await oneRun(work, image, server, opts, i % 2 === 1, big);
      samples.push(s);
      process.stderr.write(`run ${i + 1}: ${JSON.stringify(s)}\n`);
    }
    const col = (k: keyof Sample): { median: number; min: number; max: number } => spread(samples.map((s) => s[k] as number));
    const line = (label: string, b: keyof Sample, r: keyof Sample, unit: 's' | 'MiB', better: 'lower'): string => {
      const scale = unit === 'MiB' ? 1 / MiB : 1;
      const fmt = (x: { median: number; min: number; max: number }): string => `${(x.median * scale).toFixed(2)} (${(x.min * scale).toFixed(2)}-${(x.max * scale).toFixed(2)})`;
      const ratios = spread(samples.map((s) => (s[r] as number) / (s[b] as number)));
      void better;
      return `| ${label} | ${fmt(col(b))} ${unit} | ${fmt(col(r))} ${unit} | ${ratios.median.toFixed(2)}x (${ratios.min.toFixed(2)}-${ratios.max.toFixed(2)}) |`;
    };
    const rows = [
      '| measure | bdsnap | restic | restic / bdsnap |',
      '|---|---|---|---|',
      line('full backup time', 'bdsnapFullSec', 'resticFullSec', 's', 'lower'),
      line(opts.s3 ? 'bucket size after full' : 'repository size after full', 'bdsnapRepoBytes', 'resticRepoBytes', 'MiB', 'lower'),
      line('incremental (1% changed) vs second backup', 'bdsnapIncSec', 'resticIncSec', 's', 'lower'),
      line('restore into a new file', 'bdsnapRestoreSec', 'resticRestoreSec', 's', 'lower'),
      line('restore, both durable (restic + fdatasync)', 'bdsnapRestoreSec', 'resticRestoreDurableSec', 's', 'lower'),
    ];
    const inc = col('bdsnapIncReadBytes');
    rows.push('', `bdsnap incremental read ${(inc.median / MiB).toFixed(0)} MiB of ${opts.sizeBytes / MiB} MiB (pieces around the changed ranges).`);
    if (big) {
      const bigInc = col('bigIncSec');
      const ratio = spread(samples.map((s) => s.bigIncSec! / s.bdsnapIncSec));
      rows.push(`${opts.bigBytes / 1024 / MiB} GiB sparse image: full ${col('bigFullSec').median.toFixed(2)} s; the same changes incremental ${bigInc.median.toFixed(2)} s (${bigInc.min.toFixed(2)}-${bigInc.max.toFixed(2)}), ${ratio.median.toFixed(2)}x (${ratio.min.toFixed(2)}-${ratio.max.toFixed(2)}) the ${opts.sizeBytes / MiB} MiB image's.`);
    }
    rows.push(`Medians of ${opts.runs} runs, (min-max) in brackets; ratios are per run. Load average at the end: ${os.loadavg().map((x) => x.toFixed(1)).join(' ')}.`);
    process.stdout.write(`${rows.join('\n')}\n`);
    if (opts.jsonPath) fs.writeFileSync(opts.jsonPath, `${JSON.stringify({ date: new Date().toISOString(), options: opts, samples }, null, 2)}\n`);
  } finally {
    await Promise.allSettled(servers.map((s) => s.stop()));
    fs.rmSync(work, { recursive: true, force: true });
    rgw?.stop();
  }
}

await main();
