/**
 * Where the built `bdsnap` command is, and a copy of it that another user can run.
 *
 * Tests that run the CLI as an unprivileged user (`nobody`) must not depend on where the
 * checkout lives: a checkout in a private home directory (mode 0700) cannot be read by that
 * user, who would then fail on loading the code instead of meeting the check under test. So
 * such tests run a copy of the built program and its runtime dependencies, placed in a fresh
 * world-readable temporary directory.
 */

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { cleanupOf } from './cleanup.js';
import type { AfterHook } from './files.js';

/** The project root (the directory holding package.json), from dist/testkit/. */
export const PROJECT_ROOT = fileURLToPath(new URL('../../', import.meta.url));
/** The built CLI entry point. */
export const BDSNAP_MAIN = fileURLToPath(new URL('../src/cli/main.js', import.meta.url));

/** Run a command as nobody:nogroup (prefix for spawn), with no supplementary groups. */
export const AS_NOBODY = ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups'] as const;

/** The runtime dependency closure of the project (package names), following the flat node_modules. */
function runtimePackages(): string[] {
  const seen = new Set<string>();
  const visit = (pkgJson: string): void => {
    const meta = JSON.parse(fs.readFileSync(pkgJson, 'utf8')) as { dependencies?: Record<string, string>; optionalDependencies?: Record<string, string> };
    for (const name of Object.keys({ ...meta.dependencies, ...meta.optionalDependencies })) {
      if (seen.has(name)) continue;
      const dir = path.join(PROJECT_ROOT, 'node_modules', name);
      if (!fs.existsSync(dir)) continue; // an optional dependency not installed on this platform
      seen.add(name);
      visit(path.join(dir, 'package.json'));
    }
  };
  visit(path.join(PROJECT_ROOT, 'package.json'));
  return [...seen].sort();
}

/**
 * Copy the built program (dist/src, package.json, runtime node_modules) into a new directory
 * every user can read and traverse; removed after the test. Returns the copy's CLI entry point.
 */
export function bdsnapForOtherUsers(t: AfterHook): string {
  const top = fs.mkdtempSync(path.join(os.tmpdir(), 'bdsnap-public-'));
  cleanupOf(t).after(() => fs.rmSync(top, { recursive: true, force: true }));
  fs.chmodSync(top, 0o755);
  fs.cpSync(path.join(PROJECT_ROOT, 'dist', 'src'), path.join(top, 'dist', 'src'), { recursive: true });
  fs.copyFileSync(path.join(PROJECT_ROOT, 'package.json'), path.join(top, 'package.json'));
  for (const name of runtimePackages()) {
    fs.cpSync(path.join(PROJECT_ROOT, 'node_modules', name), path.join(top, 'node_modules', name), { recursive: true, dereference: true });
  }
  // mkdtemp and umask may have left parts private: open everything for reading (no writing).
  const open = (p: string): void => {
    const st = fs.lstatSync(p);
    if (st.isSymbolicLink()) return;
    fs.chmodSync(p, st.isDirectory() || (st.mode & 0o100) !== 0 ? 0o755 : 0o644);
    if (st.isDirectory()) for (const e of fs.readdirSync(p)) open(path.join(p, e));
  };
  open(top);
  return path.join(top, 'dist', 'src', 'cli', 'main.js');
}
