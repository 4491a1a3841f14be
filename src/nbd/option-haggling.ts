/**
 * The fixed-newstyle handshake's option phase: what the client asked for (structured replies,
 * metadata contexts, TLS) and the reply each option gets, up to the export it will use.
 *
 * Invariants:
 * - Options are handled one at a time; every option gets a final reply, except
 *   NBD_OPT_EXPORT_NAME, whose refusal is a throw (the connection closes).
 * - With TLS `require`, every option but STARTTLS (and ABORT) is refused with
 *   NBD_REP_ERR_TLS_REQD until TLS is started; the connection does the socket's part of STARTTLS.
 * - An export handle opened for GO or EXPORT_NAME either goes to the connection (which releases
 *   it at teardown) or, when the connection ended meanwhile, is released here at once.
 */

import type { NbdTls } from './tls.js';
import { BdsnapError, toBdsnapError } from '../errors.js';
import type { BlockDevice } from '../device/block-device.js';
import type { ExportHandle, ExportProvider } from './exports.js';
import type { OptionMessage } from './request-decoder.js';
import type { ActiveContext } from './transmission-requests.js';
import * as C from './constants.js';
import { contextMatches, parseInfoRequest, parseMetaContextData } from './option-data.js';
import {
  encodeExportNameReply, encodeInfoBlockSize, encodeInfoDescription, encodeInfoExport, encodeInfoName, encodeOptionError,
  encodeOptionReply, encodeRepMetaContext, encodeRepServer,
} from './encoders.js';

/** The id given to base:allocation by NBD_OPT_SET_META_CONTEXT; other contexts get 2, 3, ... */
const BASE_ALLOCATION_ID = 1;
const KNOWN_CLIENT_FLAGS = C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES;

/** A context chosen by NBD_OPT_SET_META_CONTEXT, by name until the export is opened. */
interface SelectedContext {
  id: number;
  name: string;
}

/** What option haggling needs from its connection. */
export interface HagglingConnection {
  /** Queue a handshake reply. */
  send(buf: Buffer): void;
  /** NBD_OPT_ABORT was acknowledged: end the connection gracefully. */
  finish(): void;
  /**
   * Acknowledge NBD_OPT_STARTTLS and hand the socket to TLS; resolves once the TLS handshake is
   * over (done, or the socket closed).
   */
  startTls(config: NbdTls): Promise<void>;
  /** The connection is still in its handshake (it did not end while an export was opened). */
  handshaking(): boolean;
  /** Serve the export from now on. */
  enterTransmission(handle: ExportHandle, structured: boolean, activeContexts: ActiveContext[]): void;
}

export class OptionHaggling {
  #connection: HagglingConnection;
  #exports: ExportProvider;
  #tls: NbdTls | undefined;
  /** TLS has been started (STARTTLS acknowledged) on this connection. */
  #tlsStarted = false;
  #noZeroes = false;
  #structured = false;
  /** Export name and contexts of the last successful NBD_OPT_SET_META_CONTEXT, if any. */
  #metaContextExport: string | undefined;
  #selectedContexts: SelectedContext[] = [];

  constructor(connection: HagglingConnection, exports: ExportProvider, tls: NbdTls | undefined) {
    this.#connection = connection;
    this.#exports = exports;
    this.#tls = tls;
  }

  /** The client's flags after the greeting; unknown ones are a protocol error (a throw). */
  clientFlags(flags: number): void {
    if ((flags & ~KNOWN_CLIENT_FLAGS) !== 0) throw new BdsnapError('EPROTO', `unknown client flags 0x${flags.toString(16)}`);
    this.#noZeroes = (flags & C.NBD_FLAG_C_NO_ZEROES) !== 0;
  }

  /** Answer one option; a throw means the connection must close. */
  async handle(m: OptionMessage): Promise<void> {
    const { option, data } = m;
    if (option === C.NBD_OPT_STARTTLS) return this.#startTls(m);
    if (this.#tls?.mode === 'require' && !this.#tlsStarted && option !== C.NBD_OPT_ABORT) {
      if (option === C.NBD_OPT_EXPORT_NAME) throw new BdsnapError('EPERM', 'NBD_OPT_EXPORT_NAME without TLS, which this server requires');
      this.#send(encodeOptionError(option, C.NBD_REP_ERR_TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first'));
      return;
    }
    if (option === C.NBD_OPT_EXPORT_NAME) {
      // No way to report an error to EXPORT_NAME: refusing means closing.
      if (m.tooBig) throw new BdsnapError('EPROTO', 'export name too long');
      await this.#exportName(data.toString('utf8'));
      return;
    }
    if (m.tooBig) {
      this.#send(encodeOptionError(option, C.NBD_REP_ERR_TOO_BIG, `option data of ${m.lengthBytes} bytes is too large`));
      return;
    }
    switch (option) {
      case C.NBD_OPT_ABORT:
        this.#send(encodeOptionReply(option, C.NBD_REP_ACK));
        this.#connection.finish();
        return;
      case C.NBD_OPT_LIST: {
        if (data.length !== 0) return this.#optionInvalid(option, 'NBD_OPT_LIST takes no data');
        for (const name of await this.#exports.list()) this.#send(encodeOptionReply(option, C.NBD_REP_SERVER, encodeRepServer(name)));
        this.#send(encodeOptionReply(option, C.NBD_REP_ACK));
        return;
      }
      case C.NBD_OPT_STRUCTURED_REPLY:
        if (data.length !== 0) return this.#optionInvalid(option, 'NBD_OPT_STRUCTURED_REPLY takes no data');
        this.#structured = true;
        this.#send(encodeOptionReply(option, C.NBD_REP_ACK));
        return;
      case C.NBD_OPT_LIST_META_CONTEXT:
      case C.NBD_OPT_SET_META_CONTEXT:
        await this.#metaContext(option, data);
        return;
      case C.NBD_OPT_INFO:
      case C.NBD_OPT_GO:
        await this.#infoOrGo(option, data);
        return;
      default:
        this.#send(encodeOptionError(option, C.NBD_REP_ERR_UNSUP, `option ${option} is not supported`));
    }
  }

  #send(buf: Buffer): void {
    this.#connection.send(buf);
  }

