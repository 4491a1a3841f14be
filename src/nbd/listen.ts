/**
 * Listening for NBD clients: a server of fixed exports on a unix socket and/or TCP, and the
 * policy for TCP. NBD has no authentication of its own: whoever reaches a TCP port can read and
 * write every export, and even a loopback port is open to every local user (a unix socket is
 * mode 0600). So TCP is served only with TLS required (certificates or a PSK: the client must
 * prove it holds them), or, without it, when asked for by name, and then announced. `--tls on`
 * lets a client choose plaintext, so it counts as plain TCP here.
 */

import net from 'node:net';
import path from 'node:path';
import { BdsnapError } from '../errors.js';
import { NbdServer, type NbdServerOptions } from './server.js';
import { StaticExports, type StaticExport } from './static-exports.js';
import type { NbdTls } from './tls.js';

/** Who can reach a TCP listener on `host`: a loopback address is still open to every local user. */
export function whoCanConnect(host: string): string {
  const loopback = host === 'localhost' || host === '::1' || (net.isIPv4(host) && host.startsWith('127.'));
  return loopback ? 'every local user' : `every host that can reach ${host.includes(':') ? `[${host}]` : host} (and every local user)`;
}

/**
 * TCP is served with TLS required, or else only when plaintext was accepted by name: `--tls on`
 * lets a client skip TLS, so it counts as plaintext here.
 */
export function checkTcpPolicy(listen: { host: string; port: number }, tls: NbdTls | undefined, insecureTcp: boolean, what: string): void {
  if (tls?.mode === 'require' || insecureTcp) return;
  const how = tls ? 'with --tls on a client may skip TLS, so' : 'without TLS';
  throw new BdsnapError('EINVAL',
    `refusing plain TCP on ${listen.host}:${listen.port}: ${how} ${whoCanConnect(listen.host)} could read and write ${what}; `
    + 'give --tls-certificates DIR or --tls-psk FILE (TLS required), pass --insecure-tcp to accept that, or use the unix socket');
}

/** The warning printed when TCP is served without TLS required, or undefined when it is. */
export function plainTcpWarning(endpoint: string, host: string, tls: NbdTls | undefined, what: string): string | undefined {
  if (tls?.mode === 'require') return undefined;
  const without = tls ? 'with TLS optional (--tls on) and no other authentication' : 'without TLS or authentication';
  return `plain TCP on ${endpoint}, ${without}: ${whoCanConnect(host)} can connect and ${what}`;
}

/** An NBD server of `exports` listening where `where` says (TLS as loaded). */
export async function listenOn(
  exports: StaticExport[], where: { socketPath?: string; listen?: { host: string; port: number }; log?: (event: Record<string, unknown>) => void }, tls: NbdTls | undefined,
  serverOptions: Pick<NbdServerOptions, 'threads' | 'warmUp'> = {},
): Promise<{ server: NbdServer; endpoints: string[] }> {
  const server = new NbdServer({ exports: new StaticExports(exports), log: where.log, ...serverOptions });
  const endpoints: string[] = [];
  try {
    if (where.socketPath !== undefined) {
      const socketPath = path.resolve(where.socketPath);
      await server.listenUnix(socketPath, tls);
      endpoints.push(`unix:${socketPath}`);
    }
    if (where.listen) {
      const { port } = await server.listenTcp(where.listen.host, where.listen.port, tls);
      endpoints.push(`tcp:${where.listen.host}:${port}`);
    }
  } catch (err) {
    await server.close();
    throw err;
  }
  return { server, endpoints };
}

