/**
 * The data of the options a server parses (NBD_OPT_INFO and NBD_OPT_GO, LIST and
 * SET_META_CONTEXT). Pure: each parser checks every length against the data before reading,
 * and returns the reason as a string when the data is invalid (the option is then answered
 * with NBD_REP_ERR_INVALID and the connection lives on).
 */

import * as C from './constants.js';

/** NBD_OPT_INFO / NBD_OPT_GO data: the export name and the information requests. */
export function parseInfoRequest(data: Buffer): { name: string; infos: Set<number> } | string {
  if (data.length < 6) return 'option data too short';
  const nameBytes = data.readUInt32BE(0);
  if (nameBytes > data.length - 6) return 'export name length exceeds the option data';
  const name = data.toString('utf8', 4, 4 + nameBytes);
  const count = data.readUInt16BE(4 + nameBytes);
  if (data.length !== 4 + nameBytes + 2 + 2 * count) return 'information request list does not match the option length';
  const infos = new Set<number>();
  for (let i = 0; i < count; i++) infos.add(data.readUInt16BE(6 + nameBytes + 2 * i));
  return { name, infos };
}

/** LIST_META_CONTEXT matching: the exact name, or a query ending in ':' as a prefix. */
export function contextMatches(query: string, name: string): boolean {
  return query === name || (query.endsWith(':') && name.startsWith(query));
}

/** Parse LIST/SET_META_CONTEXT data; a string is the reason it is invalid. */
export function parseMetaContextData(data: Buffer): { exportName: string; queries: string[] } | string {
  if (data.length < 8) return 'option data too short';
  const nameBytes = data.readUInt32BE(0);
  if (nameBytes > data.length - 8) return 'export name length exceeds the option data';
  if (nameBytes > C.NBD_MAX_STRING_BYTES) return `export name of ${nameBytes} bytes is longer than ${C.NBD_MAX_STRING_BYTES}`;
  const exportName = data.toString('utf8', 4, 4 + nameBytes);
  let at = 4 + nameBytes;
  const count = data.readUInt32BE(at);
  at += 4;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (at + 4 > data.length) return 'query count exceeds the option data';
    const queryBytes = data.readUInt32BE(at);
    at += 4;
    if (queryBytes > data.length - at) return 'query length exceeds the option data';
    if (queryBytes > C.NBD_MAX_STRING_BYTES) return `query of ${queryBytes} bytes is longer than ${C.NBD_MAX_STRING_BYTES}`;
    queries.push(data.toString('utf8', at, at + queryBytes));
    at += queryBytes;
  }
  if (at !== data.length) return 'trailing bytes after the queries';
  return { exportName, queries };
}
