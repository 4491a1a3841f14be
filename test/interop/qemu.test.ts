/**
 * qemu's NBD client against `bdsnap serve`: qemu-img compare and convert, and qemu-io
 * writes, FUA writes, discards, write-zeroes, unaligned writes, flushes and parallel AIO,
 * each checked twice: by qemu reading back through NBD, and by reading the image file.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { CleanupStack } from '../../testkit/cleanup.js';
import { makeImage, makeTempDir, readRange, sha256File } from '../../testkit/files.js';
import { run, type RunResult } from '../../testkit/process.js';
import { needs } from '../../testkit/needs.js';
import { startServer } from '../../testkit/server.js';

const MiB = 1 << 20;
const IMAGE_BYTES = 16 * MiB;

async function qemuIo(uri: string, commands: string[]): Promise<RunResult> {
  const result = await run('qemu-io', ['-f', 'raw', uri, ...commands.flatMap((c) => ['-c', c])]);
  // qemu-io exits non-zero on a failed command; the text check guards older versions.
  assert.doesNotMatch(result.stdout + result.stderr, /failed|error/i, `qemu-io reported a failure:\n${result.stdout}\n${result.stderr}`);
  return result;
}

/** The bytes the 'blocks' pattern puts at `offsetBytes` (one byte, not the block number). */
function patternByte(offsetBytes: number): number {
  return (Math.floor(offsetBytes / 4096) % 251) + 1;
}

function assertFilled(image: string, offsetBytes: number, lengthBytes: number, value: number, what: string): void {
  const data = readRange(image, offsetBytes, lengthBytes);
  const bad = data.findIndex((b) => b !== value);
  assert.equal(bad, -1, `${what}: byte ${offsetBytes + bad} of the image is ${data[bad]}, expected ${value}`);
}

test('qemu-img compare and convert see the same bytes as the file', { timeout: 120_000 }, async (t) => {
  if (!needs(t, { tools: ['qemu-img', 'qemu-io'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup);
  const image = path.join(dir, 'disk.img');
  const pristine = path.join(dir, 'pristine.img');
  makeImage(image, IMAGE_BYTES, 'random', 42);
  fs.copyFileSync(image, pristine);
  const server = await startServer(cleanup, { images: [image] });
  const uri = server.uri(image);

  const same = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', image, uri]);
  assert.match(same.stdout, /identical/i);

  const converted = path.join(dir, 'converted.raw');
  await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, converted]);
  assert.equal(await sha256File(converted), await sha256File(image));
  const qcow2 = path.join(dir, 'converted.qcow2');
  await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', uri, qcow2]);
  await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', qcow2, uri]);

  // After a write through NBD, compare must notice the difference from the untouched copy.
  await qemuIo(uri, ['write -P 0x5c 5M 4k']);
  const differs = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', pristine, uri], { allowFailure: true });
  assert.equal(differs.exitCode, 1, `qemu-img compare exit 1 = images differ:\n${differs.stdout}${differs.stderr}`);
  assert.match(differs.stdout, /mismatch at offset 5242880/i);
  await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', image, uri]);
});

test('qemu-io: pattern writes, FUA, discard, write-zeroes, unaligned writes, flush and AIO', { timeout: 120_000 }, async (t) => {
  if (!needs(t, { tools: ['qemu-io'] })) return;
  const cleanup = new CleanupStack(t);
  const dir = makeTempDir(cleanup);
  const image = path.join(dir, 'io.img');
  makeImage(image, IMAGE_BYTES, 'blocks');
  const server = await startServer(cleanup, { images: [image] });
  const uri = server.uri(image);

  await qemuIo(uri, ['write -P 0xab 0 1M', 'read -P 0xab 0 1M']);
  assertFilled(image, 0, MiB, 0xab, 'plain write');
  assertFilled(image, MiB + 4, 4096 - 4, patternByte(MiB), 'the block after the write untouched');

  await qemuIo(uri, ['write -f -P 0xcd 1M 64k', 'read -P 0xcd 1M 64k']);
  assertFilled(image, MiB, 64 * 1024, 0xcd, 'FUA write');

  // Discard may or may not zero; it must succeed and leave the neighbours alone.
  await qemuIo(uri, ['discard 2M 1M', 'read -P 0xab 0 1M', 'read -P 0xcd 1M 64k']);
  const afterDiscard = readRange(image, 3 * MiB, 4096);
  assert.equal(afterDiscard.readUInt32LE(0), (3 * MiB) / 4096, 'the block after the discarded range is untouched');

  await qemuIo(uri, ['write -z 3M 512k', 'read -P 0 3M 512k', 'write -z -f 4M 4k', 'read -P 0 4M 4k']);
  assertFilled(image, 3 * MiB, 512 * 1024, 0, 'write-zeroes');
  assertFilled(image, 4 * MiB, 4096, 0, 'write-zeroes with FUA');
  assert.equal(readRange(image, 3 * MiB + 512 * 1024, 4).readUInt32LE(0), (3 * MiB + 512 * 1024) / 4096, 'block after the zeroed range untouched');

  // Unaligned: crosses a 4 KiB boundary by a few bytes on each side.
  await qemuIo(uri, ['write -P 0x11 6291453 7', 'read -P 0x11 6291453 7', 'flush']);
  assertFilled(image, 6291453, 7, 0x11, 'unaligned write');
  const around = readRange(image, 6291452, 9);
  assert.equal(around[0], patternByte(6291452), 'byte before the unaligned write untouched');
  assert.equal(around[8], patternByte(6291460), 'byte after the unaligned write untouched');

  // Many requests in flight at once, then one flush for all of them.
  const aio: string[] = [];
  for (let i = 0; i < 16; i++) aio.push(`aio_write -P ${0x20 + i} ${8 * MiB + i * 65536} 64k`);
  await qemuIo(uri, [...aio, 'aio_flush', ...Array.from({ length: 16 }, (_, i) => `read -P ${0x20 + i} ${8 * MiB + i * 65536} 64k`)]);
  for (let i = 0; i < 16; i++) assertFilled(image, 8 * MiB + i * 65536, 65536, 0x20 + i, `aio write ${i}`);

  // The last block of the export, and one past it.
  await qemuIo(uri, [`write -P 0x77 ${IMAGE_BYTES - 4096} 4k`, `read -P 0x77 ${IMAGE_BYTES - 4096} 4k`]);
  assertFilled(image, IMAGE_BYTES - 4096, 4096, 0x77, 'last block');
  const past = await run('qemu-io', ['-f', 'raw', uri, '-c', `write -P 0x77 ${IMAGE_BYTES} 4k`], { allowFailure: true });
  assert.notEqual(past.exitCode, 0, `a write past the end fails:\n${past.stdout}${past.stderr}`);
  assert.equal(fs.statSync(image).size, IMAGE_BYTES, 'the image did not grow');
});