  /** NBD_OPT_STARTTLS: refused unless TLS is configured, not yet started, and asked for plainly. */
  async #startTls(m: OptionMessage): Promise<void> {
    const option = C.NBD_OPT_STARTTLS;
    const config = this.#tls;
    if (config === undefined) {
      this.#send(encodeOptionError(option, C.NBD_REP_ERR_POLICY, 'TLS is not enabled on this server'));
      return;
    }
    if (this.#tlsStarted) return this.#optionInvalid(option, 'TLS is already started');
    if (m.tooBig || m.data.length !== 0) return this.#optionInvalid(option, 'NBD_OPT_STARTTLS takes no data');
    const started = this.#connection.startTls(config);
    // Set in the same turn as the socket is handed over (startTls throws if it is not).
    this.#tlsStarted = true;
    await started;
  }

  #optionInvalid(option: number, message: string): void {
    this.#send(encodeOptionError(option, C.NBD_REP_ERR_INVALID, message));
  }

  async #exportName(name: string): Promise<void> {
    let handle: ExportHandle | undefined;
    try {
      handle = await this.#exports.open(name, 'go');
    } catch (err) {
      throw new BdsnapError('ENOENT', `export "${name}" refused: ${toBdsnapError(err).message}`, { cause: err });
    }
    if (!handle) throw new BdsnapError('ENOENT', `unknown export "${name}"`);
    if (await this.#releaseIfGone(handle)) return;
    this.#enterTransmission(handle, name);
    this.#send(encodeExportNameReply(handle.device.size, this.#transmissionFlags(handle.device), this.#noZeroes));
  }

  /**
   * LIST_META_CONTEXT and SET_META_CONTEXT. An export offers base:allocation and the contexts
   * of its handle. LIST: no query lists everything; a query is an exact name or, when it ends
   * with a colon, a prefix ('base:', 'qemu:', 'qemu:dirty-bitmap:'). SET: exact names only
   * (a prefix selects nothing, as the spec asks); each selected context gets its own id.
   */
  async #metaContext(option: number, data: Buffer): Promise<void> {
    const setting = option === C.NBD_OPT_SET_META_CONTEXT;
    // SET replaces the previous selection even when it fails.
    if (setting) {
      this.#metaContextExport = undefined;
      this.#selectedContexts = [];
    }
    if (!this.#structured) return this.#optionInvalid(option, 'negotiate structured replies first');
    const parsed = parseMetaContextData(data);
    if (typeof parsed === 'string') return this.#optionInvalid(option, parsed);
    const { exportName, queries } = parsed;
    const offered = await this.#offeredContexts(exportName, queries);
    let names: string[];
    if (setting) {
      const wanted = new Set(queries);
      names = offered.filter((name) => wanted.has(name));
      if (names.length > C.MAX_SELECTED_META_CONTEXTS) {
        this.#send(encodeOptionError(option, C.NBD_REP_ERR_TOO_BIG, `at most ${C.MAX_SELECTED_META_CONTEXTS} metadata contexts can be selected`));
        return;
      }
      let nextId = BASE_ALLOCATION_ID + 1;
      this.#selectedContexts = names.map((name) => ({ id: name === C.BASE_ALLOCATION ? BASE_ALLOCATION_ID : nextId++, name }));
      this.#metaContextExport = exportName;
      for (const c of this.#selectedContexts) this.#send(encodeOptionReply(option, C.NBD_REP_META_CONTEXT, encodeRepMetaContext(c.id, c.name)));
    } else {
      names = queries.length === 0 ? offered : offered.filter((name) => queries.some((q) => contextMatches(q, name)));
      // The id in a LIST reply is reserved: zero.
      for (const name of names) this.#send(encodeOptionReply(option, C.NBD_REP_META_CONTEXT, encodeRepMetaContext(0, name)));
    }
    this.#send(encodeOptionReply(option, C.NBD_REP_ACK));
  }

  /**
   * Names of the contexts `exportName` offers. The export is opened (for 'info') only when a
   * query can concern more than base:allocation; an unknown or refused export offers only
   * base:allocation here, and NBD_OPT_GO then says what is wrong with it.
   */
  async #offeredContexts(exportName: string, queries: string[]): Promise<string[]> {
    const names = [C.BASE_ALLOCATION];
    if (queries.length > 0 && queries.every((q) => q.startsWith('base:'))) return names;
    let handle: ExportHandle | undefined;
    try {
      handle = await this.#exports.open(exportName, 'info');
    } catch {
      return names;
    }
    if (!handle) return names;
    try {
      for (const source of handle.metaContexts ?? []) {
        if (source.name !== C.BASE_ALLOCATION && !names.includes(source.name)) names.push(source.name);
      }
    } finally {
      await handle.release();
    }
    return names;
  }

  async #infoOrGo(option: number, data: Buffer): Promise<void> {
    const parsed = parseInfoRequest(data);
    if (typeof parsed === 'string') return this.#optionInvalid(option, parsed);
    const { name, infos } = parsed;

    let handle: ExportHandle | undefined;
    try {
      handle = await this.#exports.open(name, option === C.NBD_OPT_GO ? 'go' : 'info');
    } catch (err) {
      const e = toBdsnapError(err);
      const type = e.code === 'ENOENT' ? C.NBD_REP_ERR_UNKNOWN : C.NBD_REP_ERR_POLICY;
      this.#send(encodeOptionError(option, type, e.message));
      return;
    }
    if (!handle) {
      this.#send(encodeOptionError(option, C.NBD_REP_ERR_UNKNOWN, `unknown export "${name}"`));
      return;
    }
    this.#sendInfos(option, handle, infos);
    this.#send(encodeOptionReply(option, C.NBD_REP_ACK));
    if (option === C.NBD_OPT_INFO) {
      await handle.release();
      return;
    }
    if (await this.#releaseIfGone(handle)) return;
    this.#enterTransmission(handle, name);
  }

  /** The NBD_REP_INFO replies of INFO and GO: the export's size and flags, and what was asked. */
  #sendInfos(option: number, handle: ExportHandle, infos: Set<number>): void {
    const device = handle.device;
    const sizes = device.blockSizes;
    this.#send(encodeOptionReply(option, C.NBD_REP_INFO, encodeInfoExport(device.size, this.#transmissionFlags(device))));
    if (infos.has(C.NBD_INFO_NAME)) this.#send(encodeOptionReply(option, C.NBD_REP_INFO, encodeInfoName(handle.name)));
    if (infos.has(C.NBD_INFO_DESCRIPTION) && handle.description !== undefined) {
      this.#send(encodeOptionReply(option, C.NBD_REP_INFO, encodeInfoDescription(handle.description)));
    }
    // Sent even unrequested: clients ignore what they did not ask for, and those that
    // obey it avoid requests we would refuse.
    this.#send(encodeOptionReply(option, C.NBD_REP_INFO,
      encodeInfoBlockSize(sizes.minimum, sizes.preferred, Math.min(sizes.maximum, C.MAX_PAYLOAD_BYTES))));
  }

  /** The connection ended while the export was being opened: give the handle back at once. */
  async #releaseIfGone(handle: ExportHandle): Promise<boolean> {
    if (this.#connection.handshaking()) return false;
    await handle.release();
    return true;
  }

  #transmissionFlags(device: BlockDevice): number {
    let flags = C.NBD_FLAG_HAS_FLAGS | C.NBD_FLAG_SEND_FLUSH | C.NBD_FLAG_SEND_FUA | C.NBD_FLAG_SEND_TRIM
      | C.NBD_FLAG_SEND_WRITE_ZEROES | C.NBD_FLAG_SEND_FAST_ZERO | C.NBD_FLAG_SEND_CACHE;
    if (this.#structured) flags |= C.NBD_FLAG_SEND_DF;
    if (device.readOnly) flags |= C.NBD_FLAG_READ_ONLY;
    if (device.canMultiConn) flags |= C.NBD_FLAG_CAN_MULTI_CONN;
    return flags;
  }

  /** Resolve the selected contexts against the opened export, and hand it to the connection. */
  #enterTransmission(handle: ExportHandle, requestedName: string): void {
    const selected = this.#structured && this.#metaContextExport === requestedName ? this.#selectedContexts : [];
    const activeContexts = selected.map((c) => ({
      id: c.id,
      name: c.name,
      // A context that vanished between SET and GO keeps its id and answers EIO.
      source: c.name === C.BASE_ALLOCATION ? 'base' as const : handle.metaContexts?.find((m) => m.name === c.name),
    }));
    this.#connection.enterTransmission(handle, this.#structured, activeContexts);
  }
}
