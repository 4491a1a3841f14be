/**
 * An ObjectStore on an S3-compatible server (AWS, Ceph radosgw, MinIO): object `name` is the
 * key `<prefix><name>` in one bucket, addressed path-style (`http://host/bucket/key`), which
 * every server answers without DNS names per bucket.
 *
 * Credentials come only from the AWS environment (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`)
 * or the AWS files (`AWS_PROFILE`, `~/.aws/credentials`): never from argv, never logged, and
 * never from an instance metadata endpoint, which a backup tool has no business probing.
 *
 * A PUT is atomic on S3 (readers see no object or the whole one), so `stage` is a PUT sent in
 * the background and `commit` waits for every one of them: an object is durable once its PUT
 * is answered. At most `concurrency` requests are in flight (keep-alive connections are reused);
 * `stage` waits while the background PUTs fill them, which is the backpressure on a writer.
 *
 * Retries are ours, not the SDK's (whose retry quota runs dry after a burst of failures and then
 * fails at once): throttling (503 SlowDown, 429), server errors, connection resets, refused
 * connections (a server restarting) and timeouts are retried with capped exponential backoff and
 * jitter for up to `retryForMs`; a GET's body is part of the attempt, so a connection dropped
 * mid-body is retried too. An error that stays names the object, the request and the reason.
 */

import http from 'node:http';
import https from 'node:https';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Readable } from 'node:stream';
import {
  AbortMultipartUploadCommand, CreateBucketCommand, DeleteObjectCommand, GetObjectCommand, HeadBucketCommand, HeadObjectCommand,
  ListMultipartUploadsCommand, ListObjectsV2Command, PutObjectCommand, S3Client, S3ServiceException,
} from '@aws-sdk/client-s3';
import { fromEnv } from '@aws-sdk/credential-provider-env';
import { fromIni } from '@aws-sdk/credential-provider-ini';
import { NodeHttpHandler } from '@smithy/node-http-handler';
import { BdsnapError, type ErrorCode } from '../errors.js';
import { MAX_OBJECT_BYTES, checkObjectName, type GetOptions, type ObjectInfo, type ObjectStore } from './object-store.js';
import { runLimited } from '../run-limited.js';

/** Where a repository lives on S3 (see location.ts for the REPO spelling). */
export interface S3Location {
  /** `http[s]://host[:port]`, no path. */
  endpoint: string;
  bucket: string;
  /** Empty, or segments ending in '/'. */
  prefix: string;
}

export interface S3StoreOptions {
  /** Requests in flight at most (default 8: radosgw's PUT rate flattens beyond that here). */
  concurrency?: number;
  /** How long a failing request is retried before its error stays (default 120 s). */
  retryForMs?: number;
  /** No connection within this long is a failed attempt (default 5 s). */
  connectTimeoutMs?: number;
  /** A request whose socket stays silent this long is a failed attempt (default 30 s). */
  requestTimeoutMs?: number;
}

const DEFAULTS = { concurrency: 8, retryForMs: 120_000, connectTimeoutMs: 5_000, requestTimeoutMs: 30_000 };
const BACKOFF_FIRST_MS = 100;
const BACKOFF_MAX_MS = 5_000;

/** Network failures worth another attempt: the server went away, restarted or stalled. */
const RETRY_NET_CODES = new Set(['ECONNRESET', 'ECONNREFUSED', 'ECONNABORTED', 'EPIPE', 'ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH', 'EAI_AGAIN', 'ERR_STREAM_PREMATURE_CLOSE']);
const RETRY_S3_CODES = new Set(['SlowDown', 'ServiceUnavailable', 'RequestTimeout', 'InternalError', 'RequestTimeTooSkewed', 'Throttling', 'ThrottlingException', 'TooManyRequests']);

/** The location's own spelling, as REPO takes it. */
export function s3LocationString(at: S3Location): string {
  return `s3:${at.endpoint}/${at.bucket}${at.prefix === '' ? '' : `/${at.prefix.slice(0, -1)}`}`;
}

/** The region: AWS_REGION, then AWS_DEFAULT_REGION, else us-east-1 (what S3-compatible servers expect). */
function region(): string {
  return process.env.AWS_REGION || process.env.AWS_DEFAULT_REGION || 'us-east-1';
}

function credentials(): () => Promise<{ accessKeyId: string; secretAccessKey: string; sessionToken?: string }> {
  const env = fromEnv();
  const ini = fromIni({ profile: process.env.AWS_PROFILE });
  let cached: Promise<{ accessKeyId: string; secretAccessKey: string; sessionToken?: string }> | undefined;
  return () => {
    cached ??= env().catch(() => ini()).catch((err: unknown) => {
      cached = undefined;
      throw new BdsnapError('EPERM', 'no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with a profile in ~/.aws/credentials', { cause: err });
    });
    return cached;
  };
}

