/**
 * One conformance suite for every BlockDevice: the file device, the layers that wrap a device
 * (copy-before-write, the dirty tracker, the point-in-time view) and the NBD client talking to
 * a real server. A later layer gets the same checks by calling
 *
 *     runBlockDeviceConformance('MyLayer over FileDevice', async (t, content) => ..., { readOnly })
 *
 * from a test file. The factory builds a fresh device whose bytes are `content` (a multiple of
 * 4096 bytes), in the test's own temporary directory, and registers its cleanup on `t`; every
 * check gets a device of its own.
 *
 * The contract checked (src/device/block-device.ts): reads return the bytes; writes, trim and
 * zero land where they are aimed and nowhere else; ranges past the end are refused (EINVAL for
 * reads, ENOSPC for modifying requests) and bad numbers with EINVAL; a read-only device
 * refuses every modifying request with EPERM; extents are contiguous and cover at most the
 * range asked; the caller may reuse a write's buffer once the promise settles; close() waits
 * for the requests in flight, and requests made after it are refused.
 */

import assert from 'node:assert/strict';
import { test, type TestContext } from 'node:test';
import { EXTENT_HOLE, EXTENT_ZERO, type BlockDevice } from '../../src/device/block-device.js';
import { BdsnapError } from '../../src/errors.js';
import { fillRandom } from '../../testkit/files.js';

/** Build a device holding `content`; register cleanup with `t.after`. */
export type BlockDeviceFactory = (t: TestContext, content: Buffer) => Promise<BlockDevice>;

/** Names of the checks. */
export type ConformanceCheck =
  | 'properties' | 'reads' | 'bounds' | 'alignment' | 'writes' | 'buffer reuse' | 'concurrent writes'
  | 'trim' | 'zero' | 'flush and fua' | 'read-only refusals' | 'extents' | 'close waits for requests in flight'
  | 'requests after close are refused';

export interface ConformanceOptions {
  /** The device refuses modifying requests (EPERM); the write checks are replaced by that one. */
  readOnly?: boolean;
  /** Bytes of the content handed to the factory; a multiple of 4096. Default 2 MiB + 12 KiB. */
  sizeBytes?: number;
  /**
   * The layer's close() is not its end: something else owns it and what is below it (an
   * attachment, a snapshot), and ends it. The two close checks are then replaced by one that
   * holds such a layer to that: close() harms no request in flight and the layer still serves.
   * The text says who owns it.
   */
  ownedBy?: string;
}

const BLOCK = 4096;
const MAX_CHECK_MS = 30_000;

/** Predicate for assert.rejects: a BdsnapError with one of `codes`. */
function code(...codes: string[]): (e: unknown) => boolean {
  return (e: unknown) => {
    assert.ok(e instanceof BdsnapError, `expected a BdsnapError (${codes.join(' or ')}), got ${String(e)}`);
    assert.ok(codes.includes(e.code), `expected ${codes.join(' or ')}, got ${e.code}: ${e.message}`);
    return true;
  };
}

async function readAt(device: BlockDevice, offsetBytes: number, lengthBytes: number): Promise<Buffer> {
  const target = Buffer.alloc(lengthBytes, 0xcc);
  await device.read(target, offsetBytes);
  return target;
}

function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

