/**
 * `npm run bench`: every bench in turn (engine, snapshots, backups, instant restore,
 * replication), each with its own defaults. Options belong to one bench, so they are refused
 * here with the script that takes them, instead of reaching only the last bench of the chain.
 */

import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const BENCHES: ReadonlyArray<{ file: string; script: string }> = [
  { file: 'run.js', script: 'bench:engine' },
  { file: 'snapshots.js', script: 'bench:snapshots' },
  { file: 'backup.js', script: 'bench:backup' },
  { file: 'instant-restore.js', script: 'bench:instant' },
  { file: 'replica.js', script: 'bench:replica' },
];

function main(args: readonly string[]): number {
  if (args.length > 0) {
    const scripts = BENCHES.map((bench) => `npm run ${bench.script} -- ${args.join(' ')}`);
    process.stderr.write(
      `npm run bench runs every bench with its defaults and takes no options; give them to one bench:\n  ${scripts.join('\n  ')}\n`,
    );
    return 2;
  }
  const here = path.dirname(fileURLToPath(import.meta.url));
  for (const bench of BENCHES) {
    const result = spawnSync(process.execPath, [path.join(here, bench.file)], { stdio: 'inherit' });
    if (result.status !== 0) {
      process.stderr.write(`bench ${bench.file} failed (${result.signal ?? `exit ${result.status}`}); the benches after it did not run\n`);
      return 1;
    }
  }
  return 0;
}

process.exitCode = main(process.argv.slice(2));