interface Failure {
  retry: boolean;
  code: ErrorCode;
  why: string;
}

/** What an error from the SDK or the socket means here. */
function classify(err: unknown): Failure {
  if (err instanceof BdsnapError) return { retry: false, code: err.code, why: err.message };
  const e = err as { name?: string; code?: string; message?: string; $metadata?: { httpStatusCode?: number }; $retryable?: unknown };
  const status = e.$metadata?.httpStatusCode;
  const name = e.name ?? '';
  const message = e.message && e.message !== 'UnknownError' && e.message !== name ? `: ${e.message}` : '';
  if (err instanceof S3ServiceException || status !== undefined) {
    const why = `${status ?? '?'} ${name}${message}`;
    if (RETRY_S3_CODES.has(name) || status === 429 || (status !== undefined && status >= 500)) return { retry: true, code: 'EIO', why };
    // A quota stays until someone changes it: retrying would only wait for nothing.
    if (name === 'QuotaExceeded' || (name === 'EntityTooLarge' && status === 403)) {
      return { retry: false, code: 'ENOSPC', why: `the bucket is over its quota (${why}): raise the bucket's quota and run this again; 'bdsnap backup prune' then removes what the failed attempt stored` };
    }
    if (status === 403 || status === 401) return { retry: false, code: 'EPERM', why };
    if (status === 404) return { retry: false, code: 'ENOENT', why };
    return { retry: false, code: 'EIO', why };
  }
  const netCode = e.code ?? '';
  const why = `${netCode || name || 'error'}${message}`;
  if (RETRY_NET_CODES.has(netCode) || name === 'TimeoutError' || /socket hang up|ECONNRESET|timed? ?out/i.test(e.message ?? '')) return { retry: true, code: 'EIO', why };
  return { retry: false, code: 'EIO', why };
}

/** A counting semaphore: at most `size` holders at once. */
class Slots {
  #free: number;
  readonly #waiting: Array<() => void> = [];

  constructor(size: number) {
    this.#free = size;
  }

  async run<T>(fn: () => Promise<T>): Promise<T> {
    if (this.#free > 0) this.#free--;
    else await new Promise<void>((resolve) => this.#waiting.push(resolve));
    try {
      return await fn();
    } finally {
      const next = this.#waiting.shift();
      if (next) next();
      else this.#free++;
    }
  }
}

/** Read a body of known length into one buffer (no growing copies); EIO if it ends short or long. */
async function readBody(body: Readable, lengthBytes: number): Promise<Buffer> {
  const out = Buffer.allocUnsafe(lengthBytes);
  let at = 0;
  for await (const chunk of body as AsyncIterable<Buffer>) {
    if (at + chunk.length > lengthBytes) {
      body.destroy();
      throw new BdsnapError('EIO', `the server sent more than the ${lengthBytes} bytes it announced`);
    }
    chunk.copy(out, at);
    at += chunk.length;
  }
  if (at !== lengthBytes) throw Object.assign(new Error(`the body ended after ${at} of ${lengthBytes} bytes`), { code: 'ECONNRESET' });
  return out;
}

export class S3Store implements ObjectStore {
  readonly location: string;
  readonly #at: S3Location;
  readonly #client: S3Client;
  readonly #slots: Slots;
  readonly #options: Required<S3StoreOptions>;
  /** Background PUTs of staged objects, and the first error one of them met. */
  readonly #staging = new Set<Promise<void>>();
  #stageFailure: { err: unknown } | undefined;
  /**
   * Whether the server has answered once: until it has, a refused connection is a wrong
   * address (said at once), not a server restarting (waited for).
   */
  #answered = false;

  constructor(at: S3Location, options: S3StoreOptions = {}) {
    this.#at = at;
    this.location = s3LocationString(at);
    this.#options = { ...DEFAULTS, ...options };
    // The SDK warns on every run that its releases of 2027 will need Node 22; the version this
    // package installs runs on Node 20, and the warning would bury the one line a command prints.
    process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';
    const agentOptions = { keepAlive: true, maxSockets: this.#options.concurrency };
    this.#client = new S3Client({
      endpoint: at.endpoint,
      forcePathStyle: true,
      region: region(),
      credentials: credentials(),
      maxAttempts: 1,
      // Checksums the server may not know (radosgw of Ceph 16 predates them); the repository
      // checks every object it reads against its own hashes.
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
      requestHandler: new NodeHttpHandler({
        httpAgent: new http.Agent(agentOptions),
        httpsAgent: new https.Agent(agentOptions),
        connectionTimeout: this.#options.connectTimeoutMs,
        requestTimeout: this.#options.requestTimeoutMs,
      }),
    });
    this.#slots = new Slots(this.#options.concurrency);
  }

  #key(name: string): string {
    checkObjectName(name);
    return `${this.#at.prefix}${name}`;
  }

