/**
 * `bdsnap sffs`: format, write, read and inspect a singlefilefs image.
 *
 * `write`, `cat` and `stat` reach the device through the daemon's NBD socket by default
 * (one connection = one mount cycle: attach, I/O, flush, detach), through any NBD server
 * socket with --socket, or straight through the image file with --image (offline).
 *
 * Through the daemon, a mount cycle behaves as `bdsnap mount` does: the device is registered
 * first (the daemon serves registered devices only), so a device never activated is served
 * without a session and an active one gets a session per cycle.
 *
 * The image file layer, the formatter and the NBD client are loaded when a command needs them,
 * not for --help.
 */

import fs from 'node:fs';
import type { Command } from 'commander';
import type { BlockDevice } from '../../device/block-device.js';
import { BdsnapError } from '../../errors.js';
import { withClient } from '../../service/client.js';
import { DEFAULT_RUN_DIR, RUN_DIR_ENV, nbdSocketPath, resolveRunDir } from '../../service/paths.js';
import { SingleFileFs } from '../../fs/singlefilefs/file.js';
import { DEFAULT_IMAGE_BLOCKS, SFFS_BLOCK_SIZE, maxFileSizeFor } from '../../fs/singlefilefs/layout.js';


interface TargetOptions {
  runDir?: string;
  socket?: string;
  export?: string;
  image?: boolean;
}

interface JsonOption {
  json?: boolean;
}

export function register(program: Command): void {
  const sffs = program
    .command('sffs')
    .description('singlefilefs, the one-file filesystem of the course: format, write, read');

  sffs
    .command('mkfs')
    .description('format an image file (created or overwritten) or a block device')
    .argument('<image>', 'image file or block device')
    .option('--blocks <n>', 'image size in 4096-byte blocks (image files only)', String(DEFAULT_IMAGE_BLOCKS))
    .option('--json', 'machine-readable output')
    .action(async (image: string, options: { blocks: string } & JsonOption) => {
      const blocks = parseInteger(options.blocks, '--blocks');
      // Not through a link another user could point at any device or file.
      const real = fs.existsSync(image) ? await canonicalPath(image) : undefined;
      const st = fs.statSync(image, { throwIfNoEntry: false });
      let sizeBytes: number;
      const { mkfs, mkfsImage } = await import('../../fs/singlefilefs/mkfs.js');
      if (st?.isBlockDevice()) {
        // The operator's name, links resolved once: FileDevice opens only a real path.
        const { FileDevice } = await import('../../device/file-device.js');
        const device = await FileDevice.open(real!);
        try {
          await mkfs(device);
          sizeBytes = device.size;
        } finally {
          await device.close();
        }
      } else {
        await mkfsImage(image, blocks);
        sizeBytes = blocks * SFFS_BLOCK_SIZE;
      }
      const info = { image, sizeBytes, maxFileSizeBytes: maxFileSizeFor(sizeBytes) };
      print(options, info, `formatted ${image}: ${sizeBytes} bytes, max file size ${info.maxFileSizeBytes} bytes`);
    });

  withTargetOptions(sffs
    .command('write')
    .description('write text into the-file at an offset, with the driver\'s semantics (no holes)')
    .argument('<dev_name>', 'device (image file or block device) as registered with the daemon')
    .argument('<offset>', 'byte offset in the file; at most the current file size')
    .argument('<text>', 'text to write (UTF-8, written as given)'))
    .option('--json', 'machine-readable output')
    .action(async (devName: string, offset: string, text: string, options: TargetOptions & JsonOption) => {
      const offsetBytes = parseInteger(offset, 'offset');
      const data = Buffer.from(text, 'utf8');
      const result = await withFs(devName, options, false, async (sffsFile) => {
        const sizeBefore = sffsFile.size;
        if (offsetBytes > sffsFile.maxFileSize) {
          throw new BdsnapError('EINVAL', `offset ${offsetBytes} is past the max file size (${sffsFile.maxFileSize} bytes)`);
        }
        if (offsetBytes > sizeBefore && data.length > 0) {
          throw new BdsnapError('EINVAL', `offset ${offsetBytes} is past the end of the file (${sizeBefore} bytes): singlefilefs has no holes, nothing written`);
        }
        const writtenBytes = await sffsFile.write(offsetBytes, data);
        await sffsFile.flush();
        return { writtenBytes, sizeBytes: sffsFile.size };
      });
      if (result.writtenBytes < data.length) {
        throw new BdsnapError('ENOSPC', `only ${result.writtenBytes} of ${data.length} bytes written: the file reached its max size (${result.sizeBytes} bytes)`);
      }
      print(options, { offsetBytes, ...result }, `wrote ${result.writtenBytes} bytes at offset ${offsetBytes}; file size ${result.sizeBytes} bytes`);
    });

  withTargetOptions(sffs
    .command('cat')
    .description('print the content of the-file')
    .argument('<dev_name>', 'device (image file or block device) as registered with the daemon'))
    .action(async (devName: string, options: TargetOptions) => {
      const content = await withFs(devName, options, true, (sffsFile) => sffsFile.readAll());
      await new Promise<void>((resolve, reject) => process.stdout.write(content, (err) => (err ? reject(err) : resolve())));
    });

  withTargetOptions(sffs
    .command('stat')
    .description('show the file size and the max file size')
    .argument('<dev_name>', 'device (image file or block device) as registered with the daemon'))
    .option('--json', 'machine-readable output')
    .action(async (devName: string, options: TargetOptions & JsonOption) => {
      const info = await withFs(devName, options, true, async (sffsFile) => ({
        sizeBytes: sffsFile.size,
        maxFileSizeBytes: sffsFile.maxFileSize,
        deviceSizeBytes: sffsFile.device.size,
      }));
      print(options, info, `size ${info.sizeBytes} bytes, max size ${info.maxFileSizeBytes} bytes, device ${info.deviceSizeBytes} bytes`);
    });
}

