/**
 * Runtime settings for a process that serves for long (`bdsnap serve`, the daemon).
 *
 * V8's memory reducer runs full collections a few seconds after a process goes quiet, to
 * shrink its heap by a few MB. A full collection also throws away compiled code that refers to
 * objects that died: TurboFan's code for the NBD request path refers to objects of the
 * connections it was compiled on (sockets, their callbacks), so once those connections close,
 * the first collection after them leaves the path cold, and every client after a pause of about
 * eight seconds met a server as slow as a fresh one (0.8x of a warm one here, V8 compiling the
 * path again during its requests). The heap then shrinks at the collections that allocation
 * brings anyway; what matters for memory, the buffers of large requests, is collected by the
 * NBD threads themselves when they go idle holding more than their pools may keep.
 *
 * This module imports nothing of ours, so every layer may use it.
 */

import v8 from 'node:v8';

/** Keep compiled code across quiet periods: V8's memory reducer off, for this process and the threads it starts after. */
export function keepCompiledCodeWhenIdle(): void {
  v8.setFlagsFromString('--no-memory-reducer');
}
