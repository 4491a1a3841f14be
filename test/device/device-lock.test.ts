/**
 * The device lock under a real race: two processes take and release the lock of one image
 * hundreds of times, some of them dying with the lock held (a stale lock that must be taken
 * over exactly once). At no moment may two processes hold it.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { acquireDeviceLock, lockDirectory } from '../../src/device/device-lock.js';
import { FileDevice } from '../../src/device/file-device.js';
import { processStartTimeSync } from '../../src/host/processes.js';
import { needs } from '../../testkit/needs.js';
import type { DeviceIdentity } from '../../src/device/block-device.js';
import { BdsnapError } from '../../src/errors.js';
import { makeImage, makeTempDir } from '../../testkit/files.js';
import { spawnZombie } from '../../testkit/process.js';

const RACER = fileURLToPath(new URL('./fixtures/lock-racer.js', import.meta.url));

interface RacerResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  held: number;
  stdout: string;
  stderr: string;
}

function race(image: string, marker: string, count: number, killRate: number, lockDir: string): Promise<RacerResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [RACER, image, marker, String(count), String(killRate)], {
      env: { ...process.env, BDSNAP_LOCK_RACER: '1', BDSNAP_LOCK_DIR: lockDir },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => { stdout += d.toString(); });
    child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
    child.once('error', reject);
    child.once('close', (code, signal) => {
      const held = Number(/HELD (\d+)/.exec(stdout)?.[1] ?? 0);
      resolve({ code, signal, held, stdout, stderr });
    });
  });
}

function identityOf(image: string): DeviceIdentity {
  const st = fs.statSync(image);
  return { kind: 'file', dev: st.dev, ino: st.ino, rdev: st.rdev };
}

test('two processes racing for the lock never hold it together, stale locks included', { timeout: 120_000 }, async (t) => {
  const dir = makeTempDir(t, 'bdsnap-lockrace-');
  const lockDir = path.join(dir, 'locks');
  const image = path.join(dir, 'disk.img');
  makeImage(image, 4096, 0);
  const marker = path.join(dir, 'holder');
  const TOTAL = 600;
  let total = 0;
  let kills = 0;
  // Two lanes, each respawning its racer when it dies holding the lock.
  const lane = async (): Promise<void> => {
    while (total < TOTAL) {
      const r = await race(image, marker, 150, 0.02, lockDir);
      assert.doesNotMatch(r.stdout, /DOUBLE/, `two holders at once: ${r.stdout}`);
      assert.ok(r.code === 0 || r.signal === 'SIGKILL', `racer failed (${r.code ?? r.signal}): ${r.stderr}`);
      if (r.signal === 'SIGKILL') kills++;
      total += r.held;
    }
  };
  await Promise.all([lane(), lane()]);
  assert.ok(total >= TOTAL, `${total} acquisitions`);
  assert.ok(kills >= 2, `some racers died holding the lock (${kills}), so stale locks were taken over`);
  // Whatever the last racer left (a stale lock or none), a new opener gets the lock, and the
  // directory holds nothing but it and takeover markers.
  const lock = await withLockDir(lockDir, () => acquireDeviceLock(image, identityOf(image)));
  await lock.release();
  const left = fs.readdirSync(lockDir).filter((n) => !n.includes('.stale-'));
  assert.deepEqual(left, [], 'no lock or temporary file is left behind');
});

test('a live owner keeps the lock; a dead one, or a reused pid, loses it', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-lock-');
  const lockDir = path.join(dir, 'locks');
  const image = path.join(dir, 'disk.img');
  makeImage(image, 4096, 0);
  const identity = identityOf(image);
  await withLockDir(lockDir, async () => {
    const first = await acquireDeviceLock(image, identity);
    await assert.rejects(acquireDeviceLock(image, identity), (e: unknown) => e instanceof BdsnapError && e.code === 'EBUSY' && /this process/.test(e.message));
    await first.release();
    const [name] = fs.readdirSync(lockDir);
    assert.equal(name, undefined, 'released');
    // A lock of this very pid with another start time: the pid was reused, so it is stale.
    const file = path.join(lockDir, `file-${identity.dev}-${identity.ino}.lock`);
    fs.writeFileSync(file, `${process.pid}\n1\n${image}\n`);
    const second = await acquireDeviceLock(image, identity);
    assert.match(fs.readFileSync(file, 'utf8'), new RegExp(`^${process.pid}\\n\\d+\\n`));
    assert.notEqual(fs.readFileSync(file, 'utf8').split('\n')[1], '1', 'replaced by our own lock');
    await second.release();
    assert.equal(fs.existsSync(file), false);
  });
});

test('a lock whose owner is a zombie (exited, not yet reaped) is stale and taken over', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-lock-');
  const lockDir = path.join(dir, 'locks');
  fs.mkdirSync(lockDir, { mode: 0o700 });
  const image = path.join(dir, 'disk.img');
  makeImage(image, 4096, 0);
  const identity = identityOf(image);
  const zombie = await spawnZombie(t);
  const file = path.join(lockDir, `file-${identity.dev}-${identity.ino}.lock`);
  await withLockDir(lockDir, async () => {
    // With the start time the zombie had, and in the older form without one.
    for (const content of [`${zombie.pid}\n${zombie.startTime}\n${image}\n`, `${zombie.pid}\n`]) {
      fs.writeFileSync(file, content);
      const lock = await acquireDeviceLock(image, identity);
      assert.match(fs.readFileSync(file, 'utf8'), new RegExp(`^${process.pid}\\n`), 'taken over');
      await lock.release();
    }
  });
});

test('a taker-over killed between winning a stale lock and replacing it does not lock the device out', { timeout: 60_000 }, async (t) => {
  if (!needs(t, { tools: ['strace'] })) return;
  const dir = makeTempDir(t, 'bdsnap-lock-');
  const lockDir = path.join(dir, 'locks');
  const image = path.join(dir, 'disk.img');
  makeImage(image, 4096, 0);
  const holder = path.join(dir, 'holder');
  // A racer that dies holding the lock leaves it stale.
  const dead = await race(image, holder, 1, 1, lockDir);
  assert.equal(dead.signal, 'SIGKILL', dead.stderr);
  // Racers killed (strace) at the rename that would replace it: the first wins the lock's
  // marker, the second the dead first's marker; each leaves its marker and the stale lock.
  for (let i = 1; i <= 2; i++) {
    const r = spawnSync('strace', ['-f', '-qq', '-o', '/dev/null', '-e', 'trace=rename,renameat,renameat2', '-e', 'inject=rename,renameat,renameat2:signal=SIGKILL',
      process.execPath, RACER, image, holder, '1', '0'], { env: { ...process.env, BDSNAP_LOCK_RACER: '1', BDSNAP_LOCK_RACER_ONCE: '1', BDSNAP_LOCK_DIR: lockDir }, encoding: 'utf8', timeout: 30_000 });
    assert.equal(r.signal, 'SIGKILL', `killed at its rename: ${r.stdout}${r.stderr}`);
    assert.equal(fs.readdirSync(lockDir).filter((n) => n.includes('.stale-')).length, i, `${i} dead markers: ${fs.readdirSync(lockDir).join(', ')}`);
  }
  const lock = await withLockDir(lockDir, () => acquireDeviceLock(image, identityOf(image)));
  assert.match(fs.readFileSync(path.join(lockDir, `file-${identityOf(image).dev}-${identityOf(image).ino}.lock`), 'utf8'), new RegExp(`^${process.pid}\\n`), 'taken over at once');
  await lock.release();
});

/** Run `script` as the unprivileged user nobody; false if it failed (as an attack should). */
function asNobody(script: string): boolean {
  try {
    execFileSync('runuser', ['-u', 'nobody', '--', 'sh', '-c', script], { stdio: 'pipe' });
    return true;
  } catch {
    return false;
  }
}

