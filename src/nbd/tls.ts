/**
 * NBD over TLS: the server's credentials and policy, loaded once at start-up, and the upgrade of
 * a connection after NBD_OPT_STARTTLS.
 *
 * The options and file layout are nbdkit's, so that a directory or key file made for nbdkit
 * (or qemu-nbd) works here unchanged: a certificates directory holding `server-cert.pem`,
 * `server-key.pem`, `ca-cert.pem` and optionally `ca-crl.pem`; or a PSK file of
 * `username:hexkey` lines as `psktool -u NAME -p FILE` writes it (the username is the TLS PSK
 * identity, as libnbd and qemu send it).
 *
 * Every file is read and checked here, before the server listens, so a mistake is one clear
 * line at start-up rather than a handshake failure seen by the first client. A secret (the
 * private key, the PSK file) must be a regular file owned by this user or root and closed to
 * everyone else: the server would otherwise hand its identity to whoever can read or swap it.
 *
 * PSK is offered with TLS 1.2 cipher suites only: OpenSSL (and so Node) serves external PSKs
 * only through the TLS 1.2 PSK suites, and GnuTLS clients (libnbd, qemu) fall back to them.
 */

import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import tls from 'node:tls';
import net from 'node:net';
import { BdsnapError, toBdsnapError } from '../errors.js';

export type TlsMode = 'off' | 'on' | 'require';
export const TLS_MODES: readonly TlsMode[] = ['off', 'on', 'require'];

/** What an NBD listener needs to offer TLS. */
export interface NbdTls {
  /** `require`: every option before STARTTLS is refused (FORCEDTLS); `on`: TLS is the client's choice. */
  readonly mode: 'on' | 'require';
  /** What authenticates the server (and the client), for messages: e.g. `x509 certificates in DIR`. */
  readonly description: string;
  /** Take over a socket whose plaintext part is over, as the TLS server side. */
  wrap(socket: net.Socket, highWaterMarkBytes: number): tls.TLSSocket;
}

export interface TlsSettings {
  /** Undefined: `require` when credentials are given, else off. */
  mode?: TlsMode;
  certificatesDir?: string;
  pskFile?: string;
  /** Demand a client certificate signed by the CA in `certificatesDir`. */
  verifyPeer?: boolean;
}

/** TLS 1.2 PSK suites that OpenSSL and GnuTLS (with +PSK, +ECDHE-PSK, +DHE-PSK) share. */
const PSK_CIPHERS = [
  'ECDHE-PSK-CHACHA20-POLY1305', 'PSK-AES256-GCM-SHA384', 'PSK-AES128-GCM-SHA256',
  'ECDHE-PSK-AES256-CBC-SHA384', 'ECDHE-PSK-AES128-CBC-SHA256', 'PSK-CHACHA20-POLY1305',
].join(':');
/** A PSK identity longer than this is refused by GnuTLS and OpenSSL alike. */
const MAX_PSK_IDENTITY_BYTES = 128;
/** Credential files are small; anything bigger is a wrong path. */
const MAX_CREDENTIAL_FILE_BYTES = 1024 * 1024;

/**
 * Check the settings, read and check every credential file, and build the TLS context.
 * Returns undefined when TLS is off.
 */
export async function loadTls(settings: TlsSettings): Promise<NbdTls | undefined> {
  const { certificatesDir, pskFile, verifyPeer = false } = settings;
  const credentials = certificatesDir !== undefined || pskFile !== undefined;
  const mode = settings.mode ?? (credentials ? 'require' : 'off');
  if (!TLS_MODES.includes(mode)) throw new BdsnapError('EINVAL', `bad --tls "${String(mode)}": expected off, on or require`);
  if (certificatesDir !== undefined && pskFile !== undefined) {
    throw new BdsnapError('EINVAL', '--tls-certificates and --tls-psk exclude each other: give one');
  }
  if (verifyPeer && certificatesDir === undefined) {
    throw new BdsnapError('EINVAL', '--tls-verify-peer needs --tls-certificates DIR (its ca-cert.pem signs the client certificates)');
  }
  if (mode === 'off') {
    if (credentials || verifyPeer) throw new BdsnapError('EINVAL', '--tls off contradicts the TLS credentials given: drop them or choose --tls on|require');
    return undefined;
  }
  if (!credentials) throw new BdsnapError('EINVAL', `--tls ${mode} needs --tls-certificates DIR or --tls-psk FILE`);
  if (certificatesDir !== undefined) return certificateTls(mode, path.resolve(certificatesDir), verifyPeer);
  return pskTls(mode, path.resolve(pskFile!));
}

