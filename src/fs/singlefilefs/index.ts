/** singlefilefs: the course's one-file filesystem, formatter and user-space reader/writer. */

export * from './layout.js';
export { mkfs, mkfsImage, DEFAULT_IMAGE_BLOCKS } from './mkfs.js';
export { SingleFileFs } from './file.js';
export { connectNbd, type NbdTarget } from './nbd.js';
