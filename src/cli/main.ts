#!/usr/bin/env node
/**
 * Entry point of the `bdsnap` command. It only sizes the libuv thread pool (which bounds
 * parallel file I/O and must be set before the first fs call) and then loads the program.
 */

process.env.UV_THREADPOOL_SIZE ??= '16';

const { run } = await import('./program.js');
await run(process.argv);