async function certificateTls(mode: 'on' | 'require', dir: string, verifyPeer: boolean): Promise<NbdTls> {
  const st = await fs.promises.stat(dir).catch((err: unknown) => {
    throw new BdsnapError('ENOENT', `--tls-certificates ${dir}: ${toBdsnapError(err).message}`, { cause: err });
  });
  if (!st.isDirectory()) throw new BdsnapError('EINVAL', `--tls-certificates ${dir} is not a directory`);
  const at = (name: string): string => path.join(dir, name);
  const cert = (await readCredential(at('server-cert.pem'), 'public'))!;
  const key = (await readCredential(at('server-key.pem'), 'secret'))!;
  // The CA and its revocation list decide which clients are let in when their certificates are checked.
  const ca = await readCredential(at('ca-cert.pem'), verifyPeer ? 'trusted' : 'public', !verifyPeer);
  const crl = await readCredential(at('ca-crl.pem'), verifyPeer ? 'trusted' : 'public', true);
  try {
    crypto.createPrivateKey(key);
  } catch (err) {
    throw new BdsnapError('EINVAL', `${at('server-key.pem')} is not a usable private key (a PEM key without a passphrase is needed): ${(err as Error).message}`, { cause: err });
  }
  try {
    new crypto.X509Certificate(cert);
  } catch (err) {
    throw new BdsnapError('EINVAL', `${at('server-cert.pem')} is not a PEM certificate: ${(err as Error).message}`, { cause: err });
  }
  let secureContext: tls.SecureContext;
  try {
    secureContext = tls.createSecureContext({ cert, key, ca, crl, minVersion: 'TLSv1.2' });
  } catch (err) {
    throw new BdsnapError('EINVAL', `the certificates in ${dir} cannot be used (does server-key.pem belong to server-cert.pem?): ${(err as Error).message}`, { cause: err });
  }
  return {
    mode,
    description: `x509 certificates in ${dir}${verifyPeer ? ', client certificates verified' : ''}`,
    wrap: (socket, highWaterMarkBytes) => new tls.TLSSocket(socket, {
      isServer: true, secureContext, requestCert: verifyPeer, rejectUnauthorized: verifyPeer, highWaterMark: highWaterMarkBytes,
    } as tls.TLSSocketOptions),
  };
}

async function pskTls(mode: 'on' | 'require', file: string): Promise<NbdTls> {
  const text = (await readCredential(file, 'secret'))!.toString('utf8');
  const keys = parsePskFile(text, file);
  const secureContext = tls.createSecureContext({ ciphers: PSK_CIPHERS, minVersion: 'TLSv1.2', maxVersion: 'TLSv1.2' });
  return {
    mode,
    description: `PSK from ${file} (${keys.size} identit${keys.size === 1 ? 'y' : 'ies'})`,
    wrap: (socket, highWaterMarkBytes) => new tls.TLSSocket(socket, {
      isServer: true, secureContext, highWaterMark: highWaterMarkBytes,
      // An unknown identity gets no key, and the handshake fails.
      pskCallback: (_socket: tls.TLSSocket, identity: string) => keys.get(identity) ?? null,
    } as tls.TLSSocketOptions),
  };
}

/** What a client needs to reach a TLS NBD server, in libnbd's URI terms. */
export interface ClientTlsSettings {
  /** The server's name or address: checked against its certificate. */
  host: string;
  /** `ca-cert.pem` (trusted CA), and optionally `client-cert.pem` and `client-key.pem`. */
  certificatesDir?: string;
  /** `username:hexkey` lines; `username` picks one (the only one when not given). */
  pskFile?: string;
  username?: string;
}

/**
 * The tls.connect options of a client, with its credential files read and checked as the
 * server's are (a key must be this user's or root's alone). The server's certificate is always
 * verified against the CA and the host name or address.
 */
