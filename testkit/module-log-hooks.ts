/**
 * Module loader hooks (run on Node's hooks thread) that append the URL of every module loaded
 * to the file named by MODULE_LOG, one a line. Registered by ./module-log.ts.
 */

import fs from 'node:fs';

type NextLoad = (url: string, context: unknown) => Promise<unknown>;

export async function load(url: string, context: unknown, nextLoad: NextLoad): Promise<unknown> {
  const logFile = process.env.MODULE_LOG;
  if (logFile !== undefined) fs.appendFileSync(logFile, `${url}\n`);
  return nextLoad(url, context);
}
