/**
 * The process a fuzz campaign aims at: `bdsnap serve` on a fresh unix socket with two images,
 * one for the fuzz traffic and one for the well-behaved client.
 */

import path from 'node:path';
import type { AfterHook } from '../../testkit/files.js';
import { makeImage, makeTempDir } from '../../testkit/files.js';
import { startServer, type NbdServer } from '../../testkit/server.js';
import type { NbdCampaignOptions } from '../../testkit/fuzz/nbd-campaign.js';

export interface FuzzTarget {
  server: NbdServer;
  fuzzExport: string;
  checkerExport: string;
  sizeBytes: number;
}

export async function startFuzzTarget(cleanup: AfterHook, sizeBytes = 8 << 20): Promise<FuzzTarget> {
  const dir = makeTempDir(cleanup, 'bdsnap-fuzz-');
  const fuzzImage = path.join(dir, 'fuzz.img');
  const checkerImage = path.join(dir, 'checker.img');
  makeImage(fuzzImage, sizeBytes, 'blocks');
  makeImage(checkerImage, sizeBytes, 'zero');
  const server = await startServer(cleanup, { kind: 'bdsnap', images: [fuzzImage, checkerImage], socketPath: path.join(dir, 'nbd.sock') });
  const [fuzzExport, checkerExport] = server.exportNames as [string, string];
  return { server, fuzzExport, checkerExport, sizeBytes };
}

/** The options of an NBD campaign that say where it aims: at `target`'s server and exports. */
export function campaignAt(target: FuzzTarget): Pick<NbdCampaignOptions, 'socketPath' | 'pid' | 'target' | 'checkerExport'> {
  return {
    socketPath: target.server.socketPath, pid: target.server.pid,
    target: { exportName: target.fuzzExport, sizeBytes: target.sizeBytes }, checkerExport: target.checkerExport,
  };
}
