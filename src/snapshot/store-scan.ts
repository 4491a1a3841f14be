/**
 * The session store's scanner: reads data.bin from the start through the one record scanner
 * (record-scan.ts), verifies every record (one checksum pass each), matches cloned records
 * with their seals and rebuilds the index.
 */

import { crc32 } from 'node:zlib';
import { BdsnapError } from '../errors.js';
import { RECORD_HEADER_BYTES, decodeRecordHeader, decodeSealPayload, payloadMatches, type RecordHeader, type SealEntry } from './format.js';
import { scanRecords, type RecordScanner } from './record-scan.js';

/** A record holding originals (seal records are not listed). */
export interface ScannedRecord {
  /** Byte position of the header in data.bin. */
  position: number;
  firstChunk: number;
  payloadBytes: number;
  /** Byte position of the payload: after the header, or a cloned record's aligned one. */
  payloadPosition: number;
  cloned: boolean;
}

export interface ScanResult {
  records: ScannedRecord[];
  /** chunk index -> byte position of its original in data.bin (first record wins). */
  index: Map<number, number>;
  /** Bytes of valid records from the start of the file. */
  validBytes: number;
  fileBytes: number;
  /** Why the scan stopped before the end of the file (only when a torn tail is allowed). */
  tornReason?: string;
  /** Sum of payload bytes of the indexed chunks. */
  preservedBytes: number;
  /**
   * Cloned records with no seal yet, with the CRC-32 of their payload as read now (only when a
   * torn tail is allowed: a session that did not end cleanly). Recovery seals them.
   */
  unsealed: SealEntry[];
}

export interface ScanOptions {
  chunkSize: number;
  deviceSize: number;
  /** Accept a bad record as the torn end of the file (recovery) instead of failing (ECORRUPT). */
  allowTornTail: boolean;
  /** Name used in error messages. */
  where: string;
}

/**
 * Read data.bin from the start, verify every record (one checksum pass per record) and rebuild
 * the index.
 */
export async function scanData(fd: number, options: ScanOptions): Promise<ScanResult> {
  const { chunkSize, deviceSize, where } = options;
  const records: ScannedRecord[] = [];
  const index = new Map<number, number>();
  /** Cloned records met and not yet sealed: header position -> CRC-32 of the payload. */
  const unsealed = new Map<number, number>();
  let preservedBytes = 0;
  const chunkCount = Math.ceil(deviceSize / chunkSize);
  const scanner: RecordScanner<RecordHeader> = {
    headerBytes: RECORD_HEADER_BYTES,
    decode(header) {
      const h = decodeRecordHeader(header);
      if (typeof h === 'string' || h.kind === 'seal') return h;
      if (h.kind === 'image') return 'image record in a session store';
      const startBytes = h.firstChunk * chunkSize;
      const aligned = h.payloadBytes % chunkSize === 0 || startBytes + h.payloadBytes === deviceSize;
      if (h.firstChunk >= chunkCount || startBytes + h.payloadBytes > deviceSize || !aligned) {
        return `record for chunk ${h.firstChunk} (${h.payloadBytes} bytes) does not fit the device`;
      }
      return h;
    },
    truncated: (h) => (h.kind === 'seal' ? 'truncated seal record' : 'truncated record payload'),
    accept(h, _header, body, position) {
      if (h.kind === 'seal') {
        const entries = payloadMatches(h, body) ? decodeSealPayload(body) : 'seal record checksum mismatch';
        if (typeof entries === 'string') return entries;
        // A seal is whole and checked: a cloned record it contradicts is corrupt, not torn.
        for (const e of entries) {
          const crc = unsealed.get(e.position);
          if (crc === undefined) throw new BdsnapError('ECORRUPT', `${where} is corrupt: the seal record at byte ${position} names no unsealed cloned record at byte ${e.position}`);
          if (crc !== e.crc) throw new BdsnapError('ECORRUPT', `${where} is corrupt: cloned record payload checksum mismatch at byte ${e.position} (sealed at byte ${position})`);
          unsealed.delete(e.position);
        }
        return undefined;
      }
      if (h.kind === 'cloned') unsealed.set(position, crc32(body));
      else if (!payloadMatches(h, body)) return 'record payload checksum mismatch';
      const payloadPosition = position + h.payloadOffset;
      records.push({ position, firstChunk: h.firstChunk, payloadBytes: h.payloadBytes, payloadPosition, cloned: h.kind === 'cloned' });
      for (let i = 0; i * chunkSize < h.payloadBytes; i++) {
        const chunk = h.firstChunk + i;
        if (index.has(chunk)) continue;
        index.set(chunk, payloadPosition + i * chunkSize);
        preservedBytes += Math.min(chunkSize, h.payloadBytes - i * chunkSize);
      }
      return undefined;
    },
  };
  const scan = await scanRecords(fd, scanner);
  const tornReason = scan.tornReason === undefined ? undefined : `${scan.tornReason} at byte ${scan.validBytes} of ${where}`;
  if (tornReason !== undefined && !options.allowTornTail) {
    throw new BdsnapError('ECORRUPT', `${where} is corrupt: ${tornReason}`);
  }
  const [firstUnsealed] = unsealed.keys();
  if (firstUnsealed !== undefined && !options.allowTornTail) {
    throw new BdsnapError('ECORRUPT', `${where} is corrupt: the cloned record at byte ${firstUnsealed} has no seal (${unsealed.size} unsealed), so its payload cannot be checked`);
  }
  return {
    records, index, validBytes: scan.validBytes, fileBytes: scan.fileBytes, tornReason, preservedBytes, unsealed: [...unsealed].map(([p, crc]) => ({ position: p, crc })),
  };
}