/** Register the conformance checks of one BlockDevice implementation as node:test tests. */
export function runBlockDeviceConformance(name: string, factory: BlockDeviceFactory, options: ConformanceOptions = {}): void {
  const sizeBytes = options.sizeBytes ?? (2 << 20) + 3 * BLOCK;
  if (sizeBytes % BLOCK !== 0 || sizeBytes < 64 * BLOCK) throw new Error(`conformance size must be a multiple of ${BLOCK} of at least 256 KiB`);
  const readOnly = options.readOnly === true;

  const check = (checkName: ConformanceCheck, body: (device: BlockDevice, content: Buffer, t: TestContext) => Promise<void>): void => {
    test(`${name} conforms: ${checkName}`, { timeout: MAX_CHECK_MS }, async (t) => {
      const content = Buffer.alloc(sizeBytes);
      fillRandom(content, sizeBytes ^ checkName.length);
      const device = await factory(t, Buffer.from(content));
      await body(device, content, t);
    });
  };

  check('properties', async (device) => {
    assert.equal(device.size, sizeBytes);
    assert.equal(device.readOnly, readOnly);
    const { minimum, preferred, maximum } = device.blockSizes;
    assert.ok(isPowerOfTwo(minimum) && isPowerOfTwo(preferred), `block sizes are powers of two: ${JSON.stringify(device.blockSizes)}`);
    assert.ok(minimum <= preferred && preferred <= maximum && minimum <= BLOCK, `minimum <= preferred <= maximum: ${JSON.stringify(device.blockSizes)}`);
    for (const flag of [device.canTrim, device.canFastZero, device.canMultiConn]) assert.equal(typeof flag, 'boolean');
  });

  check('reads', async (device, content) => {
    assert.deepEqual(await readAt(device, 0, sizeBytes), content, 'the whole device in one read');
    assert.deepEqual(await readAt(device, sizeBytes - BLOCK, BLOCK), content.subarray(sizeBytes - BLOCK), 'the last block');
    assert.deepEqual(await readAt(device, 5 * BLOCK, 0), Buffer.alloc(0), 'a zero-length read');
    await device.read(Buffer.alloc(0), sizeBytes);
    const offsets = Array.from({ length: 64 }, (_, i) => ((i * 7919) % (sizeBytes / BLOCK - 8)) * BLOCK);
    const many = await Promise.all(offsets.map((o, i) => readAt(device, o, BLOCK * (1 + (i % 8)))));
    many.forEach((b, i) => assert.deepEqual(b, content.subarray(offsets[i]!, offsets[i]! + b.length), `concurrent read ${i} at ${offsets[i]}`));
    await device.cache(0, sizeBytes);
  });

  check('bounds', async (device) => {
    await assert.rejects(readAt(device, sizeBytes - BLOCK, 2 * BLOCK), code('EINVAL'), 'a read past the end');
    await assert.rejects(readAt(device, sizeBytes, BLOCK), code('EINVAL'), 'a read at the end');
    await assert.rejects(device.extents(sizeBytes, BLOCK), code('EINVAL'), 'extents past the end');
    const writeCode = readOnly ? ['EPERM', 'ENOSPC'] : ['ENOSPC'];
    await assert.rejects(device.write(Buffer.alloc(2 * BLOCK), sizeBytes - BLOCK), code(...writeCode), 'a write past the end');
    // Trim does not grow anything: EINVAL is as good as ENOSPC (NBD servers such as nbdkit answer EINVAL).
    await assert.rejects(device.trim(sizeBytes - BLOCK, 2 * BLOCK), code(...writeCode, 'EINVAL'), 'a trim past the end');
    await assert.rejects(device.zero(sizeBytes, BLOCK), code(...writeCode), 'a zero past the end');
  });

  check('alignment', async (device, content) => {
    const { minimum } = device.blockSizes;
    // Requests aligned to the minimum work at both edges of the device.
    assert.deepEqual(await readAt(device, minimum, minimum), content.subarray(minimum, 2 * minimum));
    assert.deepEqual(await readAt(device, sizeBytes - minimum, minimum), content.subarray(sizeBytes - minimum));
    if (minimum === 1) {
      assert.deepEqual(await readAt(device, 4093, 10), content.subarray(4093, 4103), 'an unaligned read across a block boundary');
      if (!readOnly) {
        await device.write(Buffer.from('unaligned!'), 8190);
        assert.deepEqual(await readAt(device, 8188, 14), Buffer.concat([content.subarray(8188, 8190), Buffer.from('unaligned!'), content.subarray(8200, 8202)]));
      }
    }
  });

  if (readOnly) {
    check('read-only refusals', async (device, content) => {
      await assert.rejects(device.write(Buffer.alloc(BLOCK, 1), 0), code('EPERM'));
      await assert.rejects(device.write(Buffer.alloc(BLOCK, 1), 0, { fua: true }), code('EPERM'));
      await assert.rejects(device.trim(0, BLOCK), code('EPERM'));
      await assert.rejects(device.zero(0, BLOCK), code('EPERM'));
      await device.flush();
      assert.deepEqual(await readAt(device, 0, sizeBytes), content, 'nothing changed');
    });
  } else {
    check('writes', async (device, content) => {
      const model = Buffer.from(content);
      const apply = async (offsetBytes: number, lengthBytes: number, seed: number): Promise<void> => {
        const data = Buffer.alloc(lengthBytes);
        fillRandom(data, seed);
        await device.write(data, offsetBytes);
        data.copy(model, offsetBytes);
      };
      await apply(0, BLOCK, 1);
      await apply(sizeBytes - BLOCK, BLOCK, 2);
      await apply(10 * BLOCK, 40 * BLOCK, 3);
      await apply(12 * BLOCK, 3 * BLOCK, 4); // over part of the previous one
      await apply(100 * BLOCK, 0, 5);
      assert.deepEqual(await readAt(device, 0, sizeBytes), model);
    });

    check('buffer reuse', async (device) => {
      const data = Buffer.alloc(8 * BLOCK, 0x5a);
      await device.write(data, 16 * BLOCK);
      data.fill(0xa5); // the caller may reuse the buffer once the write has settled
      await device.flush();
      assert.ok((await readAt(device, 16 * BLOCK, 8 * BLOCK)).every((b) => b === 0x5a), 'the bytes written are the ones passed, not later ones');
    });

    check('concurrent writes', async (device) => {
      const pieces = Array.from({ length: 48 }, (_, i) => ({ offsetBytes: i * 9 * BLOCK, data: Buffer.alloc(BLOCK * (1 + (i % 9)), i + 1) }));
      await Promise.all(pieces.map((p) => device.write(p.data, p.offsetBytes)));
      for (const p of pieces) assert.deepEqual(await readAt(device, p.offsetBytes, p.data.length), p.data, `write at ${p.offsetBytes}`);
    });

    check('trim', async (device, content) => {
      await device.trim(8 * BLOCK, 4 * BLOCK);
      await device.trim(0, 0);
      // Trimmed bytes are unspecified (the old data or zeroes); their neighbours are untouched.
      assert.deepEqual(await readAt(device, 0, 8 * BLOCK), content.subarray(0, 8 * BLOCK));
      assert.deepEqual(await readAt(device, 12 * BLOCK, 8 * BLOCK), content.subarray(12 * BLOCK, 20 * BLOCK));
      const trimmed = await readAt(device, 8 * BLOCK, 4 * BLOCK);
      for (let o = 0; o < trimmed.length; o += BLOCK) {
        const block = trimmed.subarray(o, o + BLOCK);
        assert.ok(block.equals(content.subarray(8 * BLOCK + o, 9 * BLOCK + o)) || block.every((b) => b === 0), `trimmed block ${o / BLOCK} is old data or zeroes`);
      }
      await device.trim(20 * BLOCK, BLOCK, { fua: true });
    });

    check('zero', async (device, content) => {
      // Not on a block boundary where the device allows it (minimum below 4096).
      const start = 3 * BLOCK + (device.blockSizes.minimum < BLOCK ? Math.max(device.blockSizes.minimum, 100 - (100 % device.blockSizes.minimum)) : 0);
      await device.zero(start, 2 * BLOCK);
      await device.zero(40 * BLOCK, 4 * BLOCK, { noHole: true, fua: true });
      const all = await readAt(device, 0, sizeBytes);
      assert.ok(all.subarray(start, start + 2 * BLOCK).every((b) => b === 0), 'zeroed');
      assert.ok(all.subarray(40 * BLOCK, 44 * BLOCK).every((b) => b === 0), 'zeroed with noHole');
      assert.deepEqual(all.subarray(0, start), content.subarray(0, start), 'before the range');
      assert.deepEqual(all.subarray(start + 2 * BLOCK, 40 * BLOCK), content.subarray(start + 2 * BLOCK, 40 * BLOCK), 'between the ranges');
      assert.deepEqual(all.subarray(44 * BLOCK), content.subarray(44 * BLOCK), 'after the range');
      if (device.canFastZero) {
        // As NBD's FAST_ZERO: the request either zeroes or fails at once with ENOTSUP, changing nothing.
        const outcome = await device.zero(50 * BLOCK, BLOCK, { fastZero: true }).then(() => 'zeroed', (e: unknown) => e);
        const after = await readAt(device, 50 * BLOCK, BLOCK);
        if (outcome === 'zeroed') assert.ok(after.every((b) => b === 0), 'a fast zero zeroes');
        else {
          code('ENOTSUP')(outcome);
          assert.deepEqual(after, content.subarray(50 * BLOCK, 51 * BLOCK), 'a refused fast zero changes nothing');
        }
      } else {
        await assert.rejects(device.zero(50 * BLOCK, BLOCK, { fastZero: true }), code('ENOTSUP'), 'fast zero without a fast path');
        assert.deepEqual(await readAt(device, 50 * BLOCK, BLOCK), content.subarray(50 * BLOCK, 51 * BLOCK), 'a refused fast zero changes nothing');
      }
    });

    check('flush and fua', async (device) => {
      await device.flush();
      await device.write(Buffer.alloc(BLOCK, 0x77), 30 * BLOCK, { fua: true });
      await Promise.all([device.flush(), device.write(Buffer.alloc(BLOCK, 0x78), 31 * BLOCK), device.flush()]);
      assert.ok((await readAt(device, 30 * BLOCK, BLOCK)).every((b) => b === 0x77));
      assert.ok((await readAt(device, 31 * BLOCK, BLOCK)).every((b) => b === 0x78));
    });
  }

  check('extents', async (device, content) => {
    for (const [offsetBytes, lengthBytes] of [[0, sizeBytes], [BLOCK, 5 * BLOCK], [sizeBytes - BLOCK, BLOCK]] as const) {
      const extents = await device.extents(offsetBytes, lengthBytes);
      assert.ok(extents.length >= 1, 'at least one extent');
      let covered = 0;
      for (const e of extents) {
        assert.ok(Number.isSafeInteger(e.length) && e.length > 0, `extent length ${e.length}`);
        assert.equal(e.flags & ~(EXTENT_HOLE | EXTENT_ZERO), 0, `extent flags ${e.flags}`);
        const bytes = content.subarray(offsetBytes + covered, offsetBytes + covered + Math.min(e.length, lengthBytes - covered));
        if ((e.flags & EXTENT_ZERO) !== 0) assert.ok(bytes.every((b) => b === 0), `data reported as zero at ${offsetBytes + covered}`);
        covered += e.length;
      }
      assert.ok(covered <= lengthBytes, `extents cover ${covered} of the ${lengthBytes} bytes asked`);
    }
  });

  if (options.ownedBy !== undefined) {
    const checkOwned = (): void => {
      test(`${name} conforms: close() leaves it to its owner (${options.ownedBy})`, { timeout: MAX_CHECK_MS }, async (t) => {
        const content = Buffer.alloc(sizeBytes);
        fillRandom(content, sizeBytes ^ 7);
        const device = await factory(t, Buffer.from(content));
        const inFlight: Array<Promise<unknown>> = [];
        for (let i = 0; i < 8; i++) {
          const offsetBytes = i * 16 * BLOCK;
          inFlight.push(readAt(device, offsetBytes, 16 * BLOCK).then((b) => assert.deepEqual(b, content.subarray(offsetBytes, offsetBytes + 16 * BLOCK), `read ${i} in flight at close`)));
          if (!readOnly) inFlight.push(device.write(Buffer.alloc(4 * BLOCK, i + 1), offsetBytes + 256 * BLOCK));
        }
        await device.close();
        await Promise.all(inFlight);
        const expected = Buffer.from(content);
        if (!readOnly) for (let i = 0; i < 8; i++) expected.fill(i + 1, i * 16 * BLOCK + 256 * BLOCK, i * 16 * BLOCK + 260 * BLOCK);
        assert.deepEqual(await readAt(device, 0, 300 * BLOCK), expected.subarray(0, 300 * BLOCK), 'the layer still serves, with every write in place');
        await device.close();
      });
    };
    checkOwned();
    return;
  }

  check('close waits for requests in flight', async (device, content) => {
    const settled: string[] = [];
    const inFlight: Array<Promise<unknown>> = [];
    for (let i = 0; i < 16; i++) {
      const offsetBytes = i * 16 * BLOCK;
      inFlight.push(readAt(device, offsetBytes, 16 * BLOCK).then((b) => {
        assert.deepEqual(b, content.subarray(offsetBytes, offsetBytes + 16 * BLOCK), `read ${i} in flight at close`);
        settled.push(`read ${i}`);
      }));
      if (!readOnly) inFlight.push(device.write(Buffer.alloc(4 * BLOCK, i + 1), offsetBytes + 256 * BLOCK).then(() => { settled.push(`write ${i}`); }));
    }
    await device.close();
    assert.equal(settled.length, inFlight.length, `close() returned with requests still in flight (${settled.length} of ${inFlight.length} settled)`);
    await Promise.all(inFlight);
  });

  check('requests after close are refused', async (device) => {
    await device.close();
    if (!readOnly) await assert.rejects(device.write(Buffer.alloc(BLOCK), 0), (e: unknown) => e instanceof BdsnapError, 'a write after close');
    await assert.rejects(readAt(device, 0, BLOCK), (e: unknown) => e instanceof BdsnapError, 'a read after close');
    await device.close(); // closing twice is harmless
  });
}
