/**
 * The import graph read from the TypeScript sources, not dist/, where type-only imports are
 * gone: a type-only import ties two modules' meanings together just as a value import does.
 */

import fs from 'node:fs';
import path from 'node:path';
import ts from 'typescript';

/** Every TypeScript source file under `dir`. */
export function sourceFiles(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) return sourceFiles(p);
    return e.name.endsWith('.ts') && !e.name.endsWith('.d.ts') ? [p] : [];
  });
}

/** The files of ours that `file` imports or re-exports (static and dynamic, type-only too). */
export function importsOf(file: string): string[] {
  const info = ts.preProcessFile(fs.readFileSync(file, 'utf8'), true, true);
  return info.importedFiles
    .map((f) => f.fileName)
    .filter((name) => name.startsWith('.'))
    .map((name) => path.resolve(path.dirname(file), name.replace(/\.js$/, '.ts')))
    .filter((p) => fs.existsSync(p));
}
