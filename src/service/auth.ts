/**
 * The service password: a credential of bdsnap's own, needed by activate and deactivate.
 *
 * Stored only as a salted scrypt hash (memory-hard; N, r, p recorded beside the hash so they
 * can be raised later) in `<state-dir>/password`, mode 0600, replaced atomically. Comparison
 * is constant-time. Every failed attempt delays the answer, longer after each failure in a
 * row (process-wide, so parallel guessers share the penalty); a success resets the count.
 * Nothing here logs, and no error message carries a password.
 */

import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import { BdsnapError } from '../errors.js';
import { writeFileAtomic } from '../host/atomic-file.js';
import { trimHeapSoon } from '../host/libc.js';
import { parseJson } from '../stored-json.js';

export const PASSWORD_FILE = 'password';
export const MIN_PASSWORD_LENGTH = 8;
export const MAX_PASSWORD_LENGTH = 1024;

/**
 * scrypt cost: one of OWASP's current recommended settings of equal strength (N=2^15, r=8, p=3;
 * the others trade memory for passes, up to N=2^17 with p=1). This one keeps a hash at
 * 2^15 × 8 × 128 bytes = 32 MiB of memory, so a flood of wrong passwords (each one hashed, one at
 * a time) cannot make the daemon hold 128 MiB; the three passes make it as costly to guess. N, r
 * and p are stored with each hash, so a hash made with the former p=1 still verifies; setting the
 * password again rehashes it at this cost.
 */
const SCRYPT_N = 1 << 15;
const SCRYPT_R = 8;
const SCRYPT_P = 3;
const KEY_BYTES = 32;
const SALT_BYTES = 16;

const FIRST_FAILURE_DELAY_MS = 250;
const MAX_FAILURE_DELAY_MS = 8000;
/**
 * Checks that may wait in line. Each holds its request (and its connection's state) while it
 * waits, and after wrong guesses the line moves at one check per 8 s: without a cap a stream of
 * wrong passwords grew the daemon by every waiting connection, with no end.
 */
const MAX_WAITING_CHECKS = 8;

const storedSchema = z.object({
  algorithm: z.literal('scrypt'),
  N: z.number().int().min(2),
  r: z.number().int().min(1),
  p: z.number().int().min(1),
  salt: z.string().min(1),
  hash: z.string().min(1),
});
type StoredPassword = z.infer<typeof storedSchema>;

/** After a run of password checks, their scrypt blocks go back to the kernel. */
const TRIM_AFTER_HASHES_MS = 500;

function scrypt(password: string, salt: Buffer, N: number, r: number, p: number, keyBytes: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    crypto.scrypt(password.normalize('NFC'), salt, keyBytes, { N, r, p, maxmem: 256 * N * r + (1 << 20) }, (err, key) => {
      trimHeapSoon(TRIM_AFTER_HASHES_MS);
      if (err) reject(err);
      else resolve(key);
    });
  });
}

export function checkPasswordShape(password: string): void {
  if (password.length < MIN_PASSWORD_LENGTH) {
    throw new BdsnapError('EINVAL', `the service password must have at least ${MIN_PASSWORD_LENGTH} characters`);
  }
  if (password.length > MAX_PASSWORD_LENGTH) {
    throw new BdsnapError('EINVAL', `the service password must have at most ${MAX_PASSWORD_LENGTH} characters`);
  }
}

export class PasswordStore {
  readonly #file: string;
  #consecutiveFailures = 0;
  /** Serializes checks so parallel guesses wait behind each other's penalty. */
  #queue: Promise<unknown> = Promise.resolve();
  /** Checks queued or running. */
  #pending = 0;

  constructor(stateDir: string) {
    this.#file = path.join(stateDir, PASSWORD_FILE);
  }

  async isSet(): Promise<boolean> {
    return (await this.#load()) !== undefined;
  }

  /**
   * Resolve if `password` is the service password; otherwise, after the failure delay, throw
   * EAUTH. With MAX_WAITING_CHECKS already in line, refuse at once (EBUSY) without checking.
   */
  async verify(password: string): Promise<void> {
    if (this.#pending >= MAX_WAITING_CHECKS) {
      throw new BdsnapError('EBUSY', `${this.#pending} password checks are already waiting (wrong passwords slow each one down); try again in a minute`);
    }
    this.#pending++;
    const run = this.#queue.then(() => this.#verifyNow(password)).finally(() => this.#pending--);
    this.#queue = run.catch(() => undefined);
    return run;
  }

  /** Set the password; changing an existing one needs the current one. */
  async set(newPassword: string, currentPassword?: string): Promise<void> {
    checkPasswordShape(newPassword);
    if (await this.isSet()) {
      if (currentPassword === undefined) {
        throw new BdsnapError('EAUTH', 'a service password is already set: give the current one first to change it');
      }
      await this.verify(currentPassword);
    }
    const salt = crypto.randomBytes(SALT_BYTES);
    const hash = await scrypt(newPassword, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, KEY_BYTES);
    const stored: StoredPassword = {
      algorithm: 'scrypt', N: SCRYPT_N, r: SCRYPT_R, p: SCRYPT_P, salt: salt.toString('base64'), hash: hash.toString('base64'),
    };
    await writeFileAtomic(this.#file, `${JSON.stringify(stored)}\n`, 0o600);
  }

  async #verifyNow(password: string): Promise<void> {
    const stored = await this.#load();
    if (!stored) throw new BdsnapError('EAUTH', 'no service password is set yet: run `bdsnap passwd` first');
    const expected = Buffer.from(stored.hash, 'base64');
    // Hash even absurd inputs (cut to the maximum) so timing does not tell lengths apart.
    const candidate = await scrypt(password.slice(0, MAX_PASSWORD_LENGTH), Buffer.from(stored.salt, 'base64'),
      stored.N, stored.r, stored.p, expected.length);
    if (candidate.length === expected.length && crypto.timingSafeEqual(candidate, expected)) {
      this.#consecutiveFailures = 0;
      return;
    }
    this.#consecutiveFailures++;
    const delayMs = Math.min(MAX_FAILURE_DELAY_MS, FIRST_FAILURE_DELAY_MS * 2 ** (this.#consecutiveFailures - 1));
    await new Promise((resolve) => setTimeout(resolve, delayMs));
    throw new BdsnapError('EAUTH', 'wrong service password');
  }

  async #load(): Promise<StoredPassword | undefined> {
    let text: string;
    try {
      text = await fs.promises.readFile(this.#file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw new BdsnapError('EIO', `cannot read the password file ${this.#file}: ${(err as Error).message}`, { cause: err });
    }
    return parseJson(text, storedSchema, (problem) => `the password file ${this.#file} is damaged (${problem}); set a new password after removing it`);
  }
}
