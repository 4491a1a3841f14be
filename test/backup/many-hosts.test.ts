/**
 * Many hosts, one repository, as real processes: two `backup create` with different --host at
 * the same time through the daemon (identical data stored once after prune; each restores exactly); locks
 * of another host respected while fresh and taken over when stale; `forget` + `prune` while a
 * create of another host is in progress (held in its own process after it listed the stored
 * pieces, the moment it counts on them) never delete what that create names; and a create whose
 * lock a prune took over as stale refuses to commit instead of naming deleted pieces.
 */

import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { LocalDirStore, Repository, createBackup } from '../../src/backup/index.js';
import { LOCKS_PREFIX, manifestObject, newBackupId } from '../../src/repository/format.js';
import { STALE_MS } from '../../src/repository/lock.js';
import { TEST_REPO_PASSWORD, ok, sandbox, startDaemon, type Sandbox } from '../../testkit/daemon.js';
import { makeImage, makeTempDir, sha256File } from '../../testkit/files.js';
import { run, type RunResult } from '../../testkit/process.js';
import { BDSNAP_MAIN } from '../../testkit/server.js';
import { TEST_SCRYPT } from './helpers.js';
import { dirBytes } from '../../testkit/files.js';

const MiB = 1024 * 1024;
const CHILD = fileURLToPath(new URL('./fixtures/held-create-child.js', import.meta.url));

/** The environment of every command here: the repository password, as a sandbox gives it. */
const ENV = { ...process.env, BDSNAP_REPO_PASSWORD: TEST_REPO_PASSWORD };

function bdsnap(args: string[], env: NodeJS.ProcessEnv = ENV): Promise<RunResult> {
  return run(process.execPath, [BDSNAP_MAIN, 'backup', ...args], { allowFailure: true, timeoutMs: 120_000, env });
}

function succeeded(r: RunResult): string {
  assert.equal(r.exitCode, 0, `${r.command}: ${r.stderr}`);
  return r.stdout;
}

async function restoresExactly(repoDir: string, id: string, device: string, out: string): Promise<void> {
  succeeded(await bdsnap(['restore', '--repo', repoDir, id, device, '--output', out]));
  assert.equal(await sha256File(out), await sha256File(device), `backup ${id} restores ${device} exactly`);
  fs.rmSync(out);
}

function openRepo(repoDir: string): Promise<Repository> {
  return Repository.open(new LocalDirStore(repoDir), { password: () => TEST_REPO_PASSWORD });
}

function initRepo(repoDir: string): Promise<Repository> {
  return Repository.init(new LocalDirStore(repoDir), { pieceSizeBytes: 64 * 1024, password: TEST_REPO_PASSWORD, scrypt: TEST_SCRYPT });
}

async function piecesOf(repoDir: string, id: string): Promise<Set<string>> {
  const m = await (await openRepo(repoDir)).manifest(id);
  return new Set(m.devices.flatMap((d) => d.pieces.filter((p): p is string => typeof p === 'string')));
}

function lockFiles(repoDir: string): string[] {
  const dir = path.join(repoDir, LOCKS_PREFIX);
  return fs.existsSync(dir) ? fs.readdirSync(dir).map((n) => path.join(dir, n)) : [];
}

/** Make a lock object look as if its holder stopped refreshing it longer ago than STALE_MS. */
function ageLock(file: string): void {
  const then = new Date(Date.now() - STALE_MS - 60_000);
  fs.utimesSync(file, then, then);
}

/** A lock object as another host's bdsnap writes it. */
function foreignLock(repoDir: string, kind: 'create' | 'prune'): string {
  const file = path.join(repoDir, `${LOCKS_PREFIX}${newBackupId()}.${kind}`);
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, `${JSON.stringify({ kind, host: 'elsewhere', pid: 4242, processStart: null, createdAt: new Date().toISOString() })}\n`);
  return file;
}

interface HeldCreate {
  /** Resolves once the create holds its lock, has listed the stored pieces and waits at its first read. */
  reading: Promise<void>;
  /** Let it go on; resolves with its last line and exit code. */
  release(): Promise<{ line: string; exitCode: number | null }>;
}

