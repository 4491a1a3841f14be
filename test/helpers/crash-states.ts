/**
 * The states a power loss may leave, built from a recording (crash-recorder.ts), after ALICE
 * (OSDI 2014), with no custom kernel:
 *
 * - A crash after the first k recorded steps. For each file, what its last completed
 *   fsync/fdatasync covered is kept; of its writes and truncates since, a prefix is kept, the
 *   last one of that prefix possibly torn (only some of its 4 KiB pages), or all of them but one
 *   (writes between two syncs reordered).
 * - For each directory, its names as of its last completed fsync are kept; of its operations
 *   since (files created, directories made, renames into it, unlinks, trees removed) a prefix.
 *   A file's fsync does not make its name durable; only its directory's does.
 *
 * For each crash point every single deviation from "everything issued was kept" is built, and
 * some seeded random mixes of deviations across files; states are deduplicated by content, and
 * when there are more than asked for, a seeded sample is taken. Everything is deterministic
 * for a seed.
 */

import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { Recording, TraceEntry } from './crash-recorder.js';

const PAGE_BYTES = 4096;

/** What one file keeps of its steps since its last sync. */
type FileChoice =
  | { kind: 'prefix'; n: number }
  /** The first n - 1 whole, and of step n - 1 only the pages listed (indexes of its pages). */
  | { kind: 'torn'; n: number; pages: number[] }
  /** All but step `skip`. */
  | { kind: 'hole'; skip: number };

export interface CrashState {
  /** Steps issued before the crash. */
  point: number;
  /** The latest mark before the crash ('' when none): where in the workload it happened. */
  mark: string;
  /** How the state differs from "everything issued kept", for messages. */
  what: string;
  /** Path -> content (files) or null (directories). */
  tree: Map<string, Buffer | null>;
}

export interface Exploration {
  /** Distinct states built. */
  built: number;
  /** States returned (all of them, or the sample). */
  states: CrashState[];
}

/** mulberry32: small, seeded, deterministic. */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

type DirOp = Extract<TraceEntry, { k: 'create' | 'mkdir' | 'rename' | 'unlink' | 'rmtree' }>;

function dirOf(e: DirOp): string {
  return path.dirname(e.k === 'rename' ? e.to : e.path);
}

function isDirOp(e: TraceEntry): e is DirOp {
  return e.k === 'create' || e.k === 'mkdir' || e.k === 'rename' || e.k === 'unlink' || e.k === 'rmtree';
}

/** The pages (4 KiB of the file) a write touches, as [start, end) byte ranges of its data. */
function pagesOf(e: Extract<TraceEntry, { k: 'write' }>): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  let at = 0;
  while (at < e.data.length) {
    const fileAt = e.position + at;
    const next = Math.min(e.data.length, at + (PAGE_BYTES - (fileAt % PAGE_BYTES)));
    out.push([at, next]);
    at = next;
  }
  return out;
}

class FileContent {
  buf: Buffer;
  constructor(initial: Buffer) {
    this.buf = Buffer.from(initial);
  }

  write(position: number, data: Buffer): void {
    const end = position + data.length;
    if (end > this.buf.length) {
      const grown = Buffer.alloc(end);
      this.buf.copy(grown);
      this.buf = grown;
    }
    data.copy(this.buf, position);
  }

  truncate(lengthBytes: number): void {
    if (lengthBytes <= this.buf.length) this.buf = this.buf.subarray(0, lengthBytes);
    else {
      const grown = Buffer.alloc(lengthBytes);
      this.buf.copy(grown);
      this.buf = grown;
    }
  }
}

type ContentStep = Extract<TraceEntry, { k: 'write' | 'truncate' }>;

function apply(c: FileContent, step: ContentStep, pages?: number[]): void {
  if (step.k === 'truncate') {
    c.truncate(step.lengthBytes);
    return;
  }
  if (pages === undefined) {
    c.write(step.position, step.data);
    return;
  }
  const all = pagesOf(step);
  for (const i of pages) {
    const [a, b] = all[i]!;
    c.write(step.position + a, step.data.subarray(a, b));
  }
}

