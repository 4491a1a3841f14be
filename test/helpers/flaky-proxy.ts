/**
 * A TCP proxy in front of a server that misbehaves on purpose, one connection at a time: the
 * test sets what the next connections get (`fault`): passed through, reset (TCP RST on the
 * first bytes of the request), or answered `503 SlowDown` the way S3 throttles. Counts what
 * it did, so a test can see the faults were met. Loopback only.
 */

import net from 'node:net';

export type Fault = 'pass' | 'reset' | 'slowdown';

const SLOWDOWN_BODY = '<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>';
const SLOWDOWN = `HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: ${SLOWDOWN_BODY.length}\r\nConnection: close\r\n\r\n${SLOWDOWN_BODY}`;

export class FlakyProxy {
  readonly #server: net.Server;
  readonly #sockets = new Set<net.Socket>();
  /** What new connections get. */
  fault: Fault = 'pass';
  readonly counts: Record<Fault, number> = { pass: 0, reset: 0, slowdown: 0 };
  port = 0;

  constructor(targetPort: number) {
    this.#server = net.createServer((client) => {
      this.#sockets.add(client);
      client.once('close', () => this.#sockets.delete(client));
      const fault = this.fault;
      this.counts[fault]++;
      client.on('error', () => undefined);
      if (fault === 'reset') {
        client.once('data', () => client.resetAndDestroy());
        return;
      }
      if (fault === 'slowdown') {
        client.once('data', () => client.end(SLOWDOWN));
        return;
      }
      const upstream = net.connect(targetPort, '127.0.0.1');
      this.#sockets.add(upstream);
      upstream.once('close', () => this.#sockets.delete(upstream));
      upstream.on('error', () => client.destroy());
      client.once('close', () => upstream.destroy());
      upstream.once('close', () => client.destroy());
      client.pipe(upstream).pipe(client);
    });
  }

  async listen(): Promise<string> {
    await new Promise<void>((resolve) => this.#server.listen(0, '127.0.0.1', resolve));
    this.port = (this.#server.address() as net.AddressInfo).port;
    return `http://127.0.0.1:${this.port}`;
  }

  /** Drop every open connection (kept-alive ones too), so the next requests meet `fault`. */
  dropAll(): void {
    for (const s of this.#sockets) s.destroy();
  }

  async close(): Promise<void> {
    this.dropAll();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
  }
}
