/**
 * TLS credentials for tests and the benchmark, made with openssl in a given directory: a CA,
 * certificates signed by it in nbdkit's (server) and libnbd's (client) layouts, a second CA,
 * and PSK files as psktool writes them.
 */

import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

export interface Pki {
  /** server-cert.pem, server-key.pem, ca-cert.pem: the server's --tls-certificates. */
  server: string;
  /** ca-cert.pem only: a client that trusts the server. */
  trusting: string;
  /** ca-cert.pem, client-cert.pem, client-key.pem signed by the CA. */
  client: string;
  /** The server's CA, and a client certificate from another CA. */
  rogueClient: string;
  /** Another CA only: a client that does not trust the server. */
  untrusting: string;
}

/** P-256 keys: made in milliseconds (RSA takes seconds on a busy machine), and GnuTLS takes them. */
const EC_KEY = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1'];

function openssl(dir: string, args: string[]): void {
  execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
}

/** A CA and the certificates signed by it, in nbdkit's and libnbd's file layout. */
export function makePki(dir: string): Pki {
  const pki = path.join(dir, 'pki');
  fs.mkdirSync(pki);
  const ca = (name: string): void => openssl(pki, ['req', '-x509', ...EC_KEY, '-nodes', '-keyout', `${name}-key.pem`,
    '-out', `${name}-cert.pem`, '-days', '2', '-subj', `/CN=${name}`]);
  const signed = (name: string, by: string, ext: string): void => {
    fs.writeFileSync(path.join(pki, `${name}.ext`), ext);
    openssl(pki, ['req', ...EC_KEY, '-nodes', '-keyout', `${name}-key.pem`, '-out', `${name}.csr`, '-subj', `/CN=${name}`]);
    openssl(pki, ['x509', '-req', '-in', `${name}.csr`, '-CA', `${by}-cert.pem`, '-CAkey', `${by}-key.pem`, '-CAcreateserial',
      '-out', `${name}-cert.pem`, '-days', '2', '-extfile', `${name}.ext`]);
  };
  ca('ca');
  ca('rogue');
  signed('server', 'ca', 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n');
  signed('client', 'ca', 'extendedKeyUsage=clientAuth\n');
  signed('rogueclient', 'rogue', 'extendedKeyUsage=clientAuth\n');
  const layout = (name: string, files: Record<string, string>): string => {
    const d = path.join(dir, name);
    fs.mkdirSync(d);
    for (const [to, from] of Object.entries(files)) fs.copyFileSync(path.join(pki, from), path.join(d, to));
    for (const f of fs.readdirSync(d)) if (f.endsWith('-key.pem')) fs.chmodSync(path.join(d, f), 0o600);
    return d;
  };
  return {
    server: layout('server', { 'ca-cert.pem': 'ca-cert.pem', 'server-cert.pem': 'server-cert.pem', 'server-key.pem': 'server-key.pem' }),
    trusting: layout('trusting', { 'ca-cert.pem': 'ca-cert.pem' }),
    client: layout('client', { 'ca-cert.pem': 'ca-cert.pem', 'client-cert.pem': 'client-cert.pem', 'client-key.pem': 'client-key.pem' }),
    rogueClient: layout('rogue-client', { 'ca-cert.pem': 'ca-cert.pem', 'client-cert.pem': 'rogueclient-cert.pem', 'client-key.pem': 'rogueclient-key.pem' }),
    untrusting: layout('untrusting', { 'ca-cert.pem': 'rogue-cert.pem' }),
  };
}

/** A PSK file as `psktool -u NAME -p FILE` writes it, mode 0600. */
export function writePsk(file: string, entries: Record<string, string>): void {
  fs.writeFileSync(file, Object.entries(entries).map(([user, key]) => `${user}:${key}\n`).join(''), { mode: 0o600 });
}

