/**
 * The one scanner of store files: walks the records of a file from its start, each a header
 * then a payload, through a read-ahead reader, and stops at the first place that is not a
 * whole, valid record. What a record is (its header format, its checks, what it adds to an
 * index) is the caller's: the session store (store-scan.ts) and a snapshot's difference
 * storage (diff-storage.ts) each give their decoder and their acceptance of a record.
 *
 * Where the scan stops is the end of the valid records: after a kill, a torn tail that the
 * caller cuts (or, where no tail can be torn, damage it reports). A caller that finds damage
 * no kill can explain (a seal contradicting its record) throws instead.
 */

import { fstatFd } from '../host/fd-io.js';
import { toBdsnapError } from '../errors.js';
import { SequentialReader } from './sequential-reader.js';

/** Where a record's payload is: bytes from the header's position, and its length. */
export interface RecordPlace {
  payloadOffset: number;
  payloadBytes: number;
}

export interface RecordScanner<R extends RecordPlace> {
  headerBytes: number;
  /** The record a header starts (its own checks, lengths against the maxima), or why it is none. */
  decode(header: Buffer): R | string;
  /** Why the payload's absence ends the scan ('truncated record payload' unless said). */
  truncated?(record: R): string;
  /**
   * Check the whole record and take it (index it); or say why it is not a record. Throws for
   * damage that is not a torn tail.
   */
  accept(record: R, header: Buffer, payload: Buffer, position: number): string | undefined;
}

export interface RecordScan {
  /** Bytes of valid records from the start of the file. */
  validBytes: number;
  fileBytes: number;
  /** Why the scan stopped before the end of the file (at validBytes). */
  tornReason?: string;
}

/** Scan every record of the file `fd` with `scanner`. Errors: EIO (a read), whatever `accept` throws. */
export async function scanRecords<R extends RecordPlace>(fd: number, scanner: RecordScanner<R>): Promise<RecordScan> {
  const fileBytes = (await fstatFd(fd).catch((err: unknown) => {
    throw toBdsnapError(err);
  })).size;
  const reader = new SequentialReader(fd, fileBytes);
  let position = 0;
  let tornReason: string | undefined;
  try {
    while (position < fileBytes) {
      // Most records are in the window already: held() spares them a promise each.
      const header = reader.held(position, scanner.headerBytes) ?? await reader.at(position, scanner.headerBytes);
      if (header === undefined) {
        tornReason = 'truncated record header';
        break;
      }
      const record = scanner.decode(header);
      if (typeof record === 'string') {
        tornReason = record;
        break;
      }
      const payloadPosition = position + record.payloadOffset;
      const payload = reader.held(payloadPosition, record.payloadBytes) ?? await reader.at(payloadPosition, record.payloadBytes);
      if (payload === undefined) {
        tornReason = scanner.truncated?.(record) ?? 'truncated record payload';
        break;
      }
      const bad = scanner.accept(record, header, payload, position);
      if (bad !== undefined) {
        tornReason = bad;
        break;
      }
      position = payloadPosition + record.payloadBytes;
    }
  } finally {
    await reader.settle();
  }
  return { validBytes: position, fileBytes, tornReason };
}