/** A `createBackup` of `image` as `host` in its own process, held at its first read (fixtures/held-create-child.ts). */
function heldCreate(t: TestContext, repoDir: string, image: string, host: string): HeldCreate {
  const child = spawn(process.execPath, [CHILD, repoDir, image, host], { env: { ...ENV, BDSNAP_HELD_CREATE_CHILD: '1' }, stdio: ['pipe', 'pipe', 'pipe'] });
  t.after(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  let stderr = '';
  child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
  const lines: string[] = [];
  const exited = once(child, 'exit') as Promise<[number | null, NodeJS.Signals | null]>;
  const rl = readline.createInterface({ input: child.stdout });
  const reading = new Promise<void>((resolve, reject) => {
    rl.on('line', (line) => {
      lines.push(line);
      if (line === 'reading') resolve();
    });
    void exited.then(([code]) => reject(new Error(`the create exited (${code}) before it read: ${lines.join(' | ')} ${stderr}`)));
  });
  reading.catch(() => undefined);
  return {
    reading,
    release: async () => {
      child.stdin.end('go\n');
      const [exitCode] = await exited;
      rl.close();
      return { line: lines.filter((l) => l !== 'reading').join(' | ') || stderr, exitCode };
    },
  };
}

/**
 * A new repository in which host web1 has backed up an image (in this process), and host web2's
 * create of a copy of it (`b`) in its own process, held after it listed the stored pieces.
 */
async function web2ReadingAfterWeb1(t: TestContext, prefix: string) {
  const dir = makeTempDir(t, prefix);
  const repoDir = path.join(dir, 'repo');
  const repo = await initRepo(repoDir);
  const a = makeImage(path.join(dir, 'a.img'), 8 * MiB, 'mixed', 5);
  const b = path.join(dir, 'b.img');
  fs.copyFileSync(a, b);
  const fd = fs.openSync(a, 'r');
  t.after(() => fs.closeSync(fd));
  const first = await createBackup(repo, [{ device: a, sizeBytes: 8 * MiB, changed: null, why: 'test', read: async (target, o) => void fs.readSync(fd, target, 0, target.length, o) }], { host: 'web1' });
  const create = heldCreate(t, repoDir, b, 'web2');
  await create.reading;
  return { dir, repoDir, repo, b, first, create };
}

test('two hosts back up copies of one image at the same time: stored once after prune, each restores exactly', { timeout: 240_000 }, async (t) => {
  const box: Sandbox = sandbox(t);
  await startDaemon(t, { sandbox: box, password: false });
  type Summary = { id: string; host: string; startTime: string; endTime: string; newStoredBytes: number };
  const overlapped = (x: Summary, y: Summary): boolean => x.startTime < y.endTime && y.startTime < x.endTime;
  // Two processes at once, as two hosts would run them. On a loaded machine one may start only
  // after the other ended (node's start-up alone can take most of a second): then the same
  // again, in a new repository, with images that take longer to back up.
  let a = '', b = '', c = '', repoDir = '';
  let sa: Summary | undefined, sb: Summary | undefined;
  for (const mib of [64, 256]) {
    fs.rmSync(path.join(box.top, 'repo'), { recursive: true, force: true });
    a = makeImage(path.join(box.top, 'a.img'), mib * MiB, 'mixed', 7);
    b = path.join(box.top, 'b.img');
    c = path.join(box.top, 'c.img');
    fs.copyFileSync(a, b);
    fs.copyFileSync(a, c);
    repoDir = path.join(box.top, 'repo');
    ok(box, ['backup', 'init', '--repo', repoDir]);
    const [ra, rb] = await Promise.all([
      bdsnap(['create', a, '--repo', repoDir, '--host', 'web1', '--json'], box.env),
      bdsnap(['create', b, '--repo', repoDir, '--host', 'web2', '--json'], box.env),
    ]);
    sa = JSON.parse(succeeded(ra)) as Summary;
    sb = JSON.parse(succeeded(rb)) as Summary;
    if (overlapped(sa, sb)) break;
    t.diagnostic(`the creates of ${mib} MiB ran one after the other (${sa.startTime}..${sa.endTime}, ${sb.startTime}..${sb.endTime}): again with larger images`);
  }
  assert.ok(sa && sb);
  assert.deepEqual([sa.host, sb.host], ['web1', 'web2']);
  assert.ok(overlapped(sa, sb), `the two creates overlapped in time (${sa.startTime}..${sa.endTime}, ${sb.startTime}..${sb.endTime})`);
  const pa = await piecesOf(repoDir, sa.id);
  const pb = await piecesOf(repoDir, sb.id);
  assert.deepEqual(pb, pa, 'both hosts name the same pieces');
  let stored = await (await openRepo(repoDir)).storedPieces();
  assert.deepEqual(new Set(stored.keys()), pa, 'every piece they name is stored');
  const once_ = [...stored.values()].reduce((n, s) => n + s, 0);
  // Each create packs what was not stored when it began, so two at once may both pack a piece
  // (restic's packs do the same); prune keeps one copy of each.
  const concurrent = dirBytes(path.join(repoDir, 'packs'));
  assert.ok(concurrent >= once_ && concurrent <= 2 * once_, `the packs hold each piece once or twice (${concurrent} B for ${once_} B)`);
  succeeded(await bdsnap(['prune', '--repo', repoDir], box.env));
  stored = await (await openRepo(repoDir)).storedPieces();
  assert.deepEqual(new Set(stored.keys()), pa, 'each piece stored once');
  assert.equal([...stored.values()].reduce((n, s) => n + s, 0), once_);
  assert.equal(dirBytes(path.join(repoDir, 'packs')), once_, 'no extra copies or temp files');
  t.diagnostic(`concurrent: web1 wrote ${sa.newStoredBytes} B, web2 ${sb.newStoredBytes} B; the packs held ${concurrent} B, after prune ${once_} B of pieces for both`);

  // A third host afterwards: only its manifest is added.
  const before = dirBytes(repoDir);
  const sc = JSON.parse(succeeded(await bdsnap(['create', c, '--repo', repoDir, '--host', 'web3', '--json'], box.env))) as Summary;
  const added = dirBytes(repoDir) - before;
  const manifestBytes = fs.statSync(path.join(repoDir, manifestObject(sc.id))).size;
  t.diagnostic(`web3 afterwards: ${sc.newStoredBytes} B of new pieces, ${added} B added to the repository (its manifest: ${manifestBytes} B)`);
  assert.equal(sc.newStoredBytes, 0);
  assert.equal(added, manifestBytes);

  const listed = JSON.parse(succeeded(await bdsnap(['list', '--repo', repoDir, '--json']))) as Array<{ id: string; host: string }>;
  assert.deepEqual(new Map(listed.map((l) => [l.id, l.host])), new Map([[sa.id, 'web1'], [sb.id, 'web2'], [sc.id, 'web3']]));
  const out = path.join(box.top, 'out.img');
  await restoresExactly(repoDir, sa.id, a, out);
  await restoresExactly(repoDir, sb.id, b, out);
  await restoresExactly(repoDir, sc.id, c, out);
  succeeded(await bdsnap(['verify', '--repo', repoDir]));
});

test('locks of another host: respected while fresh, taken over when stale', { timeout: 120_000 }, async (t) => {
  const dir = makeTempDir(t, 'bdsnap-hostlocks-');
  const repoDir = path.join(dir, 'repo');
  await initRepo(repoDir);
  const image = makeImage(path.join(dir, 'a.img'), 4 * MiB, 'mixed', 3);

  // A prune of another host: a create waits for it while it is fresh, goes on once it is stale.
  const prune = foreignLock(repoDir, 'prune');
  let create = heldCreate(t, repoDir, image, 'web1');
  let end = await create.release();
  assert.equal(end.exitCode, 1, end.line);
  assert.match(end.line, /^failed EBUSY: a prune is running in .* \(locks\/.*\.prune, pid 4242 on elsewhere\)/);
  ageLock(prune);
  create = heldCreate(t, repoDir, image, 'web1');
  await create.reading;
  end = await create.release();
  assert.equal(end.exitCode, 0, end.line);
  const id = /^done (\S+)/.exec(end.line)![1]!;

  // A create of another host: prune is refused while it is fresh, runs (and removes it) once stale.
  const other = foreignLock(repoDir, 'create');
  const refused = await bdsnap(['prune', '--repo', repoDir]);
  assert.equal(refused.exitCode, 1);
  assert.match(refused.stderr, /^bdsnap: a backup is being created in .* \(locks\/.*\.create, pid 4242 on elsewhere\); try again when it is done\n$/);
  ageLock(other);
  const pruned = JSON.parse(succeeded(await bdsnap(['prune', '--repo', repoDir, '--json']))) as { deletedLocks: number };
  assert.equal(pruned.deletedLocks, 2, 'the stale create lock and the stale prune lock are gone');
  assert.deepEqual(lockFiles(repoDir), []);
  await restoresExactly(repoDir, id, image, path.join(dir, 'out.img'));
});

test('forget + prune while another host creates: nothing the create names is deleted; it commits and restores exactly', { timeout: 120_000 }, async (t) => {
  // web2 has listed the stored pieces (all of web1's) and counts on them: it will not write them.
  const { dir, repoDir, b, first, create } = await web2ReadingAfterWeb1(t, 'bdsnap-hostprune-');
  succeeded(await bdsnap(['forget', '--repo', repoDir, '--host', 'web1', '--keep-within', '1s', '--dry-run']));
  succeeded(await bdsnap(['forget', '--repo', repoDir, first.id]));
  const prune = await bdsnap(['prune', '--repo', repoDir]);
  assert.equal(prune.exitCode, 1, `prune must not run while web2 creates: ${prune.stdout}`);
  assert.match(prune.stderr, new RegExp(`a backup is being created .* on ${os.hostname()}\\); try again when it is done`));

  const end = await create.release();
  assert.equal(end.exitCode, 0, end.line);
  const [, id, newBytes] = /^done (\S+) (\d+)$/.exec(end.line)!;
  assert.equal(Number(newBytes), 0, 'web2 stored nothing new: it reused what web1 stored');
  const out = path.join(dir, 'out.img');
  await restoresExactly(repoDir, id!, b, out);
  const pruned = JSON.parse(succeeded(await bdsnap(['prune', '--repo', repoDir, '--json']))) as { deletedPieces: number };
  assert.equal(pruned.deletedPieces, 0, 'web2 names every piece web1 had');
  succeeded(await bdsnap(['verify', '--repo', repoDir]));
  await restoresExactly(repoDir, id!, b, out);
});

test('a create whose lock a prune took over as stale refuses to commit; the repository stays whole', { timeout: 120_000 }, async (t) => {
  // web2 stalls (as a paused VM or a stopped process would) past STALE_MS after it listed the pieces.
  const { dir, repoDir, repo, b, first, create } = await web2ReadingAfterWeb1(t, 'bdsnap-stalecreate-');
  const [lock] = lockFiles(repoDir);
  assert.ok(lock);
  ageLock(lock);
  succeeded(await bdsnap(['forget', '--repo', repoDir, first.id]));
  const pruned = JSON.parse(succeeded(await bdsnap(['prune', '--repo', repoDir, '--json']))) as { deletedPieces: number; deletedLocks: number };
  assert.ok(pruned.deletedPieces > 0 && pruned.deletedLocks === 1, JSON.stringify(pruned));

  const end = await create.release();
  assert.equal(end.exitCode, 1, `the create must not commit a backup whose pieces a prune deleted: ${end.line}`);
  assert.match(end.line, /^failed EBUSY: this backup's lock .* was taken over .*; nothing was recorded; run the backup again/);
  assert.deepEqual(await repo.backupIds(), []);
  succeeded(await bdsnap(['verify', '--repo', repoDir]));

  // Run again, it stores what it needs.
  const again = heldCreate(t, repoDir, b, 'web2');
  await again.reading;
  const done = await again.release();
  assert.equal(done.exitCode, 0, done.line);
  await restoresExactly(repoDir, /^done (\S+)/.exec(done.line)![1]!, b, path.join(dir, 'out.img'));
  succeeded(await bdsnap(['verify', '--repo', repoDir]));
});
