/**
 * Records, through the hook of src/host/fs-trace.ts, what a workload does to the files under
 * some directories: the input of the crash explorer (crash-states.ts), after ALICE (OSDI 2014).
 *
 * Files are known by a number of the recorder's own, given when the recording starts (every
 * file already there) or when an open creates one, so an inode number the kernel reuses is
 * never taken for the file it belonged to. Paths are real paths (a /proc/self/fd/N/name path
 * of a confined tree is resolved to the directory it names).
 */

import fs from 'node:fs';
import path from 'node:path';
import { setFsTrace, type FsTraceOp, type FsTraceSink } from '../../src/host/fs-trace.js';

/** One recorded step, in the order the calls returned. */
export type TraceEntry =
  | { k: 'write'; id: number; position: number; data: Buffer }
  | { k: 'truncate'; id: number; lengthBytes: number }
  /** fsync/fdatasync of a file returned: its data and size are durable. */
  | { k: 'fsync'; id: number }
  /** fsync of a directory returned: the names in it are durable. */
  | { k: 'dsync'; dir: string }
  | { k: 'create'; path: string; id: number }
  | { k: 'mkdir'; path: string }
  | { k: 'rename'; from: string; to: string }
  | { k: 'unlink'; path: string }
  | { k: 'rmtree'; path: string }
  | { k: 'mark'; label: string };

/** The tree when recording began, taken as durable. */
export interface InitialTree {
  dirs: string[];
  files: Array<{ path: string; id: number; content: Buffer }>;
}

export interface Recording {
  roots: string[];
  initial: InitialTree;
  entries: TraceEntry[];
}

export class CrashRecorder implements FsTraceSink {
  readonly roots: string[];
  readonly initial: InitialTree = { dirs: [], files: [] };
  readonly entries: TraceEntry[] = [];
  /** `dev:ino` -> the recorder's number of the file. */
  readonly #ids = new Map<string, number>();
  #nextId = 1;
  #previous: FsTraceSink | undefined;
  #recording = false;
  /** Ops the recorder could not place (a write to a file it never saw created): a gap in the recording. */
  readonly unknown: string[] = [];

  constructor(roots: string[]) {
    this.roots = roots.map((r) => fs.realpathSync(r));
  }

  /** Take the tree as it is (everything in it counts as durable) and start recording. */
  start(): void {
    for (const root of this.roots) this.#walk(root);
    this.#previous = setFsTrace(this);
    this.#recording = true;
  }

  stop(): Recording {
    if (this.#recording) setFsTrace(this.#previous);
    this.#recording = false;
    return { roots: this.roots, initial: this.initial, entries: this.entries };
  }

  mark(label: string): void {
    this.entries.push({ k: 'mark', label });
  }

  #walk(dir: string): void {
    this.initial.dirs.push(dir);
    for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) this.#walk(p);
      else if (e.isFile()) {
        const st = fs.statSync(p);
        const id = this.#nextId++;
        this.#ids.set(`${st.dev}:${st.ino}`, id);
        this.initial.files.push({ path: p, id, content: fs.readFileSync(p) });
      }
    }
  }

  #inside(p: string): boolean {
    return this.roots.some((r) => p === r || p.startsWith(`${r}/`));
  }

  /** A path with its directory resolved (the name itself may be gone, or not yet there). */
  #real(p: string): string {
    try {
      return path.join(fs.realpathSync(path.dirname(p)), path.basename(p));
    } catch {
      return path.resolve(p);
    }
  }

  /** The file of `fd`: its number, or a directory's path; undefined when outside the roots. */
  #ofFd(fd: number): { id: number } | { dir: string } | undefined {
    let st: fs.Stats;
    try {
      st = fs.fstatSync(fd);
    } catch {
      return undefined;
    }
    if (st.isDirectory()) {
      const dir = fs.readlinkSync(`/proc/self/fd/${fd}`);
      return this.#inside(dir) ? { dir } : undefined;
    }
    const id = this.#ids.get(`${st.dev}:${st.ino}`);
    if (id !== undefined) return { id };
    let where = '?';
    try {
      where = fs.readlinkSync(`/proc/self/fd/${fd}`);
    } catch {
      // Reported by number.
    }
    if (this.#inside(where)) this.unknown.push(`fd ${fd} (${where})`);
    return undefined;
  }

  record(op: FsTraceOp): void {
    switch (op.op) {
      case 'write':
      case 'truncate':
      case 'sync':
      case 'clone': {
        const f = this.#ofFd(op.fd);
        if (f === undefined) return;
        if ('dir' in f) {
          if (op.op === 'sync') this.entries.push({ k: 'dsync', dir: f.dir });
          return;
        }
        if (op.op === 'write') this.entries.push({ k: 'write', id: f.id, position: op.position, data: Buffer.concat(op.buffers as Buffer[]).subarray(0, op.bytes) });
        else if (op.op === 'truncate') this.entries.push({ k: 'truncate', id: f.id, lengthBytes: op.lengthBytes });
        else if (op.op === 'sync') this.entries.push({ k: 'fsync', id: f.id });
        else {
          // A reflink is, for what a crash can keep, a write of the source's bytes.
          const data = Buffer.alloc(op.lengthBytes);
          fs.readSync(op.srcFd, data, 0, op.lengthBytes, op.srcPosition);
          this.entries.push({ k: 'write', id: f.id, position: op.position, data });
        }
        return;
      }
      case 'open': {
        if (!op.created) return;
        const p = this.#real(op.path);
        if (!this.#inside(p)) return;
        const st = fs.fstatSync(op.fd);
        const id = this.#nextId++;
        this.#ids.set(`${st.dev}:${st.ino}`, id);
        this.entries.push({ k: 'create', path: p, id });
        return;
      }
      case 'mkdir': {
        const full = this.#real(op.path);
        const first = this.#real(op.first);
        const made: string[] = [];
        for (let d = full; ; d = path.dirname(d)) {
          made.unshift(d);
          if (d === first || d === path.dirname(d)) break;
        }
        for (const d of made) if (this.#inside(d) && !this.roots.includes(d)) this.entries.push({ k: 'mkdir', path: d });
        return;
      }
      case 'rename': {
        const from = this.#real(op.from);
        const to = this.#real(op.to);
        if (this.#inside(from) || this.#inside(to)) this.entries.push({ k: 'rename', from, to });
        return;
      }
      case 'unlink':
      case 'rmtree': {
        const p = this.#real(op.path);
        if (this.#inside(p)) this.entries.push(op.op === 'unlink' ? { k: 'unlink', path: p } : { k: 'rmtree', path: p });
        return;
      }
      case 'mark':
        this.entries.push({ k: 'mark', label: op.label });
    }
  }
}