test('another user can neither make the lock directory, nor plant, read or remove a lock in it', async (t) => {
  if (!needs(t, { root: true, tools: ['runuser'] })) return;
  const dir = makeTempDir(t, 'bdsnap-lock-');
  // nobody may pass through the test's directory into one like /run/lock (world-writable, sticky).
  fs.chmodSync(dir, 0o711);
  const shared = path.join(dir, 'shared');
  fs.mkdirSync(shared);
  fs.chmodSync(shared, 0o1777);
  const lockDir = path.join(shared, 'bdsnap');
  const image = path.join(dir, 'disk.img');
  makeImage(image, 4096, 0);
  const identity = identityOf(image);
  const lockName = `file-${identity.dev}-${identity.ino}.lock`;

  // nobody makes the directory first and plants a lock naming a live process (init).
  assert.ok(asNobody(`mkdir -m 777 ${lockDir} && printf '1\\n${processStartTimeSync(1)}\\n' > ${lockDir}/${lockName}`));
  await withLockDir(lockDir, async () => {
    const refused = (e: unknown): boolean => e instanceof BdsnapError && e.code === 'EPERM' && /lock directory is not safe: .* owned by uid \d+, not by this user/.test(e.message);
    await assert.rejects(acquireDeviceLock(image, identity), refused);
    await assert.rejects(FileDevice.open(image), refused);
  });
  fs.rmSync(lockDir, { recursive: true });

  await withLockDir(lockDir, async () => {
    const first = await FileDevice.open(image);
    assert.equal(fs.statSync(lockDir).mode & 0o777, 0o700, 'the directory is made private');
    assert.equal(fs.statSync(path.join(lockDir, lockName)).mode & 0o777, 0o600, 'the lock (which names the image) is private');
    assert.equal(asNobody(`cat ${lockDir}/${lockName}`), false, 'nobody cannot read the lock');
    assert.equal(asNobody(`rm -f ${lockDir}/${lockName}`), false, 'nobody cannot remove the lock');
    assert.equal(asNobody(`echo 1 > ${lockDir}/planted.lock`), false, 'nobody cannot plant a lock');
    // Two opens of one image still exclude each other, and the refusal names the holder.
    await assert.rejects(FileDevice.open(image), (e: unknown) => e instanceof BdsnapError && e.code === 'EBUSY' && /already open by this process/.test(e.message));
    await first.close();
    const second = await FileDevice.open(image);
    await second.close();
  });
  // Without an override, root's locks are not in a directory others may write.
  const defaultParent = fs.statSync(path.dirname(lockDirectory()));
  if (process.env.BDSNAP_LOCK_DIR === undefined) assert.equal(defaultParent.mode & 0o022, 0, `${path.dirname(lockDirectory())} is writable by others`);
});

async function withLockDir<T>(dir: string, fn: () => Promise<T>): Promise<T> {
  const before = process.env.BDSNAP_LOCK_DIR;
  process.env.BDSNAP_LOCK_DIR = dir;
  try {
    return await fn();
  } finally {
    if (before === undefined) delete process.env.BDSNAP_LOCK_DIR;
    else process.env.BDSNAP_LOCK_DIR = before;
  }
}
