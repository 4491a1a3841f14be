/**
 * How the NBD server finds what to serve. The server knows nothing of files, sessions or
 * the registry: it asks an ExportProvider for a handle when a client selects an export, and
 * releases that handle when the connection ends (after its requests in flight have finished).
 */

import type { BlockDevice } from '../device/block-device.js';

/** Where a server, a connection or an export host reports what happened (one event, its fields). */
export type LogFn = (event: Record<string, unknown>) => void;

export interface ExportHandle {
  /** The export name as the client will see it (the device path). */
  readonly name: string;
  readonly description?: string;
  /** What the connection reads and writes; may be a stack of layers. */
  readonly device: BlockDevice;
  /**
   * Metadata contexts offered besides base:allocation (which is always offered), e.g. a
   * snapshot image's `qemu:dirty-bitmap:...` change maps. Names must be distinct, of the form
   * `namespace:leaf`, and not `base:allocation`.
   */
  readonly metaContexts?: readonly MetaContextSource[];
  /** Called exactly once, when the connection that opened the handle is done with it. */
  release(): Promise<void>;
}

/** One metadata context an export offers for NBD_CMD_BLOCK_STATUS. */
export interface MetaContextSource {
  /** Full name, e.g. 'qemu:dirty-bitmap:3fa2c1d0:4'. */
  readonly name: string;
  /**
   * Status from `offsetBytes`: at least one extent, contiguous, covering at most `lengthBytes`
   * (more is cut off), each with a non-zero length; `flags` as the context defines them.
   */
  extents(offsetBytes: number, lengthBytes: number): Promise<Array<{ length: number; flags: number }>>;
}

export interface ExportProvider {
  /** Names offered to NBD_OPT_LIST. */
  list(): Promise<string[]>;
  /**
   * Resolve an export name ('' selects the default export). `purpose` is 'info' for
   * NBD_OPT_INFO (the handle is released right after the reply) and 'go' for
   * NBD_OPT_GO / NBD_OPT_EXPORT_NAME (the handle lives as long as the connection).
   * Returns undefined for an unknown name; throws a BdsnapError to refuse (EPERM, EBUSY...).
   */
  open(name: string, purpose: 'info' | 'go'): Promise<ExportHandle | undefined>;
}