export async function loadClientTls(settings: ClientTlsSettings): Promise<tls.ConnectionOptions> {
  const { certificatesDir, pskFile, host } = settings;
  if ((certificatesDir === undefined) === (pskFile === undefined)) {
    throw new BdsnapError('EINVAL', 'TLS needs one of tls-certificates=DIR (its ca-cert.pem) or tls-psk-file=FILE');
  }
  if (pskFile !== undefined) {
    const file = path.resolve(pskFile);
    const keys = parsePskFile((await readCredential(file, 'secret'))!.toString('utf8'), file);
    const identity = settings.username ?? (keys.size === 1 ? [...keys.keys()][0]! : undefined);
    if (identity === undefined) throw new BdsnapError('EINVAL', `${file} holds ${keys.size} users: name one (nbds://USER@HOST/...)`);
    const psk = keys.get(identity);
    if (!psk) throw new BdsnapError('ENOENT', `${file} has no key for "${identity}"`);
    return {
      ciphers: PSK_CIPHERS, minVersion: 'TLSv1.2', maxVersion: 'TLSv1.2',
      pskCallback: () => ({ psk, identity }),
      // A PSK server has no certificate: the key is what proves it.
      checkServerIdentity: () => undefined,
    };
  }
  const dir = path.resolve(certificatesDir!);
  const at = (name: string): string => path.join(dir, name);
  const ca = (await readCredential(at('ca-cert.pem'), 'trusted'))!;
  const cert = await readCredential(at('client-cert.pem'), 'public', true);
  const key = cert ? await readCredential(at('client-key.pem'), 'secret') : undefined;
  return {
    ca, ...(cert && key ? { cert, key } : {}), minVersion: 'TLSv1.2', rejectUnauthorized: true,
    host, ...(net.isIP(host) === 0 ? { servername: host } : {}),
  };
}

/**
 * Parse a PSK file: one `username:hexkey` per line, blank lines ignored. Every fault names its
 * line; a username given twice is refused rather than one of the two keys silently winning.
 */
export function parsePskFile(text: string, file: string): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!.replace(/\r$/, '');
    if (line.trim() === '') continue;
    const where = `${file} line ${i + 1}`;
    const colon = line.indexOf(':');
    if (colon <= 0) throw new BdsnapError('EINVAL', `${where}: expected username:hexkey (as psktool writes it)`);
    const identity = line.slice(0, colon);
    const hex = line.slice(colon + 1);
    if (Buffer.byteLength(identity) > MAX_PSK_IDENTITY_BYTES) throw new BdsnapError('EINVAL', `${where}: the username is longer than ${MAX_PSK_IDENTITY_BYTES} bytes`);
    if (!/^(?:[0-9a-fA-F]{2})+$/.test(hex)) throw new BdsnapError('EINVAL', `${where}: the key of "${identity}" is not an even number of hex digits`);
    if (keys.has(identity)) throw new BdsnapError('EINVAL', `${where}: "${identity}" is given a second time`);
    keys.set(identity, Buffer.from(hex, 'hex'));
  }
  if (keys.size === 0) throw new BdsnapError('EINVAL', `${file} holds no username:hexkey line`);
  return keys;
}

/**
 * Read a credential file through one descriptor (no symbolic link followed), checked on that
 * descriptor. A `secret` (a key) must be closed to group and others and owned by us or root; a
 * `trusted` file (a CA, a revocation list: what decides whom to believe) must be owned by us or
 * root and writable by nobody else, or whoever could write it would choose who is let in.
 * `optional`: a missing file gives undefined.
 */
async function readCredential(file: string, kind: 'public' | 'trusted' | 'secret', optional = false): Promise<Buffer | undefined> {
  let handle: fs.promises.FileHandle;
  try {
    handle = await fs.promises.open(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' && optional) return undefined;
    if (code === 'ENOENT') throw new BdsnapError('ENOENT', `${file} does not exist`, { cause: err });
    if (code === 'ELOOP') throw new BdsnapError('EPERM', `${file} is a symbolic link; give the file itself`, { cause: err });
    throw new BdsnapError(toBdsnapError(err).code, `cannot read ${file}: ${(err as Error).message}`, { cause: err });
  }
  try {
    const st = await handle.stat();
    if (!st.isFile()) throw new BdsnapError('EINVAL', `${file} is not a regular file`);
    if (st.size > MAX_CREDENTIAL_FILE_BYTES) throw new BdsnapError('EINVAL', `${file} is ${st.size} bytes, too big for a credential file`);
    if (kind !== 'public') {
      const euid = process.geteuid?.() ?? 0;
      if (st.uid !== euid && st.uid !== 0) {
        throw new BdsnapError('EPERM', `${file} is owned by uid ${st.uid}, who could change it; it must belong to this user (${euid}) or root`);
      }
    }
    if (kind === 'secret' && (st.mode & 0o077) !== 0) {
      throw new BdsnapError('EPERM', `${file} is open to other users (mode ${(st.mode & 0o777).toString(8)}), so the secret in it is not; chmod 600 it`);
    }
    if (kind === 'trusted' && (st.mode & 0o022) !== 0) {
      throw new BdsnapError('EPERM', `${file} can be written by other users (mode ${(st.mode & 0o777).toString(8)}), who could choose whom it trusts; chmod go-w it`);
    }
    const data = await handle.readFile();
    if (data.length === 0) throw new BdsnapError('EINVAL', `${file} is empty`);
    return data;
  } finally {
    await handle.close();
  }
}
