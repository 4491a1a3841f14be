/**
 * REPO, as the command line spells it: a directory, or `s3:http[s]://HOST[:PORT]/BUCKET[/PREFIX]`
 * (restic's spelling). Anything else that starts like a URL or a scheme (`sftp:`, `rest:`,
 * `http://`, a malformed `s3:`) is refused: taken as a path it would silently become a local
 * directory named after the URL, and backups meant to leave the machine would stay on it.
 * A directory whose name has a colon is still reachable as `./name:...` or by its absolute path.
 */

import { BdsnapError } from '../errors.js';
import { LocalDirStore, checkObjectName, type ObjectStore } from './object-store.js';
import type { S3Location, S3StoreOptions } from './s3-store.js';

export type RepoLocation = { kind: 'local'; dir: string } | ({ kind: 's3' } & S3Location);

const SCHEME = /^[A-Za-z][A-Za-z0-9+.-]*:/;
/** S3's rules for bucket names (3-63 of lowercase letters, digits, '.', '-'; alphanumeric ends). */
const BUCKET = /^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/;
const FORM = 's3:http[s]://HOST[:PORT]/BUCKET[/PREFIX]';

/** Parse REPO; EINVAL with the reason and the accepted forms when it is not one of them. */
export function parseRepoLocation(spec: string): RepoLocation {
  if (spec === '') throw new BdsnapError('EINVAL', 'empty --repo: give a directory or s3:http[s]://HOST[:PORT]/BUCKET[/PREFIX]');
  if (spec.startsWith('/') || spec.startsWith('.') || !SCHEME.test(spec)) return { kind: 'local', dir: spec };
  // A password in the URL is refused, and not repeated in the message.
  const shown = spec.replace(/\/\/[^/@]*@/, '//***@');
  const refuse = (why: string): BdsnapError => new BdsnapError('EINVAL',
    `--repo "${shown}": ${why}; a repository is a directory or ${FORM} (a local directory whose name has a colon: write ./${shown})`);
  const scheme = spec.slice(0, spec.indexOf(':')).toLowerCase();
  if (scheme !== 's3') throw refuse(`"${scheme}:" repositories are not supported`);
  const rest = spec.slice(3);
  if (!/^https?:\/\//i.test(rest)) throw refuse(`an S3 repository names its server with http:// or https://`);
  // URL parsing would resolve them silently, naming another bucket or prefix than the one written.
  if (/\/\.\.?(\/|$|\?|#)/.test(rest)) throw refuse('"." and ".." segments are not allowed');
  let url: URL;
  try {
    url = new URL(rest);
  } catch {
    throw refuse('not a valid URL');
  }
  if (url.username !== '' || url.password !== '') throw refuse('credentials never go in the URL (they would show in the process list); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE');
  if (url.search !== '' || url.hash !== '') throw refuse('no query or fragment is allowed');
  const [bucket = '', ...rawPrefix] = decodeURIComponent(url.pathname).split('/').slice(1);
  if (!BUCKET.test(bucket)) throw refuse(bucket === '' ? 'the bucket is missing' : `"${bucket}" is not a valid bucket name`);
  while (rawPrefix.length > 0 && rawPrefix[rawPrefix.length - 1] === '') rawPrefix.pop();
  const prefix = rawPrefix.join('/');
  if (prefix !== '') {
    try {
      checkObjectName(prefix);
    } catch {
      throw refuse(`the prefix "${prefix}" must be segments of letters, digits, '.', '_' and '-'`);
    }
  }
  return { kind: 's3', endpoint: `${url.protocol}//${url.host}`, bucket, prefix: prefix === '' ? '' : `${prefix}/` };
}

/**
 * The store REPO names. `create`: `init` is making the repository, so the bucket is created
 * when it is missing (a directory is created by the store's first write).
 */
export async function openRepoStore(spec: string, options: { create?: boolean; s3?: S3StoreOptions } = {}): Promise<ObjectStore> {
  const at = parseRepoLocation(spec);
  if (at.kind === 'local') return new LocalDirStore(at.dir);
  // Loaded only here: the SDK takes longer to load than the rest of the command line.
  const { S3Store } = await import('./s3-store.js');
  const store = new S3Store(at, options.s3);
  if (options.create) {
    try {
      await store.createBucket();
    } catch (err) {
      store.close();
      throw err;
    }
  }
  return store;
}
