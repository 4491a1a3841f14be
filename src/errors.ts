/**
 * One error class for the whole project. Callers branch on `code`, never on the message.
 * The table below maps every code to an NBD wire errno. On the command line and in logs the
 * message is shown as it is: each one already names what failed and, where there is one, what
 * to do about it, so there is no separate table of hints.
 */

export type ErrorCode =
  | 'EINVAL' // bad argument or request (wrong range, misaligned, malformed)
  | 'ENOSPC' // no room: write past the end of a device, or a full disk
  | 'EPERM' // operation not allowed (read-only export, not root)
  | 'EIO' // the underlying device failed
  | 'ENOTSUP' // the device cannot do this
  | 'EBUSY' // the device is in use by someone else
  | 'ENOENT' // no such device, export, session or file
  | 'EPROTO' // the peer broke the NBD protocol; the connection cannot go on
  | 'EAUTH' // wrong password
  | 'ECORRUPT' // a store file failed a checksum or does not parse
  | 'EMISMATCH' // restore: the device is not in the state the sessions expect
  | 'ESESSION' // session failed (overflow) or in a state that forbids the operation
  | 'ESHUTDOWN'; // the component is closing

export class BdsnapError extends Error {
  readonly code: ErrorCode;

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'BdsnapError';
    this.code = code;
  }
}

/** Linux errno values used on the NBD wire (the protocol defines them as such). */
export const WIRE_ERRNO: Record<ErrorCode, number> = {
  EPERM: 1,
  ENOENT: 5, // no such range on an export reads as an I/O error to the client
  EIO: 5,
  EBUSY: 5,
  EINVAL: 22,
  ENOSPC: 28,
  ENOTSUP: 95,
  EPROTO: 22,
  EAUTH: 1,
  ECORRUPT: 5,
  EMISMATCH: 5,
  ESESSION: 5,
  ESHUTDOWN: 108,
};

/** Whether `code` is one of ours (WIRE_ERRNO has one entry for each, which the compiler checks). */
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
