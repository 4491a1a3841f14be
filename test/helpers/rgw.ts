/**
 * A real S3 server for tests: Ceph's radosgw on 127.0.0.1 (scripts/ceph-rgw-up.sh). The suite's
 * runner (scripts/test.sh) starts one for the whole run and names it in BDSNAP_TEST_S3_*; a test
 * file run on its own starts its own on first use and stops it when the file ends. A test that
 * kills the gateway asks for its own (`own: true`), so it never disturbs another file's server.
 * Each test works in its own bucket.
 */

import { execFile, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { after } from 'node:test';
import { promisify } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseRepoLocation } from '../../src/repository/location.js';
import { S3Store } from '../../src/repository/s3-store.js';
import { needs, type SkippableContext } from '../../testkit/needs.js';
import { alive } from '../../testkit/process.js';

const SCRIPTS = path.resolve(import.meta.dirname, '../../../scripts');
const START_TIMEOUT_MS = 120_000;

export interface Rgw {
  /** `http://127.0.0.1:PORT` */
  endpoint: string;
  /** The AWS variables that reach it. */
  env: Record<string, string>;
  /** A REPO for a new bucket of its own: `s3:http://127.0.0.1:PORT/<bucket>/<prefix>`. */
  newRepo(prefix?: string): string;
  /** SIGKILL the gateway (own servers only); the mon and OSD keep the data. */
  killGateway(): Promise<void>;
  /** Start the gateway again and wait until it answers. */
  startGateway(): Promise<void>;
  /** Give `bucket` a quota of `maxBytes` (radosgw-admin), or lift it (null). */
  setBucketQuota(bucket: string, maxBytes: number | null): Promise<void>;
}

/** A store on a new bucket of its own (created) of `r`, closed when `t` ends; the server's keys go into the environment. */
export async function newS3Store(r: Rgw, t: { after(fn: () => unknown): void }, prefix?: string): Promise<S3Store> {
  Object.assign(process.env, r.env);
  const at = parseRepoLocation(r.newRepo(prefix));
  if (at.kind !== 's3') throw new Error('not s3');
  const store = new S3Store(at);
  t.after(() => store.close());
  await store.createBucket();
  return store;
}

const RGW_NEEDS = { tools: ['radosgw', 'ceph-mon', 'ceph-osd', 'radosgw-admin', 'uuidgen', 'curl'] };

class RunningRgw implements Rgw {
  readonly endpoint: string;
  readonly env: Record<string, string>;
  readonly cephDir: string;
  readonly own: boolean;

  constructor(cephDir: string, endpoint: string, accessKey: string, secretKey: string, own: boolean) {
    this.cephDir = cephDir;
    this.endpoint = endpoint;
    this.own = own;
    this.env = { AWS_ACCESS_KEY_ID: accessKey, AWS_SECRET_ACCESS_KEY: secretKey, AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: 'true' };
  }

  newRepo(prefix = 'repo'): string {
    return `s3:${this.endpoint}/t-${randomBytes(6).toString('hex')}${prefix === '' ? '' : `/${prefix}`}`;
  }

  #gatewayPid(): number | undefined {
    try {
      return Number(fs.readFileSync(path.join(this.cephDir, 'run', 'client.rgw.pid'), 'utf8').trim()) || undefined;
    } catch {
      return undefined;
    }
  }

  async killGateway(): Promise<void> {
    if (!this.own) throw new Error('only a test file\'s own radosgw may be killed');
    const pid = this.#gatewayPid();
    if (pid === undefined) throw new Error('radosgw has no pid file');
    process.kill(pid, 'SIGKILL');
    for (let i = 0; i < 200 && alive(pid); i++) await sleep(25);
  }

  async setBucketQuota(bucket: string, maxBytes: number | null): Promise<void> {
    const admin = (...args: string[]): Promise<unknown> => promisify(execFile)('radosgw-admin', ['-c', path.join(this.cephDir, 'ceph.conf'), ...args], { timeout: 60_000 });
    if (maxBytes === null) {
      await admin('quota', 'disable', '--quota-scope=bucket', `--bucket=${bucket}`);
      return;
    }
    await admin('quota', 'set', '--quota-scope=bucket', `--bucket=${bucket}`, `--max-size=${maxBytes}`);
    await admin('quota', 'enable', '--quota-scope=bucket', `--bucket=${bucket}`);
  }

  async startGateway(): Promise<void> {
    const child = spawn('radosgw', ['-c', path.join(this.cephDir, 'ceph.conf'), '-n', 'client.rgw', '--client-mount-timeout', '30'], { stdio: 'ignore' });
    await new Promise<void>((resolve, reject) => {
      child.once('error', reject);
      child.once('exit', (code) => (code === 0 ? resolve() : reject(new Error(`radosgw exited ${code}`))));
    });
    const deadline = Date.now() + 60_000;
    while (!(await answers(this.endpoint))) {
      if (Date.now() > deadline) throw new Error(`radosgw at ${this.endpoint} did not answer within 60 s of its restart`);
      await sleep(100);
    }
  }
}

async function answers(endpoint: string): Promise<boolean> {
  try {
    const res = await fetch(`${endpoint}/`, { signal: AbortSignal.timeout(2_000) });
    await res.arrayBuffer();
    return res.status === 200;
  } catch {
    return false;
  }
}

async function startOwn(): Promise<RunningRgw> {
  const { stdout } = await promisify(execFile)('bash', [path.join(SCRIPTS, 'ceph-rgw-up.sh'), 'bluestore'], { timeout: START_TIMEOUT_MS, encoding: 'utf8' });
  const value = (key: string): string => {
    const v = new RegExp(`^${key}=(.*)$`, 'm').exec(stdout)?.[1];
    if (!v) throw new Error(`ceph-rgw-up.sh printed no ${key}:\n${stdout}`);
    return v;
  };
  return new RunningRgw(value('CEPH_DIR'), value('S3_ENDPOINT'), value('AWS_ACCESS_KEY_ID'), value('AWS_SECRET_ACCESS_KEY'), true);
}

/**
 * For a test file: returns a getter that gives the radosgw to use (started on first use) or
 * undefined when the test was skipped for lack of the Debian packages (under CI it fails).
 */
export function rgwForFile(options: { own?: boolean } = {}): (t: SkippableContext) => Promise<Rgw | undefined> {
  let started: Promise<RunningRgw> | undefined;
  after(async () => {
    const rgw = await started?.catch(() => undefined);
    if (rgw?.own) await promisify(execFile)('bash', [path.join(SCRIPTS, 'ceph-rgw-down.sh'), rgw.cephDir], { timeout: 60_000 });
  });
  return async (t) => {
    const shared = process.env.BDSNAP_TEST_S3_ENDPOINT;
    if (shared && !options.own) {
      return new RunningRgw(process.env.BDSNAP_TEST_CEPH_DIR ?? '', shared, process.env.BDSNAP_TEST_S3_ACCESS_KEY ?? '', process.env.BDSNAP_TEST_S3_SECRET_KEY ?? '', false);
    }
    if (!needs(t, RGW_NEEDS)) return undefined;
    started ??= startOwn();
    return started;
  };
}