function withTargetOptions(command: Command): Command {
  return command
    .option('--run-dir <dir>', `daemon run directory (default: $${RUN_DIR_ENV} or ${DEFAULT_RUN_DIR})`)
    .option('--socket <path>', 'connect to this NBD server socket instead of the daemon\'s')
    .option('--export <name>', 'NBD export name (default: the real path of dev_name)')
    .option('--image', 'work on the image file directly, without any server (offline)');
}

/** Open the target, run `fn` on the filesystem, and always close (disconnect) afterwards. */
async function withFs<T>(devName: string, options: TargetOptions, readOnly: boolean, fn: (sffsFile: SingleFileFs) => Promise<T>): Promise<T> {
  const device = await openTarget(devName, options, readOnly);
  try {
    return await fn(await SingleFileFs.open(device));
  } finally {
    await device.close();
  }
}

async function openTarget(devName: string, options: TargetOptions, readOnly: boolean): Promise<BlockDevice> {
  if (options.image) {
    if (options.socket || options.runDir || options.export) {
      throw new BdsnapError('EINVAL', '--image works on the file directly: it cannot be combined with --socket, --run-dir or --export');
    }
    const { FileDevice } = await import('../../device/file-device.js');
    return FileDevice.open(await canonicalPath(devName), { readOnly });
  }
  if (options.socket && options.runDir) throw new BdsnapError('EINVAL', 'give either --socket or --run-dir, not both');
  const runDir = resolveRunDir(options.runDir);
  const socketPath = options.socket ?? nbdSocketPath(runDir);
  const exportName = options.export ?? await canonicalPath(devName);
  if (!fs.existsSync(socketPath)) {
    throw new BdsnapError('ENOENT', options.socket
      ? `no NBD server socket at ${socketPath}`
      : `no daemon NBD socket at ${socketPath}: is the daemon running? (use --run-dir, ${RUN_DIR_ENV}, or --image for offline use)`);
  }
  // Register like `mount` does, so the daemon serves the export (a no-op for a known device).
  // Not with --socket or --export: that server is not necessarily bdsnap's daemon. Without a
  // control socket next to the NBD socket there is no daemon to ask, and the NBD server
  // itself decides what it serves.
  if (!options.socket && !options.export) {
    await withClient(runDir, (client) => client.register(exportName)).catch((err: unknown) => {
      if (!(err instanceof BdsnapError && err.code === 'ENOENT')) throw err;
    });
  }
  const { connectNbd } = await import('../../fs/singlefilefs/nbd.js');
  return connectNbd({ socketPath, exportName });
}

/** The device's name as the daemon knows it: its absolute real path. */
/** The real path of `devName`, not reached through a link another user could point anywhere. */
async function canonicalPath(devName: string): Promise<string> {
  let real: string;
  try {
    real = fs.realpathSync(devName);
  } catch (err) {
    throw new BdsnapError('ENOENT', `no such device: ${devName}`, { cause: err });
  }
  const { followedSafely } = await import('../../host/private-dir.js');
  return followedSafely(devName, real);
}

function parseInteger(text: string, what: string): number {
  const value = /^(0|[1-9]\d*)$/.test(text) ? Number(text) : /^0x[0-9a-f]+$/i.test(text) ? Number.parseInt(text.slice(2), 16) : NaN;
  if (!Number.isSafeInteger(value)) throw new BdsnapError('EINVAL', `${what} must be a non-negative integer, got '${text}'`);
  return value;
}

function print(options: JsonOption, value: object, line: string): void {
  process.stdout.write(options.json ? `${JSON.stringify(value)}\n` : `${line}\n`);
}
