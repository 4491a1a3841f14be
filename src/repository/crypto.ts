/**
 * Encryption and keys of a version-2 repository. Pure but for randomness and scrypt; no I/O.
 *
 * A repository has one random master key: 32 bytes of encryption key (AES-256-GCM) and 32
 * bytes of id key (HMAC-SHA256). Every object but the key objects is sealed with the
 * encryption key: `nonce (12 random bytes) || ciphertext || tag (16)`, with associated data
 * that binds it to its place (the object's name, or for a piece in a pack the piece's id), so
 * an object moved to another name, or a piece moved in a pack, fails authentication. A piece's
 * id is the HMAC-SHA256 of its raw bytes under the id key: equal content gets equal ids
 * (deduplication) and the store learns nothing from an id. Random 96-bit nonces under one key
 * stay safe for 2^32 objects, a petabyte of 256 KiB pieces.
 *
 * Each password has a key object `keys/<random id>`, plain JSON: the scrypt parameters and salt
 * and the master key sealed with the key derived from the password. Adding or removing a
 * password rewrites nothing else. A wrong password fails authentication of every key object:
 * EAUTH, before anything else is read.
 */

import { createCipheriv, createDecipheriv, createHmac, randomBytes, scrypt as scryptCb, type BinaryLike, type ScryptOptions } from 'node:crypto';
import { z } from 'zod';
import { BdsnapError } from '../errors.js';

export const NONCE_BYTES = 12;
export const TAG_BYTES = 16;
/** What sealing adds to a plaintext. */
export const SEAL_OVERHEAD_BYTES = NONCE_BYTES + TAG_BYTES;
export const CIPHER = 'aes-256-gcm';

/**
 * scrypt N=2^16, r=8, p=1 (restic's and PBS's choice): 64 MiB and about 0.2-0.4 s per try here,
 * which is what a guess of the password costs an attacker holding a key object.
 */
export const SCRYPT_DEFAULTS = { N: 65536, r: 8, p: 1 } as const;
/** Bounds on what a key object may ask for (it may be written by anyone who can write the store). */
const SCRYPT_MAX_N = 1 << 20;
const SCRYPT_MIN_N = 1 << 10;

/** The master key, as plain data so it can go to worker threads. */
export interface MasterKey {
  encryptionKey: Buffer;
  idKey: Buffer;
}

/** How pieces are named and stored: plain sha256 (unencrypted) or keyed and sealed. */
export type PieceCrypto = { kind: 'none' } | { kind: 'aes'; encryptionKey: Uint8Array; idKey: Uint8Array };

export function newMasterKey(): MasterKey {
  return { encryptionKey: randomBytes(32), idKey: randomBytes(32) };
}

export function pieceCryptoOf(key: MasterKey | undefined): PieceCrypto {
  return key ? { kind: 'aes', encryptionKey: key.encryptionKey, idKey: key.idKey } : { kind: 'none' };
}

/** The keyed id of a piece: HMAC-SHA256 under the id key, hex. */
export function keyedId(idKey: Uint8Array, raw: Uint8Array): string {
  return createHmac('sha256', idKey).update(raw).digest('hex');
}

/** Seal `parts` (one plaintext, in pieces) under `key`, bound to `aad`. */
export function seal(key: Uint8Array, aad: Buffer, parts: readonly Uint8Array[]): Buffer[] {
  const nonce = randomBytes(NONCE_BYTES);
  const cipher = createCipheriv(CIPHER, key, nonce);
  cipher.setAAD(aad);
  const out: Buffer[] = [nonce];
  for (const p of parts) out.push(cipher.update(p));
  out.push(cipher.final(), cipher.getAuthTag());
  return out;
}

/** Open what seal made; ECORRUPT (with `what`) if it was altered, bound elsewhere, or sealed under another key. */
export function open(key: Uint8Array, aad: Buffer, sealed: Buffer, what: string): Buffer {
  if (sealed.length < SEAL_OVERHEAD_BYTES) throw new BdsnapError('ECORRUPT', `${what} is damaged: too short to be sealed`);
  const decipher = createDecipheriv(CIPHER, key, sealed.subarray(0, NONCE_BYTES));
  decipher.setAAD(aad);
  decipher.setAuthTag(sealed.subarray(sealed.length - TAG_BYTES));
  const body = decipher.update(sealed.subarray(NONCE_BYTES, sealed.length - TAG_BYTES));
  try {
    decipher.final();
  } catch (err) {
    throw new BdsnapError('ECORRUPT', `${what} is damaged: it fails authentication (altered, or not sealed by this repository's key)`, { cause: err });
  }
  return body;
}

/** Associated data of a sealed object: its name, so it cannot be passed off as another. */
export function objectAad(name: string): Buffer {
  return Buffer.from(`bdsnap-object:${name}`);
}

/** Associated data of a piece in a pack: its id. */
export function pieceAad(id: string): Buffer {
  return Buffer.from(id, 'hex');
}

const KEY_AAD = Buffer.from('bdsnap-key');

export const keyObjectSchema = z.object({
  format: z.literal('bdsnap-key'),
  version: z.literal(1),
  createdAt: z.string(),
  host: z.string(),
  kdf: z.literal('scrypt'),
  N: z.number().int().min(SCRYPT_MIN_N).max(SCRYPT_MAX_N).refine((n) => (n & (n - 1)) === 0, 'N must be a power of two'),
  r: z.number().int().min(1).max(32),
  p: z.number().int().min(1).max(16),
  salt: z.string().min(16),
  /** The master key (64 bytes) sealed under the key scrypt derives from the password. */
  sealedMasterKey: z.string(),
});
export type KeyObject = z.infer<typeof keyObjectSchema>;

export interface ScryptParams {
  N: number;
  r: number;
  p: number;
}

function scrypt(password: BinaryLike, salt: Buffer, params: ScryptParams): Promise<Buffer> {
  const options: ScryptOptions = { N: params.N, r: params.r, p: params.p, maxmem: 128 * params.N * params.r * 2 + 16 * 1024 * 1024 };
  return new Promise((resolve, reject) => {
    scryptCb(password, salt, 32, options, (err, key) => (err ? reject(err) : resolve(key)));
  });
}

/** A key object for `password` that unlocks `master`. */
export async function wrapMasterKey(master: MasterKey, password: string, host: string, params: ScryptParams = SCRYPT_DEFAULTS): Promise<KeyObject> {
  const salt = randomBytes(32);
  const kek = await scrypt(password, salt, params);
  const sealed = Buffer.concat(seal(kek, KEY_AAD, [master.encryptionKey, master.idKey]));
  return {
    format: 'bdsnap-key', version: 1, createdAt: new Date().toISOString(), host, kdf: 'scrypt', ...params,
    salt: salt.toString('base64'), sealedMasterKey: sealed.toString('base64'),
  };
}

/** The master key if `password` opens `key`, else undefined (wrong password, or an altered key object). */
export async function unwrapMasterKey(key: KeyObject, password: string): Promise<MasterKey | undefined> {
  const kek = await scrypt(password, Buffer.from(key.salt, 'base64'), key);
  let body: Buffer;
  try {
    body = open(kek, KEY_AAD, Buffer.from(key.sealedMasterKey, 'base64'), 'key');
  } catch {
    return undefined;
  }
  if (body.length !== 64) return undefined;
  return { encryptionKey: body.subarray(0, 32), idKey: body.subarray(32) };
}
