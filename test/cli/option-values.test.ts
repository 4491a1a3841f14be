import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { BDSNAP_MAIN } from '../../testkit/bdsnap-cli.js';

function bdsnap(cwd: string, args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [BDSNAP_MAIN, ...args], { cwd, encoding: 'utf8', timeout: 30_000, env: { ...process.env, BDSNAP_REPO_PASSWORD: '' } });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

test('an option value outside its list or not a size is one EINVAL line naming the option, before anything starts', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-options-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const runDir = path.join(dir, 'run');
  const cases: Array<[string[], RegExp]> = [
    [['daemon', '--run-dir', runDir, '--log-level', 'loud'], /^bdsnap: bad --log-level "loud": expected trace, debug, info, warn, error or fatal\n$/],
    [['daemon', '--run-dir', runDir, '--durability', 'sometimes'], /^bdsnap: bad --durability "sometimes": expected process or strict\n$/],
    [['daemon', '--run-dir', runDir, '--restore-rate', '0'], /^bdsnap: bad --restore-rate "0": expected a positive size/],
    [['daemon', '--run-dir', runDir, '--chunk-size', '6K'], /^bdsnap: bad --chunk-size: chunk size must be a power of two/],
    [['backup', 'init', '--repo', path.join(dir, 'repo'), '--codec', 'gzip'], /^bdsnap: bad --codec "gzip": expected zstd, brotli, deflate or lz4\n$/],
    [['backup', 'init', '--repo', path.join(dir, 'repo'), '--piece-size', 'big'], /^bdsnap: bad --piece-size "big": expected a positive size/],
    [['snapshot', 'create', '/dev/null', '--run-dir', runDir, '--limit', '1Q'], /^bdsnap: bad --limit "1Q": expected a positive size/],
  ];
  for (const [args, message] of cases) {
    const r = bdsnap(dir, args);
    assert.equal(r.status, 1, `${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, message);
  }
  assert.deepEqual(fs.readdirSync(dir), [], 'nothing was created');
});

test('--help lists the values an option takes', () => {
  const help = bdsnap(os.tmpdir(), ['daemon', '--help']).stdout.replace(/\s+/g, ' ');
  assert.match(help, /--log-level <level> .*\(choices: "trace", "debug", "info", "warn", "error", "fatal", default: "info"\)/);
  assert.match(help, /--durability <mode> .*\(choices: "process", "strict", default: "process"\)/);
  const init = bdsnap(os.tmpdir(), ['backup', 'init', '--help']).stdout.replace(/\s+/g, ' ');
  assert.match(init, /--codec <codec> .*\(choices: "zstd", "brotli", "deflate", "lz4"\)/);
});
