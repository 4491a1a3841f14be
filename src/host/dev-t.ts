/**
 * Linux dev_t numbers (stat's dev and rdev), encoded as glibc's makedev does: the major's low
 * 12 bits at bits 8..19 and its high 20 bits at 44..63; the minor's low 8 bits at 0..7 and its
 * high 24 bits at 20..43. Minor numbers above 255 (loop devices past loop255, nvme partitions)
 * use the high bits, and JS bit operators are 32-bit, so the decoding is done in BigInt, with
 * glibc's 32-bit masks so that neither half picks up bits of the other.
 */

export interface DeviceNumber {
  major: number;
  minor: number;
}

/** Split a dev_t into major and minor. */
export function decodeDevT(dev: number | bigint): DeviceNumber {
  const d = BigInt(dev);
  const major = ((d >> 8n) & 0xfffn) | ((d >> 32n) & 0xfffff000n);
  const minor = (d & 0xffn) | ((d >> 12n) & 0xffffff00n);
  return { major: Number(major), minor: Number(minor) };
}

/** Build a dev_t from major and minor (the inverse of decodeDevT, for tests and tools). */
export function encodeDevT(major: number, minor: number): bigint {
  const ma = BigInt(major);
  const mi = BigInt(minor);
  return ((ma & 0xfffn) << 8n) | ((ma & 0xfffff000n) << 32n) | (mi & 0xffn) | ((mi & 0xffffff00n) << 12n);
}

/** `major:minor`, as mountinfo and /sys/dev/block name a device. */
export function formatDevT(dev: number | bigint): string {
  const { major, minor } = decodeDevT(dev);
  return `${major}:${minor}`;
}