/** What is certain and what is not at crash point k. */
interface Point {
  k: number;
  /** Per file: its steps up to its last sync, and those after. */
  files: Map<number, { certain: ContentStep[]; open: ContentStep[] }>;
  /** Per directory: its operations, and how many of the first are certain. */
  dirs: Map<string, { ops: DirOp[]; certain: number }>;
}

function pointAt(rec: Recording, k: number): Point {
  const files = new Map<number, { certain: ContentStep[]; open: ContentStep[] }>();
  const dirs = new Map<string, { ops: DirOp[]; certain: number }>();
  for (const f of rec.initial.files) files.set(f.id, { certain: [], open: [] });
  for (let i = 0; i < k; i++) {
    const e = rec.entries[i]!;
    if (e.k === 'write' || e.k === 'truncate') {
      let f = files.get(e.id);
      if (f === undefined) files.set(e.id, f = { certain: [], open: [] });
      f.open.push(e);
    } else if (e.k === 'fsync') {
      const f = files.get(e.id);
      if (f) {
        f.certain.push(...f.open);
        f.open = [];
      }
    } else if (e.k === 'dsync') {
      const d = dirs.get(e.dir);
      if (d) d.certain = d.ops.length;
    } else if (isDirOp(e)) {
      if (e.k === 'create' && !files.has(e.id)) files.set(e.id, { certain: [], open: [] });
      const dir = dirOf(e);
      let d = dirs.get(dir);
      if (d === undefined) dirs.set(dir, d = { ops: [], certain: 0 });
      d.ops.push(e);
    }
  }
  return { k, files, dirs };
}

interface Choices {
  files: Map<number, FileChoice>;
  /** Per directory, how many of its operations are kept (default: all). */
  dirs: Map<string, number>;
}

/** Every way one file may deviate from keeping all its open steps. */
function fileDeviations(open: ContentStep[], maxPerFile: number): FileChoice[] {
  const out: FileChoice[] = [];
  for (let n = 0; n < open.length; n++) out.push({ kind: 'prefix', n });
  for (let n = 1; n <= open.length; n++) {
    const step = open[n - 1]!;
    if (step.k !== 'write') continue;
    const pages = pagesOf(step).length;
    // Torn: a prefix of its pages, or all but the first (pages reach the disk in any order).
    for (let t = 1; t < pages; t++) out.push({ kind: 'torn', n, pages: [...Array(t).keys()] });
    if (pages > 1) out.push({ kind: 'torn', n, pages: [...Array(pages).keys()].slice(1) });
  }
  for (let skip = 0; skip < open.length - 1; skip++) out.push({ kind: 'hole', skip });
  if (out.length <= maxPerFile) return out;
  // Keep the short prefixes and the ends; thin the middle evenly.
  const step = out.length / maxPerFile;
  return Array.from({ length: maxPerFile }, (_, i) => out[Math.floor(i * step)]!);
}

