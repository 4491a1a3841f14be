/**
 * A recording hook at the file-system call boundary: every call through src/host/ that changes
 * what a power loss could keep or lose (a write, a truncate, a file or directory sync, a file
 * created, a directory made, a rename, an unlink, a tree removed) is reported to the sink when
 * one is installed, after the call succeeded. The crash explorer of the tests builds, from such
 * a recording, the states a power loss allows.
 *
 * Off by default, and then each call site pays one comparison with undefined: the op object is
 * only built when a sink is installed. Nothing in the product installs one.
 */

/** One call that succeeded. Paths are as the caller named them (possibly /proc/self/fd/N/name). */
export type FsTraceOp =
  /** `bytes` of `buffers` (back to back) reached the file at `position`. */
  | { op: 'write'; fd: number; position: number; buffers: readonly Buffer[]; bytes: number }
  | { op: 'truncate'; fd: number; lengthBytes: number }
  /** fsync(2) or fdatasync(2) returned: of a file its data, of a directory its names. */
  | { op: 'sync'; fd: number }
  /** `path` was opened as `fd`; `created` if this open made the file. */
  | { op: 'open'; fd: number; path: string; created: boolean }
  /** Directories made: `first` (the top one created) down to `path`. */
  | { op: 'mkdir'; path: string; first: string }
  | { op: 'rename'; from: string; to: string }
  | { op: 'unlink'; path: string }
  /** `path` and everything below it removed. */
  | { op: 'rmtree'; path: string }
  /** `lengthBytes` of `srcFd` at `srcPosition` reflinked into `fd` at `position`. */
  | { op: 'clone'; srcFd: number; srcPosition: number; fd: number; position: number; lengthBytes: number }
  /** A point of the caller's (a flush answered to a client, a call returned). */
  | { op: 'mark'; label: string };

export interface FsTraceSink {
  record(op: FsTraceOp): void;
}

/** The mark the NBD server reports before it answers a client's flush. */
export const FLUSH_ANSWERED_MARK = 'nbd flush answered';

/** The installed sink; read at each call, so installing one takes effect at once. */
export let fsTrace: FsTraceSink | undefined;

/** Install `sink` (undefined: stop recording). Returns the one it replaces. */
export function setFsTrace(sink: FsTraceSink | undefined): FsTraceSink | undefined {
  const previous = fsTrace;
  fsTrace = sink;
  return previous;
}

/** Report a point of the caller's (no-op when nothing records). */
export function traceMark(label: string): void {
  if (fsTrace !== undefined) fsTrace.record({ op: 'mark', label });
}
