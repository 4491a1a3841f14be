/**
 * JSON that bdsnap wrote and reads back (manifests, journals, the registry, records): parsed,
 * then checked against a zod schema before anything trusts it. What does not parse or does not
 * match is damaged (ECORRUPT), never taken for empty or for "nothing happened". Beside
 * errors.ts so that every layer reads its files the same way.
 */

import fs from 'node:fs';
import type { z } from 'zod';
import { BdsnapError } from './errors.js';

/** Why a value does not match: the path of the first issue and its message. */
export function firstIssue(error: z.ZodError): string {
  const first = error.issues[0];
  return first ? `${first.path.join('.') || '(root)'}: ${first.message}` : 'unknown problem';
}

/**
 * `text` as JSON checked by `schema`. Otherwise ECORRUPT with the message `describe(problem)`,
 * where `problem` is "not valid JSON (<parser's words>)" or "<path>: <schema's words>".
 */
export function parseJson<S extends z.ZodType>(text: string | Buffer, schema: S, describe: (problem: string) => string): z.output<S> {
  let value: unknown;
  try {
    value = JSON.parse(typeof text === 'string' ? text : text.toString('utf8'));
  } catch (err) {
    throw new BdsnapError('ECORRUPT', describe(`not valid JSON (${(err as Error).message})`), { cause: err });
  }
  const parsed = schema.safeParse(value);
  if (!parsed.success) throw new BdsnapError('ECORRUPT', describe(firstIssue(parsed.error)));
  return parsed.data;
}

/** parseJson, or undefined where it would throw: for a value that is only a hint. */
export function tryParseJson<S extends z.ZodType>(text: string | Buffer, schema: S): z.output<S> | undefined {
  try {
    return parseJson(text, schema, (problem) => problem);
  } catch {
    return undefined;
  }
}

/**
 * The JSON file at `file` checked by `schema` (see parseJson), or undefined when there is no
 * such file. Errors: ECORRUPT; EIO when it cannot be read.
 */
export async function readJsonFile<S extends z.ZodType>(file: string, schema: S, describe: (problem: string) => string): Promise<z.output<S> | undefined> {
  let text: string;
  try {
    text = await fs.promises.readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new BdsnapError('EIO', `cannot read ${file}: ${(err as Error).message}`, { cause: err });
  }
  return parseJson(text, schema, describe);
}