function build(rec: Recording, p: Point, choices: Choices): Map<string, Buffer | null> {
  // Names first: which path is which file (or directory).
  const names = new Map<string, number | null>();
  for (const d of rec.initial.dirs) names.set(d, null);
  for (const f of rec.initial.files) names.set(f.path, f.id);
  const kept = new Set<DirOp>();
  for (const [dir, d] of p.dirs) {
    const n = Math.max(d.certain, choices.dirs.get(dir) ?? d.ops.length);
    for (const op of d.ops.slice(0, n)) kept.add(op);
  }
  const parentThere = (q: string): boolean => names.get(path.dirname(q)) === null;
  const below = (q: string): string[] => [...names.keys()].filter((n) => n === q || n.startsWith(`${q}/`));
  for (let i = 0; i < p.k; i++) {
    const e = rec.entries[i]!;
    if (!isDirOp(e) || !kept.has(e)) continue;
    switch (e.k) {
      case 'create':
        if (parentThere(e.path)) names.set(e.path, e.id);
        break;
      case 'mkdir':
        if (parentThere(e.path)) names.set(e.path, null);
        break;
      case 'rename': {
        if (!names.has(e.from) || !parentThere(e.to)) break;
        for (const q of below(e.to)) names.delete(q);
        for (const q of below(e.from)) {
          const v = names.get(q)!;
          names.delete(q);
          names.set(e.to + q.slice(e.from.length), v);
        }
        break;
      }
      case 'unlink':
        names.delete(e.path);
        break;
      case 'rmtree':
        for (const q of below(e.path)) names.delete(q);
        break;
    }
  }
  // Then the content of each file still named.
  const initial = new Map(rec.initial.files.map((f) => [f.id, f.content]));
  const contents = new Map<number, Buffer>();
  const contentOf = (id: number): Buffer => {
    const known = contents.get(id);
    if (known) return known;
    const c = new FileContent(initial.get(id) ?? Buffer.alloc(0));
    const f = p.files.get(id);
    if (f) {
      for (const s of f.certain) apply(c, s);
      const choice = choices.files.get(id) ?? { kind: 'prefix', n: f.open.length };
      if (choice.kind === 'prefix') for (const s of f.open.slice(0, choice.n)) apply(c, s);
      else if (choice.kind === 'torn') {
        for (const s of f.open.slice(0, choice.n - 1)) apply(c, s);
        apply(c, f.open[choice.n - 1]!, choice.pages);
      } else f.open.forEach((s, i) => { if (i !== choice.skip) apply(c, s); });
    }
    contents.set(id, c.buf);
    return c.buf;
  };
  const tree = new Map<string, Buffer | null>();
  for (const [q, id] of [...names].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) tree.set(q, id === null ? null : contentOf(id));
  return tree;
}

function digest(tree: Map<string, Buffer | null>): string {
  const h = createHash('sha256');
  for (const [q, c] of tree) {
    h.update(q);
    h.update(c === null ? '/' : `:${c.length}:`);
    if (c) h.update(c);
  }
  return h.digest('hex');
}

function describe(choices: Choices): string {
  const parts: string[] = [];
  for (const [id, c] of choices.files) {
    parts.push(c.kind === 'prefix' ? `file#${id} keeps ${c.n} unsynced steps` : c.kind === 'torn' ? `file#${id} step ${c.n} torn to pages [${c.pages.join(',')}]` : `file#${id} loses unsynced step ${c.skip}`);
  }
  for (const [dir, n] of choices.dirs) parts.push(`${path.basename(dir)}/ keeps ${n} name ops`);
  return parts.length === 0 ? 'all issued steps kept' : parts.join('; ');
}

export interface ExploreOptions {
  /** Return at most this many states (a seeded sample of the distinct ones). */
  maxStates: number;
  seed: number;
  /** Random mixes of deviations per crash point. */
  mixesPerPoint?: number;
  /** Deviations of one file considered per crash point. */
  maxPerFile?: number;
  /** Only crash points whose latest mark passes (default: all). */
  pointFilter?: (mark: string) => boolean;
}

