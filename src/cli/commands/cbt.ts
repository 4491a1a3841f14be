/**
 * `bdsnap cbt info|map|mark-dirty|reset`: the change map of a device, for incremental
 * backups. `map --since N` lists the byte ranges changed since snapshot number N of the
 * current generation, as text, JSON, a picture in the terminal, or an SVG file.
 */

import fs from 'node:fs';
import type { Command } from 'commander';
import type { ByteRange } from '../../bytes.js';
import { BdsnapError } from '../../errors.js';
import { withClient } from '../../service/client.js';
import type { CbtInfo } from '../../service/control-protocol.js';
import { renderChangePicture, renderChangeSvg } from '../cbt-picture.js';
import { formatBytes, sizeValue } from '../../units.js';
import { clientOptions, printResult, type ClientOptions } from './client-options.js';
import { openOutputFile } from '../../host/output-file.js';

function describeInfo(info: CbtInfo): string {
  return [
    `${info.device}: ${formatBytes(info.deviceSizeBytes)} in ${info.blocks} tracking blocks of ${formatBytes(info.blockSize)}`,
    `generation ${info.generation}, current number ${info.number} (${info.number - 1} snapshot(s) taken in this generation)`,
  ].join('\n') + '\n';
}

/** "offset:length" with sizes like 4096, 64K, 1M. */
function parseRange(text: string): ByteRange {
  const [offset, length, extra] = text.split(':');
  const offsetBytes = offset === undefined ? NaN : sizeValue(offset);
  const lengthBytes = length === undefined ? NaN : sizeValue(length);
  if (extra !== undefined || !Number.isSafeInteger(offsetBytes) || !(lengthBytes > 0)) {
    throw new BdsnapError('EINVAL', `bad range "${text}": expected OFFSET:LENGTH such as 0:64K or 1048576:4096`);
  }
  return { offsetBytes, lengthBytes };
}

/** `--since N`, or `--since GENERATION:N` (as `snapshot create --json` gives an image's cbt point). */
function parseSince(text: string): { generation?: string; number: number } {
  const m = /^(?:([0-9a-f]{8}):)?(\d+)$/.exec(text);
  const n = Number(m?.[2]);
  if (!m || !Number.isSafeInteger(n)) {
    throw new BdsnapError('EINVAL', `bad --since "${text}": expected a snapshot number (0 or more), or GENERATION:NUMBER such as 3fa2c1d0:2`);
  }
  return { ...(m[1] !== undefined ? { generation: m[1] } : {}), number: n };
}

export function register(program: Command): void {
  const cbt = program.command('cbt').description('change-block tracking: which blocks changed since a snapshot');

  clientOptions(cbt
    .command('info <dev_name>')
    .description('tracking block size, block count, generation id and current number'))
    .action(async (device: string, options: ClientOptions) => {
      const info = await withClient(options.runDir, (c) => c.cbtInfo(device));
      printResult(options, info, describeInfo);
    });

  clientOptions(cbt
    .command('map <dev_name>')
    .description('byte ranges changed since snapshot number N')
    .option('--since <n>', 'snapshot number (see snapshot info / cbt info), or GENERATION:NUMBER, refused once that generation has ended; 0 = all changes this generation saw', '0')
    .option('--picture', 'draw where the changes are, as a grid in the terminal')
    .option('--svg <file>', 'write the same picture as an SVG file'))
    .action(async (device: string, options: ClientOptions & { since: string; picture?: boolean; svg?: string }) => {
      const { generation, number: since } = parseSince(options.since);
      const map = await withClient(options.runDir, (c) => c.cbtMap(device, since));
      if (generation !== undefined && generation !== map.generation) {
        // Numbers compare only within one generation: an answer from another would under-report.
        throw new BdsnapError('EINVAL', `generation ${generation} of ${map.device} has ended (its change map started again: now generation ${map.generation}; bdsnap events says why), so nothing tells what changed since #${since} of it: read the device whole (a backup does so by itself)`);
      }
      if (options.svg !== undefined) {
        // Root writes here: never through a planted symlink or into another user's file.
        const out = await openOutputFile(options.svg, 0o644);
        try {
          fs.writeSync(out.fd, renderChangeSvg(map.ranges, map.deviceSizeBytes, { blockSize: map.blockSize, title: `${map.device} — changed since #${since} (generation ${map.generation})` }));
        } catch (err) {
          await out.discard();
          throw err;
        }
        await out.close();
      }
      if (options.json) {
        process.stdout.write(`${JSON.stringify(map)}\n`);
      } else if (options.picture) {
        const picture = renderChangePicture(map.ranges, map.deviceSizeBytes, {
          blockSize: map.blockSize,
          title: `${map.device}: changed since #${since} (generation ${map.generation})`,
          color: process.stdout.isTTY === true && !process.env.NO_COLOR,
          columns: Math.max(16, Math.min(128, (process.stdout.columns ?? 80) - 12)),
        });
        process.stdout.write(picture.endsWith('\n') ? picture : `${picture}\n`);
      } else if (options.svg === undefined) {
        const changed = map.ranges.reduce((sum, r) => sum + r.lengthBytes, 0);
        const lines = map.ranges.map((r) => `${r.offsetBytes}:${r.lengthBytes}`);
        process.stdout.write(`${[...lines, `# ${map.ranges.length} range(s), ${formatBytes(changed)} changed since #${since} of generation ${map.generation}`].join('\n')}\n`);
      }
    });

  clientOptions(cbt
    .command('mark-dirty <dev_name> <range...>')
    .description('mark ranges (OFFSET:LENGTH) as changed, so the next incremental backup reads them'))
    .action(async (device: string, ranges: string[], options: ClientOptions) => {
      const parsed = ranges.map(parseRange);
      const info = await withClient(options.runDir, (c) => c.cbtMarkDirty(device, parsed));
      printResult(options, info, (i) => `marked ${parsed.length} range(s) of ${i.device} as changed\n`);
    });

  clientOptions(cbt
    .command('reset <dev_name>')
    .description('start a new generation: the next backup of the device will be full'))
    .action(async (device: string, options: ClientOptions) => {
      const info = await withClient(options.runDir, (c) => c.cbtReset(device));
      printResult(options, info, (i) => `change map of ${i.device} reset: new generation ${i.generation}\n`);
    });
}
