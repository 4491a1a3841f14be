/**
 * The one skip policy of the suite. A test that needs root, a tool or a device node calls
 * `needs(t, {...})` first thing and returns when it answers false:
 *
 * - under CI (`CI=true`) a missing need fails the test, with the reason and the package to
 *   install: a CI machine that lacks a tool is broken, and a skipped test there hides it;
 * - elsewhere (a developer's machine) the test is skipped with the same reason.
 */

import fs from 'node:fs';
import { findOnPath, nbdshWorks, toolPackage } from './process.js';

export interface Needs {
  /** Loop devices, mounts, another user. */
  root?: boolean;
  /** Programs that must be on PATH (nbdsh must also start). */
  tools?: string[];
  /** Paths that must exist, such as /dev/fuse. */
  paths?: string[];
}

/** The part of node:test's TestContext the policy uses. */
export interface SkippableContext {
  skip(message?: string): void;
}

/** True when the suite runs under CI, where nothing may be skipped. */
export function underCi(): boolean {
  return process.env.CI === 'true' || process.env.CI === '1';
}

/** What is missing for `want`, one reason per item; empty when the test can run. */
export function missingNeeds(want: Needs): string[] {
  const missing: string[] = [];
  if (want.root === true && process.getuid?.() !== 0) missing.push('root');
  for (const tool of want.tools ?? []) {
    const pkg = toolPackage(tool);
    if (findOnPath(tool) === undefined) missing.push(`the tool '${tool}'${pkg ? ` (Debian package ${pkg})` : ''}`);
    else if (tool === 'nbdsh' && !nbdshWorks()) missing.push(`a working nbdsh (python3-libnbd for the python3 on PATH)`);
  }
  for (const p of want.paths ?? []) if (!fs.existsSync(p)) missing.push(p);
  return missing;
}

/**
 * Whether the test can run. Under CI a missing need throws (the test fails); elsewhere the
 * test is marked skipped with the reason and this returns false.
 */
export function needs(t: SkippableContext, want: Needs): boolean {
  const missing = missingNeeds(want);
  if (missing.length === 0) return true;
  const reason = `needs ${missing.join(', ')}`;
  if (underCi()) throw new Error(`${reason}: under CI (CI=true) a missing requirement fails the test; install it`);
  t.skip(reason);
  return false;
}
