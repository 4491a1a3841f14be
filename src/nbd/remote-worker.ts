/**
 * A worker thread serving connections to exports that live on the accepting thread: it does
 * the wire's byte work and has every request applied there (remote-exports.ts).
 */

import { workerData } from 'node:worker_threads';
import { failHandedConnections, serveHandedConnections, type WorkerSettings } from './connection-threads.js';
import { RemoteExports } from './remote-exports.js';

const port = (workerData as WorkerSettings).ownerPort;
if (port === undefined) {
  failHandedConnections(new Error('no port to the exports\' owner was given'));
} else {
  let remote: RemoteExports | undefined;
  serveHandedConnections((pool) => (remote = new RemoteExports(port, pool)), async () => remote?.close());
}
