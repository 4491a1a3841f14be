/** A server thread's warm-up: the requests it serves itself before its first client, on a scratch device only. */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import type { BlockDevice } from '../../src/device/block-device.js';
import { BufferPool } from '../../src/device/buffer-pool.js';
import { FileDevice } from '../../src/device/file-device.js';
import { BdsnapError } from '../../src/errors.js';
import { InFlightBudget } from '../../src/nbd/in-flight-budget.js';
import type { ConnectionContext } from '../../src/nbd/server-connection.js';
import { StaticExports } from '../../src/nbd/static-exports.js';
import { SOCKET_HIGH_WATER_MARK_BYTES } from '../../src/nbd/adopted-socket.js';
import { WARM_SCRATCH_BYTES, warmRequestPath } from '../../src/nbd/warm-up.js';
import { makeImage } from '../../testkit/files.js';
import { tempDir } from './helpers.js';

/** A thread's context, as a server builds it; its own export is one the warm-up must never open. */
function contextOf(untouchable: BlockDevice): ConnectionContext {
  return {
    exports: new StaticExports([{ name: 'client-image', device: untouchable }]),
    pool: new BufferPool(8 << 20),
    budget: new InFlightBudget(64 << 20),
    maxInFlightBytes: 32 << 20,
    handshakeTimeoutMs: 5000,
    sendStallTimeoutMs: 5000,
    socketHighWaterMarkBytes: SOCKET_HIGH_WATER_MARK_BYTES,
  };
}

/** What a device was asked to do, by operation and length. */
function recorded(device: BlockDevice, failWrites = false): { device: BlockDevice; calls: string[] } {
  const calls: string[] = [];
  const wrapper: BlockDevice = {
    size: device.size, readOnly: false, blockSizes: device.blockSizes, canTrim: false, canFastZero: false, canMultiConn: true,
    read: async (target, offset) => {
      calls.push(`read ${target.length}`);
      await device.read(target, offset);
    },
    write: async (data, offset, options) => {
      calls.push(`write ${data.length}`);
      if (failWrites) throw new BdsnapError('EIO', 'the scratch disk failed');
      await device.write(data, offset, options);
    },
    flush: async () => {
      calls.push('flush');
      await device.flush();
    },
    trim: (o, l, opts) => device.trim(o, l, opts),
    zero: (o, l, opts) => device.zero(o, l, opts),
    cache: (o, l) => device.cache(o, l),
    extents: (o, l) => device.extents(o, l),
    close: () => device.close(),
  };
  return { device: wrapper, calls };
}

test('warmRequestPath: large and small writes, reads and a FLUSH reach the scratch device through the server code; the export is never opened', { timeout: 20_000 }, async (t) => {
  const dir = tempDir(t, 'bdsnap-warm-test-');
  const scratch = await FileDevice.open(makeImage(path.join(dir, 'scratch'), WARM_SCRATCH_BYTES, 0));
  t.after(() => scratch.close());
  const client = await FileDevice.open(makeImage(path.join(dir, 'client.img'), WARM_SCRATCH_BYTES, 'random'));
  t.after(() => client.close());
  const before = fs.readFileSync(path.join(dir, 'client.img'));
  const { device, calls } = recorded(scratch);
  const context = contextOf(client);

  await warmRequestPath(context, device, dir);

  for (const size of [1 << 20, 256 << 10, 64 << 10, 4096]) {
    assert.ok(calls.filter((c) => c === `write ${size}`).length >= 16, `writes of ${size} bytes: ${calls.filter((c) => c === `write ${size}`).length}`);
    assert.ok(calls.includes(`read ${size}`), `reads of ${size} bytes`);
  }
  assert.equal(calls.at(-1), 'flush');
  assert.equal((context.exports as StaticExports).openHandles, 0, 'the thread\'s own export was not opened');
  assert.ok(fs.readFileSync(path.join(dir, 'client.img')).equals(before), 'the client image is as it was');
  assert.deepEqual(fs.readdirSync(dir).sort(), ['client.img', 'scratch'], 'the warm-up socket is gone');
  assert.equal(context.budget.usedBytes, 0, 'every byte it held went back to the budget');
});

test('warmRequestPath: a scratch device that fails rejects (the caller serves cold) and leaves no socket behind', { timeout: 20_000 }, async (t) => {
  const dir = tempDir(t, 'bdsnap-warm-test-');
  const scratch = await FileDevice.open(makeImage(path.join(dir, 'scratch'), WARM_SCRATCH_BYTES, 0));
  t.after(() => scratch.close());
  const { device } = recorded(scratch, true);
  await assert.rejects(warmRequestPath(contextOf(scratch), device, dir));
  assert.deepEqual(fs.readdirSync(dir), ['scratch']);

  const tiny = await FileDevice.open(makeImage(path.join(dir, 'tiny'), 4096, 0));
  t.after(() => tiny.close());
  await assert.rejects(warmRequestPath(contextOf(scratch), tiny, dir), /too small to warm up on/);
  assert.deepEqual(fs.readdirSync(dir).sort(), ['scratch', 'tiny']);
});
