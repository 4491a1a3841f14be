/**
 * A preload (`node --import <this file>`) that records which modules a process loads, so a test
 * can tell how much of the program a command pulls in before it does anything. The URLs go to
 * the file named by the MODULE_LOG environment variable.
 */

import { register } from 'node:module';

register(new URL('./module-log-hooks.js', import.meta.url));
