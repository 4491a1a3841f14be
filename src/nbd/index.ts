/** The NBD layer: server, client, wire constants, codecs and the export provider types. */

export { NbdServer, type NbdServerOptions } from './server.js';
export { NbdClient, codeForErrno, type NbdClientOptions, type NbdReply } from './client.js';
export { StaticExports, type StaticExport } from './static-exports.js';
export type { ExportHandle, ExportProvider, MetaContextSource } from './exports.js';
export { NbdProtocolError } from './byte-queue.js';
export { RequestDecoder, type ClientMessage, type OptionMessage, type RequestMessage } from './request-decoder.js';
export { ReplyDecoder, type ServerMessage } from './reply-decoder.js';
export * as constants from './constants.js';