  /**
   * Run one request (`attempt`, sent again from scratch on each try) in a slot, retrying what
   * may pass; the error that stays says `what` failed (`GET pieces/ab/...`) and why.
   */
  async #request<T>(what: string, attempt: () => Promise<T>): Promise<T> {
    const startedMs = Date.now();
    let delayMs = BACKOFF_FIRST_MS;
    for (let tries = 1; ; tries++) {
      try {
        const result = await this.#slots.run(attempt);
        this.#answered = true;
        return result;
      } catch (err) {
        const f = classify(err);
        if ((err as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode !== undefined) this.#answered = true;
        else if (!this.#answered && (err as { code?: string }).code === 'ECONNREFUSED') f.retry = false;
        const elapsedMs = Date.now() - startedMs;
        if (!f.retry || elapsedMs + delayMs > this.#options.retryForMs) {
          const after = tries > 1 ? ` (after ${tries} attempts in ${(elapsedMs / 1000).toFixed(1)} s)` : '';
          throw new BdsnapError(f.code, `S3 ${what} at ${this.location} failed: ${f.why}${after}`, { cause: err });
        }
        await sleep(delayMs / 2 + Math.random() * delayMs / 2);
        delayMs = Math.min(BACKOFF_MAX_MS, delayMs * 2);
      }
    }
  }

  /** Create the bucket unless it exists (for `init`). */
  async createBucket(): Promise<void> {
    const Bucket = this.#at.bucket;
    try {
      await this.#request(`HEAD bucket ${Bucket}`, () => this.#client.send(new HeadBucketCommand({ Bucket })));
      return;
    } catch (err) {
      if ((err as BdsnapError).code !== 'ENOENT') throw err;
    }
    await this.#request(`CREATE bucket ${Bucket}`, async () => {
      try {
        await this.#client.send(new CreateBucketCommand({ Bucket }));
      } catch (err) {
        // Another host created it in the meantime: the same outcome.
        if ((err as { name?: string }).name !== 'BucketAlreadyOwnedByYou') throw err;
      }
    });
  }

  async put(name: string, data: Buffer | readonly Buffer[]): Promise<void> {
    const Key = this.#key(name);
    const Body = Buffer.isBuffer(data) ? data : data.length === 1 ? data[0]! : Buffer.concat(data);
    await this.#request(`PUT ${name}`, () => this.#client.send(new PutObjectCommand({ Bucket: this.#at.bucket, Key, Body, ContentLength: Body.length })));
  }

  async stage(name: string, data: Buffer | readonly Buffer[]): Promise<void> {
    this.#throwStageFailure();
    const putting: Promise<void> = this.put(name, data)
      .catch((err: unknown) => {
        this.#stageFailure ??= { err };
      })
      .finally(() => this.#staging.delete(putting));
    this.#staging.add(putting);
    // One more queued than in flight keeps the connections busy between answers.
    while (this.#staging.size > this.#options.concurrency * 2) await Promise.race(this.#staging);
  }

  async commit(): Promise<void> {
    while (this.#staging.size > 0) await Promise.all(this.#staging);
    this.#throwStageFailure();
  }

  async discard(): Promise<void> {
    // Objects already put stay: nothing names them, and prune removes them.
    await Promise.allSettled(this.#staging);
    this.#stageFailure = undefined;
  }

  #throwStageFailure(): void {
    const failure = this.#stageFailure;
    this.#stageFailure = undefined;
    if (failure) throw failure.err;
  }

  async get(name: string, options?: GetOptions): Promise<Buffer> {
    const Key = this.#key(name);
    const range = options && 'offsetBytes' in options ? options : undefined;
    const maxBytes = options && 'maxBytes' in options ? options.maxBytes : MAX_OBJECT_BYTES;
    if (range?.lengthBytes === 0) {
      if (!(await this.stat(name))) throw this.#missing(name);
      return Buffer.alloc(0);
    }
    const Range = range ? `bytes=${range.offsetBytes}-${range.offsetBytes + range.lengthBytes - 1}` : undefined;
    const what = range ? `GET ${name} bytes ${range.offsetBytes}+${range.lengthBytes}` : `GET ${name}`;
    try {
      return await this.#request(what, async () => {
        const res = await this.#client.send(new GetObjectCommand({ Bucket: this.#at.bucket, Key, Range }));
        const body = res.Body as Readable;
        const length = res.ContentLength;
        // Before allocating: the server's claim is checked against what the object can be.
        if (length === undefined || (!range && length > maxBytes) || (range && length > range.lengthBytes)) {
          body.destroy();
          throw new BdsnapError('ECORRUPT', `object ${name} in ${this.location} is ${length ?? 'of unknown size, '} bytes, more than the ${range?.lengthBytes ?? maxBytes} it can be; it is damaged or not bdsnap's`);
        }
        const out = await readBody(body, length);
        if (range && out.length < range.lengthBytes) throw new BdsnapError('EINVAL', `object ${name} ends before ${range.offsetBytes + range.lengthBytes}`);
        return out;
      });
    } catch (err) {
      const e = err as BdsnapError & { cause?: { name?: string } };
      if (e.code === 'ENOENT') throw this.#missing(name, err);
      if (range && e.cause?.name === 'InvalidRange') throw new BdsnapError('EINVAL', `object ${name} ends before ${range.offsetBytes + range.lengthBytes}`, { cause: err });
      throw err;
    }
  }

  #missing(name: string, cause?: unknown): BdsnapError {
    return new BdsnapError('ENOENT', `object ${name} is missing from ${this.location}`, { cause });
  }

  async stat(name: string): Promise<ObjectInfo | undefined> {
    const Key = this.#key(name);
    try {
      const res = await this.#request(`HEAD ${name}`, () => this.#client.send(new HeadObjectCommand({ Bucket: this.#at.bucket, Key })));
      return { name, sizeBytes: res.ContentLength ?? 0, modifiedMs: res.LastModified?.getTime() ?? 0 };
    } catch (err) {
      if ((err as BdsnapError).code === 'ENOENT' && (err as { cause?: { name?: string } }).cause?.name !== 'NoSuchBucket') return undefined;
      throw err;
    }
  }

  async list(prefix: string): Promise<ObjectInfo[]> {
    const out: ObjectInfo[] = [];
    const base = this.#at.prefix;
    let ContinuationToken: string | undefined;
    do {
      const page = await this.#request(`LIST ${prefix || '(all)'}`, () => this.#client.send(new ListObjectsV2Command({
        Bucket: this.#at.bucket, Prefix: `${base}${prefix}`, ContinuationToken,
      })));
      for (const o of page.Contents ?? []) {
        const name = o.Key?.slice(base.length);
        // Keys that are not names of ours (another tool's) are not objects of this store.
        if (name === undefined || !isObjectName(name)) continue;
        out.push({ name, sizeBytes: o.Size ?? 0, modifiedMs: o.LastModified?.getTime() ?? 0 });
      }
      ContinuationToken = page.IsTruncated ? page.NextContinuationToken : undefined;
    } while (ContinuationToken);
    return out;
  }

  async names(prefix: string): Promise<string[]> {
    return (await this.list(prefix)).map((o) => o.name);
  }

  async delete(name: string): Promise<void> {
    const Key = this.#key(name);
    try {
      await this.#request(`DELETE ${name}`, () => this.#client.send(new DeleteObjectCommand({ Bucket: this.#at.bucket, Key })));
    } catch (err) {
      if ((err as BdsnapError).code !== 'ENOENT') throw err;
    }
  }

  async removeIncomplete(olderThanMs: number): Promise<number> {
    const stale: Array<{ Key: string; UploadId: string }> = [];
    let KeyMarker: string | undefined;
    let UploadIdMarker: string | undefined;
    do {
      const page = await this.#request('LIST multipart uploads', () => this.#client.send(new ListMultipartUploadsCommand({
        Bucket: this.#at.bucket, Prefix: this.#at.prefix, KeyMarker, UploadIdMarker,
      })));
      for (const u of page.Uploads ?? []) {
        if (u.Key && u.UploadId && (u.Initiated?.getTime() ?? 0) <= olderThanMs) stale.push({ Key: u.Key, UploadId: u.UploadId });
      }
      KeyMarker = page.IsTruncated ? page.NextKeyMarker : undefined;
      UploadIdMarker = page.IsTruncated ? page.NextUploadIdMarker : undefined;
    } while (KeyMarker);
    await runLimited(stale, this.#options.concurrency, async (u) => {
      await this.#request(`ABORT upload of ${u.Key}`, () => this.#client.send(new AbortMultipartUploadCommand({ Bucket: this.#at.bucket, Key: u.Key, UploadId: u.UploadId })));
    });
    return stale.length;
  }

  /** Close the kept-alive connections. */
  close(): void {
    this.#client.destroy();
  }
}

function isObjectName(name: string): boolean {
  try {
    checkObjectName(name);
    return true;
  } catch {
    return false;
  }
}
