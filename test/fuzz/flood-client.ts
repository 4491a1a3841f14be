/**
 * A flooding NBD client, run as its own process so that the server under test cannot slow it
 * down or share its memory. Two floods:
 *
 *   node flood-client.js reads SOCKET EXPORT CONNECTIONS REQUESTS LENGTH
 *     each connection finishes the handshake, sends REQUESTS reads of LENGTH bytes and never
 *     reads a reply;
 *   node flood-client.js half-handshakes SOCKET CONNECTIONS
 *     each connection sends its client flags and half an option header, then nothing.
 *
 * It prints one JSON line on stdout once every connection was tried ({ opened, failed }),
 * then holds what it has until it is killed or its stdin closes.
 */

import net from 'node:net';
import { NBD_CMD_READ, RawNbdClient } from '../helpers/raw-nbd.js';

const HALF_HANDSHAKE = Buffer.from([0, 0, 0, 1, 0x49, 0x48, 0x41, 0x56, 0x45, 0x4f]);
/** Connections being set up at once (more would only fill the listen backlog). */
const PARALLEL = 64;
const CONNECT_ATTEMPTS = 50;

async function readsFlood(socketPath: string, exportName: string, connections: number, requests: number, lengthBytes: number): Promise<number> {
  let opened = 0;
  await inBatches(connections, async () => {
    const client = await RawNbdClient.connect(socketPath);
    const reply = await client.go(exportName);
    if (reply.type !== 1) throw new Error(`NBD_OPT_GO refused (${reply.type})`);
    client.stopReading();
    for (let i = 0; i < requests; i++) client.sendRequest(NBD_CMD_READ, BigInt(i * lengthBytes) % (client.exportSize - BigInt(lengthBytes) + 1n), lengthBytes);
    opened++;
  });
  return opened;
}

async function halfHandshakes(socketPath: string, connections: number): Promise<number> {
  let opened = 0;
  await inBatches(connections, async () => {
    // A full listen backlog refuses a unix-socket connect at once (EAGAIN): try again, as a
    // patient attacker would.
    for (let attempt = 0; attempt < CONNECT_ATTEMPTS; attempt++) {
      if (await halfHandshake(socketPath)) {
        opened++;
        return;
      }
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  });
  return opened;
}

function halfHandshake(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.createConnection(socketPath);
    // What the server sends (its greeting) is never read; errors after setup are its closing.
    socket.on('error', () => resolve(false));
    socket.once('connect', () => {
      socket.write(HALF_HANDSHAKE);
      socket.pause();
      resolve(true);
    });
  });
}

async function inBatches(count: number, open: () => Promise<void>): Promise<void> {
  for (let done = 0; done < count; done += PARALLEL) {
    const batch = Array.from({ length: Math.min(PARALLEL, count - done) }, () => open().catch(() => undefined));
    await Promise.all(batch);
  }
}

async function main(): Promise<void> {
  const [mode, socketPath, ...rest] = process.argv.slice(2);
  if (socketPath === undefined) throw new Error('usage: flood-client reads|half-handshakes SOCKET ...');
  // Sockets the server closes are expected; nothing of theirs may end this process.
  process.on('uncaughtException', () => undefined);
  let opened: number;
  let tried: number;
  if (mode === 'reads') {
    const [exportName = '', connections = '40', requests = '8', lengthBytes = String(32 << 20)] = rest;
    tried = Number(connections);
    opened = await readsFlood(socketPath, exportName, tried, Number(requests), Number(lengthBytes));
  } else if (mode === 'half-handshakes') {
    tried = Number(rest[0] ?? '1100');
    opened = await halfHandshakes(socketPath, tried);
  } else {
    throw new Error(`unknown flood ${mode}`);
  }
  process.stdout.write(`${JSON.stringify({ opened, failed: tried - opened })}\n`);
  process.stdin.resume();
  process.stdin.once('end', () => process.exit(0));
  process.stdin.once('close', () => process.exit(0));
}

// Without arguments (a test runner that picks this file up as a test) there is nothing to do.
if (process.argv.length > 2) await main();
