/**
 * One error class for the whole project. Callers branch on `code`, never on the message.
 * The table below lists every code with its NBD wire errno. On the command line and in logs the
 * message is shown as it is: each one already names what failed and, where there is one, what
 * to do about it, so there is no separate table of hints.
 */

/**
 * Every code, and the Linux errno it becomes on the NBD wire (the protocol defines them as
 * such). The one list of codes: ErrorCode is its keys, so a new code is one line here.
 */
export const WIRE_ERRNO = {
  EINVAL: 22, // bad argument or request (wrong range, misaligned, malformed)
  ENOSPC: 28, // no room: write past the end of a device, or a full disk
  EPERM: 1, // operation not allowed (read-only export, not root)
  EIO: 5, // the underlying device failed
  ENOTSUP: 95, // the device cannot do this
  EBUSY: 5, // the device is in use by someone else
  ENOENT: 5, // no such device, export, session or file (no such range on an export reads as an I/O error to the client)
  EPROTO: 22, // the peer broke the NBD protocol; the connection cannot go on
  EAUTH: 1, // wrong password
  ECORRUPT: 5, // a store file failed a checksum or does not parse
  EMISMATCH: 5, // restore: the device is not in the state the sessions expect
  ESESSION: 5, // session failed (overflow) or in a state that forbids the operation
  ESHUTDOWN: 108, // the component is closing
  ETIMEDOUT: 5, // a peer (server, daemon) did not answer in time
} as const satisfies Record<string, number>;

export type ErrorCode = keyof typeof WIRE_ERRNO;

export class BdsnapError extends Error {
  readonly code: ErrorCode;

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'BdsnapError';
    this.code = code;
  }
}

/** Whether `code` is one of ours. */
export function isErrorCode(code: string): code is ErrorCode {
  return Object.hasOwn(WIRE_ERRNO, code);
}

/** Map any thrown value to a BdsnapError, keeping the original as `cause`. */
export function toBdsnapError(err: unknown): BdsnapError {
  if (err instanceof BdsnapError) return err;
  const sys = err as NodeJS.ErrnoException | undefined;
  switch (sys?.code) {
    case 'ENOSPC':
    case 'EDQUOT':
      return new BdsnapError('ENOSPC', sys.message, { cause: err });
    case 'EPERM':
    case 'EACCES':
    case 'EROFS':
      return new BdsnapError('EPERM', sys.message, { cause: err });
    case 'ENOENT':
      return new BdsnapError('ENOENT', sys.message, { cause: err });
    case 'EBUSY':
      return new BdsnapError('EBUSY', sys.message, { cause: err });
    case 'EINVAL':
      return new BdsnapError('EINVAL', sys.message, { cause: err });
    case 'EOPNOTSUPP':
    case 'ENOTSUP':
      return new BdsnapError('ENOTSUP', sys.message, { cause: err });
    default:
      return new BdsnapError('EIO', err instanceof Error ? err.message : String(err), { cause: err });
  }
}
