/** A mount cycle of a device through the kernel and a daemon's NBD socket: one session with known writes. */

import fs from 'node:fs';
import path from 'node:path';
import type { RunningDaemon } from '../../testkit/daemon.js';
import { fillRandom } from '../../testkit/files.js';
import { attachKernel, mountDevice } from '../../testkit/kernel.js';
import { run } from '../../testkit/process.js';

export interface Listed { dir: string; state: string; mountTime: string }

/** One mount of the device through the daemon: write `name` (1 MiB of `seed`), unmount; the new session's dir. */
export async function mountCycle(daemon: RunningDaemon, device: string, mountPoint: string, name: string, seed: number): Promise<string> {
  const list = async (): Promise<Listed[]> => (JSON.parse((await daemon.cli(['list', device, '--json'])).stdout) as { sessions: Listed[] }).sessions;
  const before = new Set((await list()).map((s) => s.dir));
  const attachment = await attachKernel(daemon.server.socketPath, device);
  try {
    const unmount = await mountDevice(attachment.loopDevice, mountPoint);
    try {
      const data = Buffer.alloc(1 << 20);
      fillRandom(data, seed);
      fs.writeFileSync(path.join(mountPoint, name), data);
      await run('sync', []);
    } finally {
      await unmount();
    }
  } finally {
    await attachment.detach();
  }
  // The session closes once the last NBD connection is gone.
  const deadlineMs = Date.now() + 15_000;
  for (;;) {
    const fresh = (await list()).filter((s) => !before.has(s.dir));
    if (fresh.length === 1 && fresh[0]!.state === 'complete') return fresh[0]!.dir;
    if (Date.now() > deadlineMs) throw new Error(`no complete new session after the mount of ${name}: ${JSON.stringify(fresh)}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}
