/**
 * NBD wire constants, named exactly as in the protocol specification (doc/proto.md of the
 * NetworkBlockDevice/nbd project). Values only; no behaviour lives here.
 *
 * 64-bit magics are bigint because they do not fit a double; the codec compares them as two
 * 32-bit halves (the *_HI / *_LO pairs) so the hot path never touches BigInt.
 */

// Handshake magics.
export const NBDMAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
/** Magic of every fixed-newstyle option reply. */
export const NBD_REP_MAGIC = 0x0003e889045565a9n;

export const NBDMAGIC_HI = 0x4e42444d;
export const NBDMAGIC_LO = 0x41474943;
export const IHAVEOPT_HI = 0x49484156;
export const IHAVEOPT_LO = 0x454f5054;
export const NBD_REP_MAGIC_HI = 0x0003e889;
export const NBD_REP_MAGIC_LO = 0x045565a9;

// Handshake flags (server, 16 bits).
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;

// Client flags (32 bits).
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

// Transmission flags (16 bits).
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_RESIZE = 1 << 9;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;
export const NBD_FLAG_BLOCK_STATUS_PAYLOAD = 1 << 12;

// Option types.
export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_PEEK_EXPORT = 4;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;
export const NBD_OPT_EXTENDED_HEADERS = 11;

// Option reply types. Errors have bit 31 set; `>>> 0` keeps them unsigned.
export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
export const NBD_REP_FLAG_ERROR = 0x80000000;
export const NBD_REP_ERR_UNSUP = (0x80000000 + 1) >>> 0;
export const NBD_REP_ERR_POLICY = (0x80000000 + 2) >>> 0;
export const NBD_REP_ERR_INVALID = (0x80000000 + 3) >>> 0;
export const NBD_REP_ERR_PLATFORM = (0x80000000 + 4) >>> 0;
export const NBD_REP_ERR_TLS_REQD = (0x80000000 + 5) >>> 0;
export const NBD_REP_ERR_UNKNOWN = (0x80000000 + 6) >>> 0;
export const NBD_REP_ERR_SHUTDOWN = (0x80000000 + 7) >>> 0;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = (0x80000000 + 8) >>> 0;
export const NBD_REP_ERR_TOO_BIG = (0x80000000 + 9) >>> 0;
export const NBD_REP_ERR_EXT_HEADER_REQD = (0x80000000 + 10) >>> 0;

// Information types of NBD_REP_INFO.
export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

// Transmission magics.
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// Command types.
export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;
export const NBD_CMD_RESIZE = 8;

// Command flags (16 bits).
export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;
export const NBD_CMD_FLAG_PAYLOAD_LEN = 1 << 5;

// Structured reply flags and types. 2^15 + 1, not `1 << 15 + 1` (which is 1 << 16 in JS).
export const NBD_REPLY_FLAG_DONE = 1 << 0;
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
export const NBD_REPLY_TYPE_BLOCK_STATUS_EXT = 6;
export const NBD_REPLY_TYPE_ERROR = 0x8001;
export const NBD_REPLY_TYPE_ERROR_OFFSET = 0x8002;
/** Bit 15 marks every error chunk type. */
export const NBD_REPLY_TYPE_ERROR_BIT = 0x8000;

// base:allocation flags.
export const NBD_STATE_HOLE = 1 << 0;
export const NBD_STATE_ZERO = 1 << 1;

// Error values of the error field.
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

/** The metadata context every export offers; others come from the export (ExportHandle.metaContexts). */
export const BASE_ALLOCATION = 'base:allocation';

// Sizes of fixed parts, in bytes.
export const REQUEST_HEADER_BYTES = 28;
export const SIMPLE_REPLY_HEADER_BYTES = 16;
export const STRUCTURED_REPLY_HEADER_BYTES = 20;
export const OPTION_HEADER_BYTES = 16;
export const OPTION_REPLY_HEADER_BYTES = 20;

// Limits.
/** Longest string (export name, context name, message) the spec allows. */
export const NBD_MAX_STRING_BYTES = 4096;
/** Largest option payload accepted; bigger ones are skipped and refused with ERR_TOO_BIG. */
export const MAX_OPTION_PAYLOAD_BYTES = 64 * 1024;
/** Most metadata contexts one NBD_OPT_SET_META_CONTEXT may select (more: NBD_REP_ERR_TOO_BIG). */
export const MAX_SELECTED_META_CONTEXTS = 256;
/** Largest READ/WRITE payload (the spec's interoperable maximum, 2^25). */
export const MAX_PAYLOAD_BYTES = 32 * 1024 * 1024;