/** Build the distinct crash states of a recording (see the header). */
export function exploreCrashStates(rec: Recording, options: ExploreOptions): Exploration {
  const random = seededRandom(options.seed);
  const mixes = options.mixesPerPoint ?? 8;
  const maxPerFile = options.maxPerFile ?? 64;
  const seen = new Map<string, CrashState>();
  let mark = '';
  for (let k = 0; k <= rec.entries.length; k++) {
    const before = rec.entries[k - 1];
    if (before?.k === 'mark') mark = before.label;
    if (options.pointFilter && !options.pointFilter(mark)) continue;
    // Only points right after a step that changes something (or a sync) are new.
    if (k > 0 && before?.k === 'mark') continue;
    const p = pointAt(rec, k);
    const add = (choices: Choices): void => {
      const tree = build(rec, p, choices);
      const key = digest(tree);
      if (!seen.has(key)) seen.set(key, { point: k, mark, what: `crash after step ${k} (${mark || 'start'}): ${describe(choices)}`, tree });
    };
    add({ files: new Map(), dirs: new Map() });
    const perFile = new Map<number, FileChoice[]>();
    for (const [id, f] of p.files) {
      if (f.open.length === 0) continue;
      const devs = fileDeviations(f.open, maxPerFile);
      perFile.set(id, devs);
      for (const c of devs) add({ files: new Map([[id, c]]), dirs: new Map() });
    }
    const perDir = new Map<string, number[]>();
    for (const [dir, d] of p.dirs) {
      const ns: number[] = [];
      for (let n = d.certain; n < d.ops.length; n++) ns.push(n);
      if (ns.length === 0) continue;
      perDir.set(dir, ns);
      for (const n of ns) add({ files: new Map(), dirs: new Map([[dir, n]]) });
    }
    for (let m = 0; m < mixes && (perFile.size + perDir.size) > 1; m++) {
      const choices: Choices = { files: new Map(), dirs: new Map() };
      for (const [id, devs] of perFile) if (random() < 0.5) choices.files.set(id, devs[Math.floor(random() * devs.length)]!);
      for (const [dir, ns] of perDir) if (random() < 0.5) choices.dirs.set(dir, ns[Math.floor(random() * ns.length)]!);
      add(choices);
    }
  }
  const all = [...seen.values()];
  if (all.length <= options.maxStates) return { built: all.length, states: all };
  // Fisher-Yates with the seeded generator, then back into recording order.
  for (let i = all.length - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [all[i], all[j]] = [all[j]!, all[i]!];
  }
  return { built: all.length, states: all.slice(0, options.maxStates).sort((a, b) => a.point - b.point) };
}

/**
 * Put `state` on disk under the recording's roots: everything there is removed and made
 * again, except the files of `inPlace` (a device image, whose identity is its inode), which
 * are rewritten where they are.
 */
export function materialize(rec: Recording, state: CrashState, inPlace: readonly string[]): void {
  for (const root of rec.roots) {
    for (const name of fs.readdirSync(root)) {
      const p = path.join(root, name);
      if (inPlace.includes(p)) continue;
      fs.rmSync(p, { recursive: true, force: true });
    }
  }
  for (const [p, content] of state.tree) {
    if (rec.roots.includes(p)) continue;
    if (content === null) fs.mkdirSync(p, { mode: 0o700 });
    else if (inPlace.includes(p)) {
      const fd = fs.openSync(p, 'r+');
      try {
        fs.writeSync(fd, content, 0, content.length, 0);
        fs.ftruncateSync(fd, content.length);
      } finally {
        fs.closeSync(fd);
      }
    } else fs.writeFileSync(p, content, { mode: 0o600 });
  }
  for (const p of inPlace) if (!state.tree.has(p)) fs.rmSync(p, { force: true });
}

/**
 * Trace-level check of the flushes answered: every write to `file` before a mark that
 * `isFlushAck` accepts is covered by a completed sync of that file before the mark. Returns
 * the marks that are not.
 */
export function unsyncedAtFlushAcks(rec: Recording, fileId: number, isFlushAck: (label: string) => boolean): string[] {
  const bad: string[] = [];
  let dirty = false;
  for (const e of rec.entries) {
    if ((e.k === 'write' || e.k === 'truncate') && e.id === fileId) dirty = true;
    else if (e.k === 'fsync' && e.id === fileId) dirty = false;
    else if (e.k === 'mark' && isFlushAck(e.label) && dirty) bad.push(e.label);
  }
  return bad;
}

/**
 * Name operations issued before step `k` that a power loss could still undo there (their
 * directory not synced since): each as "op path".
 */
export function namesNotDurableAt(rec: Recording, k: number): string[] {
  const out: string[] = [];
  for (const d of pointAt(rec, k).dirs.values()) {
    for (const op of d.ops.slice(d.certain)) out.push(`${op.k} ${op.k === 'rename' ? `${op.from} -> ${op.to}` : op.path}`);
  }
  return out;
}
