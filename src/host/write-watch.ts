/**
 * Writers of a file this process holds open, other than this process, as the kernel reports
 * them (fanotify, marked on the open file whatever its names): a VM, `dd`, another server or
 * `losetup` opening a device for writing while bdsnap serves it writes around copy-before-write
 * and the change map.
 *
 * Watched: opens (FAN_OPEN, each naming the opener's pid) and closes of descriptors opened for
 * writing (FAN_CLOSE_WRITE). A closer that is not this process wrote, or could have; an opener
 * that still has the file open for writing when the events are read may (its descriptors are
 * looked at, src/host/open-writers.ts); one that opened and closed meanwhile left its close.
 * Nothing is reported per write, so bdsnap's own writes cost nothing here (a watch of every
 * write, FAN_MODIFY, added 0.7 us to each 4 KiB write). A writable mapping made before the
 * watch began is not seen, nor a second device node of the same block device. A queue that
 * overflowed cannot tell who opened the file: it counts as a writer.
 *
 * Needs root (CAP_SYS_ADMIN) and the optional koffi package; where either is missing, start()
 * says why and the caller goes on without it.
 */

import fs from 'node:fs';
import { loadLibc } from './libc.js';
import type { BdsnapError } from '../errors.js';
import { checkNotInUse } from './in-use.js';
import { openWriters, PROC_PATH, type OpenTarget } from './open-writers.js';

/** struct fanotify_event_metadata: event_len u32, vers u8, reserved u8, metadata_len u16, mask u64, fd s32, pid s32. */
const METADATA_BYTES = 24;
const FAN_CLOSE_WRITE = 0x8n;
const FAN_Q_OVERFLOW = 0x4000n;
/** How often a holder reads its watch (besides before each decision that depends on it). */
export const WRITE_WATCH_POLL_MS = 1000;
/** Enough for a few hundred events per read; reads go on until the queue is empty. */
const READ_BYTES = 8192;

/** Who wrote the file besides this process, or may have. */
interface ForeignWrite {
  /** The writer's pid, or undefined when the kernel's queue overflowed (the writer is unknown). */
  pid: number | undefined;
  /** Its command name, when it still runs. */
  command: string | undefined;
}

export class WriteWatch {
  readonly #group: number;
  readonly #target: OpenTarget;
  readonly #buffer = Buffer.alloc(READ_BYTES);
  #closed = false;

  private constructor(group: number, target: OpenTarget) {
    this.#group = group;
    this.#target = target;
  }

  /** Watch the file open as `fd` (which is `target`), or say why it cannot be watched here. */
  static start(fd: number, target: OpenTarget): WriteWatch | { reason: string } {
    const libc = loadLibc();
    if (libc === undefined) return { reason: 'the koffi package is not usable' };
    try {
      return new WriteWatch(libc.watchWriters(fd), target);
    } catch (err) {
      const code = (err as { code?: string }).code;
      return { reason: code === 'EPERM' ? 'fanotify needs root (CAP_SYS_ADMIN)' : (err as Error).message };
    }
  }

  /**
   * Read every event queued so far and say what another process did to `devicePath`, in a
   * sentence (`during`: "while bdsnap held it"; `around`: what its writes went around), or
   * undefined when nothing wrote it. An opener that holds no descriptor for writing may have
   * left something that writes on its behalf (a loop device set up on the file, a mount): then
   * whatever checkNotInUse() finds is the answer. What cannot be told (the queue, /proc or sysfs
   * unreadable) counts as a write: the sentence says so.
   */
  async check(devicePath: string, during: string, around: string): Promise<string | undefined> {
    try {
      const events = this.#drain();
      if (events === undefined) return undefined;
      const wrote = (w: ForeignWrite): string => `${devicePath} was opened for writing by ${describeForeignWrite(w)} ${during}: what it wrote went around ${around}`;
      if ('pid' in events) return wrote(events);
      const [writer] = await openWriters(this.#target, PROC_PATH, [...events.openers].map(String));
      if (writer) return wrote({ pid: writer.pid, command: writer.command || undefined });
      try {
        await checkNotInUse(devicePath, {}, { exclusiveProbe: false });
        return undefined;
      } catch (err) {
        if ((err as BdsnapError).code !== 'EBUSY') throw err;
        const openers = [...events.openers].map((pid) => describeForeignWrite({ pid, command: commandOf(pid) })).join(', ');
        return `${devicePath} was opened by ${openers} ${during}, and writes through what it left go around ${around}: ${(err as Error).message}`;
      }
    } catch (err) {
      return `${devicePath} could not be checked for other writers ${during} (${(err as Error).message}), so writes around ${around} cannot be ruled out`;
    }
  }

  /** The events queued so far: the first other process that closed a descriptor it wrote through (or the overflow), else the other processes that opened the file. */
  #drain(): ForeignWrite | { openers: Set<number> } | undefined {
    if (this.#closed) return undefined;
    const openers = new Set<number>();
    for (;;) {
      let n: number;
      try {
        n = fs.readSync(this.#group, this.#buffer, 0, READ_BYTES, null);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'EAGAIN') break;
        throw err;
      }
      if (n <= 0) break;
      for (let at = 0; at + METADATA_BYTES <= n;) {
        const length = this.#buffer.readUInt32LE(at);
        const mask = this.#buffer.readBigUInt64LE(at + 8);
        const eventFd = this.#buffer.readInt32LE(at + 16);
        const pid = this.#buffer.readInt32LE(at + 20);
        // Each event carries a descriptor of the file, opened for it: closed at once.
        if (eventFd >= 0) fs.closeSync(eventFd);
        if ((mask & FAN_Q_OVERFLOW) !== 0n) return { pid: undefined, command: undefined };
        if (pid !== process.pid) {
          if ((mask & FAN_CLOSE_WRITE) !== 0n) return { pid, command: commandOf(pid) };
          openers.add(pid);
        }
        if (length < METADATA_BYTES) break;
        at += length;
      }
    }
    return openers.size === 0 ? undefined : { openers };
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    fs.closeSync(this.#group);
  }
}

/** How a foreign write reads in a message: "pid 123 (dd)", or the overflow. */
function describeForeignWrite(w: ForeignWrite): string {
  if (w.pid === undefined) return 'a process the kernel could not name (too many writes queued to tell them apart)';
  return `pid ${w.pid}${w.command !== undefined ? ` (${w.command})` : ''}`;
}

function commandOf(pid: number): string | undefined {
  try {
    return fs.readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
  } catch {
    return undefined;
  }
}
