/**
 * UndoLog: the original bytes of every range a restore in place overwrites, kept so that a
 * failed restore can put the target back as it was.
 *
 * The log is a sparse file with the target's layout: the original of the range at offset X
 * is stored at offset X, so concurrent saves need no allocation and only the ranges saved
 * take space. It lives beside the restore's journal, in the target's private directory (mode
 * 0700) under the restore directory (device/interrupted-restore.ts), since it holds device
 * content. A range is recorded as saved only once its original is in the log, so a rollback
 * never writes back bytes the log does not hold; the caller overwrites a range only after
 * `save` returned.
 *
 * The log is written, not synced, and which ranges it holds is known only to the process: a
 * rollback is done by the process that failed. A restore that was killed is finished by the
 * next one (the journal says it was interrupted), which replaces the log with its own.
 */

import fs from 'node:fs';
import path from 'node:path';
import { BdsnapError, toBdsnapError } from '../errors.js';
import { preadFully, pwriteFully } from '../host/fd-io.js';

/** Largest range written back at once by rollback. */
const ROLLBACK_CHUNK_BYTES = 16 * 1024 * 1024;

/** What a rollback writes through: the target, already cut back to its original size. */
export interface UndoTarget {
  write(data: Buffer, offsetBytes: number): Promise<void>;
  flush(): Promise<void>;
}

export class UndoLog {
  /** The log file: kept (and named in the error) only when a rollback failed. */
  readonly path: string;
  readonly #fh: fs.promises.FileHandle;
  readonly #saved: Array<{ offsetBytes: number; lengthBytes: number }> = [];
  #savedBytes = 0;
  #closed = false;

  private constructor(file: string, fh: fs.promises.FileHandle) {
    this.path = file;
    this.#fh = fh;
  }

  /** A new log in the private directory `dir`, replacing the log a killed restore left there. */
  static async create(dir: string): Promise<UndoLog> {
    const file = path.join(dir, 'originals');
    try {
      // rm removes a link planted there, never what it points to; O_EXCL then refuses a new one.
      await fs.promises.rm(file, { force: true });
      const fh = await fs.promises.open(file, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_NOFOLLOW, 0o600);
      return new UndoLog(file, fh);
    } catch (err) {
      const e = toBdsnapError(err);
      throw new BdsnapError(e.code, `cannot make a place for the originals a restore in place overwrites, in ${dir}: ${e.message}; set BDSNAP_RESTORE_DIR to a private directory with room`, { cause: err });
    }
  }

  /** The log's descriptor, for a worker that keeps originals itself (then `record` them). */
  get fd(): number {
    return this.#fh.fd;
  }

  /** Bytes saved so far. */
  get savedBytes(): number {
    return this.#savedBytes;
  }

  /** Keep `original`, the content at `offsetBytes` about to be overwritten. */
  async save(offsetBytes: number, original: Buffer): Promise<void> {
    try {
      await pwriteFully(this.#fh.fd, original, offsetBytes);
    } catch (err) {
      throw this.keepFailed(offsetBytes, err);
    }
    this.record(offsetBytes, original.length);
  }

  /** The error for an original that could not be kept (here or by a worker through `fd`). */
  keepFailed(offsetBytes: number, err: unknown): BdsnapError {
    const e = toBdsnapError(err);
    const hint = e.code === 'ENOSPC' ? '; set BDSNAP_RESTORE_DIR to a private directory with room for the part of the target that changes' : '';
    return new BdsnapError(e.code, `cannot keep the original bytes at ${offsetBytes} in ${this.path}: ${e.message}${hint}`, { cause: err });
  }

  /** The original of `lengthBytes` at `offsetBytes` is in the log, written through `fd`. */
  record(offsetBytes: number, lengthBytes: number): void {
    // Ranges are saved nearly in order: most extend the last one, which keeps the list short.
    const last = this.#saved[this.#saved.length - 1];
    if (last && last.offsetBytes + last.lengthBytes === offsetBytes) last.lengthBytes += lengthBytes;
    else this.#saved.push({ offsetBytes, lengthBytes });
    this.#savedBytes += lengthBytes;
  }

  /** Write every saved range below `sizeBytes` back into `target`, then flush it. */
  async rollback(target: UndoTarget, sizeBytes: number): Promise<void> {
    const buf = Buffer.allocUnsafe(Math.min(ROLLBACK_CHUNK_BYTES, Math.max(1, this.#savedBytes)));
    for (const r of this.#saved) {
      const end = Math.min(r.offsetBytes + r.lengthBytes, sizeBytes);
      for (let at = r.offsetBytes; at < end; at += buf.length) {
        const part = buf.subarray(0, Math.min(buf.length, end - at));
        const got = await preadFully(this.#fh.fd, part, at);
        if (got !== part.length) throw new BdsnapError('EIO', `${this.path} ends at ${at + got}, short of the original bytes it should hold up to ${end}`);
        await target.write(part, at);
      }
    }
    await target.flush();
  }

  /** Close the log and remove it. */
  async discard(): Promise<void> {
    await this.close();
    await fs.promises.rm(this.path, { force: true });
  }

  /** Close the log, keeping it. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.#fh.close();
  }
}
