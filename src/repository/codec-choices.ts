/**
 * The compressions a repository can be made with, by name: apart from ./codec.ts so that the
 * command line can list them in its help without loading the codecs.
 */

export const CODEC_CHOICES = ['zstd', 'brotli', 'deflate', 'lz4'] as const;
export type CodecChoice = (typeof CODEC_CHOICES)[number];
