/**
 * The daemon's event stream (`bdsnap events`): sessions, snapshots, storage running low,
 * overflow, change-map resets. Each event gets a sequence number, a time and a type; the
 * last MAX_KEPT events stay in memory for readers, and every event is appended to
 * `<state-dir>/events.jsonl` and logged, so an operator finds them after a restart too.
 *
 * Readers poll with `since(seq, waitMs)`: it answers at once when newer events exist, else
 * waits up to waitMs for the next one. `bdsnap events --follow` is such a loop, which keeps
 * the control protocol one answer per request.
 *
 * Events are emitted from the NBD request path (a session starts on a first write, a snapshot
 * overflows), so emit() only numbers the event and keeps it in memory; the log line, the
 * append to the file and waking the readers happen on a later turn of the event loop, all
 * pending events at once and in order, so neither a slow log nor a reader delays the request.
 */

import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import type { DaemonEvent, EventsResult, EventType } from './control-protocol.js';

const MAX_KEPT = 1000;
const EVENTS_FILE = 'events.jsonl';
/** The file is cut back to the last MAX_KEPT events at start once it is larger than this. */
const MAX_FILE_BYTES = 4 * 1024 * 1024;

export class EventLog {
  readonly #file: string;
  readonly #log: Logger;
  readonly #kept: DaemonEvent[] = [];
  #seq = 0;
  #waiters = new Set<() => void>();
  #fd: number | undefined;
  /** Events numbered and kept but not yet logged, appended or announced, oldest first. */
  #pending: DaemonEvent[] = [];
  #drain: NodeJS.Immediate | undefined;

  private constructor(file: string, log: Logger) {
    this.#file = file;
    this.#log = log;
  }

  /** Read back the recent events of earlier runs, then append to the same file. */
  static async open(stateDir: string, log: Logger): Promise<EventLog> {
    const events = new EventLog(path.join(stateDir, EVENTS_FILE), log);
    await events.#loadTail();
    events.#fd = fs.openSync(events.#file, 'a', 0o600);
    return events;
  }

  emit(type: EventType, fields: { device?: string; snapshot?: string; details?: Record<string, unknown> }): DaemonEvent {
    const event: DaemonEvent = {
      seq: ++this.#seq, time: new Date().toISOString(), type,
      ...(fields.device !== undefined ? { device: fields.device } : {}),
      ...(fields.snapshot !== undefined ? { snapshot: fields.snapshot } : {}),
      details: fields.details ?? {},
    };
    this.#kept.push(event);
    if (this.#kept.length > MAX_KEPT) this.#kept.splice(0, this.#kept.length - MAX_KEPT);
    this.#pending.push(event);
    this.#drain ??= setImmediate(() => this.#publish());
    return event;
  }

  /** Log, append and announce the pending events, in the order they were emitted. */
  #publish(): void {
    this.#drain = undefined;
    const events = this.#pending;
    if (events.length === 0) return;
    this.#pending = [];
    for (const event of events) {
      const type = event.type;
      const bad = type.endsWith('failed') || type.endsWith('overflowed') || type === 'cbt-reset' || type === 'snapshot-low-space';
      this.#log[bad ? 'warn' : 'info']({ event: type, seq: event.seq, device: event.device, snapshot: event.snapshot, ...event.details }, `event ${type}`);
    }
    if (this.#fd !== undefined) {
      try {
        fs.writeSync(this.#fd, events.map((e) => `${JSON.stringify(e)}\n`).join(''));
      } catch (err) {
        this.#log.error({ event: 'events-file-write-failed', reason: (err as Error).message }, 'cannot append to the events file');
      }
    }
    for (const wake of [...this.#waiters]) wake();
  }

  /** Events with seq > after; waits up to waitMs for one when there is none yet. */
  async since(after: number, waitMs = 0): Promise<EventsResult> {
    let found = this.#kept.filter((e) => e.seq > after);
    if (found.length === 0 && waitMs > 0) {
      await new Promise<void>((resolve) => {
        const wake = (): void => {
          clearTimeout(timer);
          this.#waiters.delete(wake);
          resolve();
        };
        const timer = setTimeout(wake, waitMs);
        this.#waiters.add(wake);
      });
      found = this.#kept.filter((e) => e.seq > after);
    }
    return { events: found, lastSeq: found.at(-1)?.seq ?? Math.max(after, 0) };
  }

  get lastSeq(): number {
    return this.#seq;
  }

  close(): void {
    if (this.#drain) clearImmediate(this.#drain);
    this.#publish();
    for (const wake of [...this.#waiters]) wake();
    if (this.#fd !== undefined) fs.closeSync(this.#fd);
    this.#fd = undefined;
  }

  async #loadTail(): Promise<void> {
    let text: string;
    try {
      text = await fs.promises.readFile(this.#file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw err;
    }
    const lines = text.split('\n').filter((l) => l.length > 0);
    for (const line of lines.slice(-MAX_KEPT)) {
      try {
        const e = JSON.parse(line) as DaemonEvent;
        if (typeof e.seq === 'number' && typeof e.type === 'string' && typeof e.time === 'string') this.#kept.push({ ...e, details: e.details ?? {} });
      } catch {
        // A torn last line from a killed daemon: the events before it still count.
      }
    }
    this.#seq = this.#kept.at(-1)?.seq ?? 0;
    if (Buffer.byteLength(text) > MAX_FILE_BYTES) {
      await fs.promises.writeFile(this.#file, this.#kept.map((e) => `${JSON.stringify(e)}\n`).join(''), { mode: 0o600 });
    }
  }
}
