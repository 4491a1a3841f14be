/**
 * The parts of the control protocol a client needs at run time: newline framing with a cap,
 * and the check of a response line. Kept apart from ./control-protocol.ts (the zod request
 * schemas the daemon validates with) so that a client command such as `bdsnap status` starts
 * without loading zod, which costs about as much as starting Node itself.
 */

import { isErrorCode, type ErrorCode } from '../errors.js';

export const MAX_LINE_BYTES = 64 * 1024;

export interface ErrorBody {
  code: ErrorCode;
  message: string;
}

export type Response =
  | { id: number | null; ok: true; result: unknown }
  | { id: number | null; ok: false; error: ErrorBody };

/**
 * A response as the daemon sends it, or undefined when `value` (a parsed JSON line) is not
 * one: `{ id: integer | null, ok: true, result }` or
 * `{ id: integer | null, ok: false, error: { code: <known code>, message: string } }`.
 */
export function parseResponse(value: unknown): Response | undefined {
  if (typeof value !== 'object' || value === null) return undefined;
  const v = value as Record<string, unknown>;
  const id = v.id;
  if (id !== null && !Number.isInteger(id)) return undefined;
  if (v.ok === true) return { id: id as number | null, ok: true, result: v.result };
  if (v.ok !== false) return undefined;
  const error = v.error;
  if (typeof error !== 'object' || error === null) return undefined;
  const { code, message } = error as Record<string, unknown>;
  if (typeof code !== 'string' || !isErrorCode(code) || typeof message !== 'string') return undefined;
  return { id: id as number | null, ok: false, error: { code, message } };
}

export type LineEvent = { kind: 'line'; text: string } | { kind: 'oversized'; bytes: number };

/**
 * Incremental newline framing with a cap. `push` returns the complete lines (and oversize
 * notices) found so far; no line is ever held beyond MAX_LINE_BYTES.
 */
export class LineDecoder {
  readonly #maxBytes: number;
  #parts: Buffer[] = [];
  #heldBytes = 0;
  /** Inside a line already reported as too long: dropping bytes until its newline. */
  #dropping = false;

  constructor(maxBytes = MAX_LINE_BYTES) {
    this.#maxBytes = maxBytes;
  }

  push(chunk: Buffer): LineEvent[] {
    const events: LineEvent[] = [];
    let start = 0;
    while (start < chunk.length) {
      const nl = chunk.indexOf(0x0a, start);
      const end = nl === -1 ? chunk.length : nl;
      const piece = chunk.subarray(start, end);
      if (!this.#dropping) {
        if (this.#heldBytes + piece.length > this.#maxBytes) {
          // Reported at once, so the sender hears about it without having to finish the line.
          events.push({ kind: 'oversized', bytes: this.#heldBytes + piece.length });
          this.#dropping = true;
          this.#parts = [];
          this.#heldBytes = 0;
        } else if (piece.length > 0) {
          this.#parts.push(Buffer.from(piece));
          this.#heldBytes += piece.length;
        }
      }
      if (nl === -1) break;
      if (this.#dropping) {
        this.#dropping = false;
      } else {
        events.push({ kind: 'line', text: Buffer.concat(this.#parts, this.#heldBytes).toString('utf8') });
        this.#parts = [];
        this.#heldBytes = 0;
      }
      start = nl + 1;
    }
    return events;
  }
}
