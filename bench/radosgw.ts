/** `--s3 start` of the bench tools: a throwaway radosgw (scripts/ceph-rgw-up.sh), its keys put in the environment. */

import { execFileSync } from 'node:child_process';
import path from 'node:path';

export function startRadosgw(): { endpoint: string; stop(): void } {
  const scripts = path.resolve(import.meta.dirname, '../../scripts');
  const out = execFileSync('bash', [path.join(scripts, 'ceph-rgw-up.sh'), 'bluestore'], { encoding: 'utf8', timeout: 180_000 });
  const value = (key: string): string => new RegExp(`^${key}=(.*)$`, 'm').exec(out)?.[1] ?? '';
  process.env.AWS_ACCESS_KEY_ID = value('AWS_ACCESS_KEY_ID');
  process.env.AWS_SECRET_ACCESS_KEY = value('AWS_SECRET_ACCESS_KEY');
  const dir = value('CEPH_DIR');
  return { endpoint: value('S3_ENDPOINT'), stop: () => execFileSync('bash', [path.join(scripts, 'ceph-rgw-down.sh'), dir]) };
}
