/**
 * The recording shim (src/host/fs-trace.ts) is complete: the files that keep bdsnap's durable
 * state change files only through src/host/'s helpers, which report each call; and a real
 * session, recorded, shows its store writes, syncs, names and device writes.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { FileDevice } from '../../src/device/file-device.js';
import { fsTrace } from '../../src/host/fs-trace.js';
import { CowDevice } from '../../src/snapshot/index.js';
import { CrashRecorder } from '../helpers/crash-recorder.js';
import { makeTempDir } from '../../testkit/files.js';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

/** Every file (or folder, ending in '/') that writes the session store, snapshot storage, change maps, the registry, snapshot records or backup repositories. */
const WRITERS = [
  'src/snapshot/store.ts', 'src/snapshot/sessions.ts', 'src/snapshot/cow-device.ts', 'src/snapshot/snapshot-layer.ts', 'src/snapshot/diff-storage.ts',
  'src/snapshot/change-map/', 'src/snapshot/forget.ts', 'src/service/registry.ts', 'src/service/snapshots/', 'src/device/file-device.ts',
  'src/repository/object-store.ts', 'src/repository/repository.ts', 'src/repository/lock.ts', 'src/backup/create.ts',
];

/** Calls that change what a power loss keeps, made on `fs` directly instead of through src/host/. */
const RAW_MUTATION = /\bfs\.(?:promises\.)?(?:write|writeSync|writev|writevSync|writeFile|writeFileSync|appendFile|appendFileSync|fsync|fsyncSync|fdatasync|fdatasyncSync|rename|renameSync|unlink|unlinkSync|rm|rmSync|rmdir|rmdirSync|mkdir|mkdirSync|ftruncate|ftruncateSync|truncate|truncateSync|copyFile|copyFileSync|link|linkSync|symlink|symlinkSync|cp|cpSync)\b|promisify\(fs\.(?!close|read|stat|fstat)/;
/** An open that may create a file (or hand out a FileHandle that can sync and truncate). */
const RAW_OPEN = /\bfs\.(?:promises\.open|open|openSync)\(|promisify\(fs\.open\)/;
const READ_ONLY = /READ_FLAGS|O_RDONLY|'r'|'r\+'/;

function bypasses(line: string): boolean {
  return RAW_MUTATION.test(line) || (RAW_OPEN.test(line) && !READ_ONLY.test(line));
}

function codeLines(file: string): Array<{ n: number; text: string }> {
  const src = fs.readFileSync(path.join(REPO, file), 'utf8').replace(/\/\*[\s\S]*?\*\//g, (c) => c.replace(/[^\n]/g, ' '));
  return src.split('\n').map((text, i) => ({ n: i + 1, text: text.replace(/\/\/.*$/, '') }));
}

test('the writers of durable state reach the file system only through the recorded helpers of src/host/', () => {
  const found: string[] = [];
  const files = WRITERS.flatMap((w) => (w.endsWith('/') && fs.existsSync(path.join(REPO, w))
    ? fs.readdirSync(path.join(REPO, w)).filter((f) => f.endsWith('.ts')).map((f) => `${w}${f}`)
    : [w]));
  assert.ok(files.some((f) => f.startsWith('src/snapshot/change-map/')), 'the change map\'s modules are checked');
  for (const file of files) {
    if (!fs.existsSync(path.join(REPO, file))) continue;
    for (const { n, text } of codeLines(file)) {
      if (bypasses(text)) found.push(`${file}:${n}: ${text.trim()}`);
    }
  }
  assert.deepEqual(found, []);
});

test('the checker of bypasses catches a raw call', () => {
  for (const line of ["await fs.promises.rename(a, b);", "fs.fdatasyncSync(fd);", "const fd = fs.openSync(p, 'wx+', 0o600);", "const x = promisify(fs.ftruncate);", "await fs.promises.open(tmp, 'wx', mode)", 'const openAsync = promisify(fs.open);']) {
    assert.ok(bypasses(line), line);
  }
  for (const line of ["fd = fs.openSync(file, 'r+');", "fs.openSync(p, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW)", 'fs.fstatSync(fd)', 'promisify(fs.close)']) {
    assert.ok(!bypasses(line), line);
  }
});

test('a recorded session shows its names, store writes and syncs, and the device writes', async (t) => {
  const dir = makeTempDir(t, 'bdsnap-fs-trace-');
  const image = path.join(dir, 'disk.img');
  fs.writeFileSync(image, Buffer.alloc(64 * 1024, 7));
  assert.equal(fsTrace, undefined, 'nothing records unless a test installs a sink');
  const recorder = new CrashRecorder([dir]);
  const dev = await FileDevice.open(image);
  recorder.start();
  try {
    const cow = CowDevice.create(dev, { devicePath: image, snapshotRoot: path.join(dir, 'snap'), chunkSize: 4096, durability: 'strict', cloneMinBytes: Infinity });
    await cow.write(Buffer.alloc(4096, 1), 8192);
    await cow.flush();
    await cow.close();
  } finally {
    recorder.stop();
    await dev.close();
  }
  assert.equal(fsTrace, undefined);
  assert.deepEqual(recorder.unknown, []);
  const kinds = recorder.entries.map((e) => e.k);
  for (const k of ['mkdir', 'create', 'write', 'fsync', 'rename', 'dsync'] as const) assert.ok(kinds.includes(k), `records ${k}`);
  const imageId = recorder.initial.files.find((f) => f.path === fs.realpathSync(image))!.id;
  const deviceWrite = recorder.entries.findIndex((e) => e.k === 'write' && e.id === imageId);
  const storeSync = recorder.entries.findIndex((e) => e.k === 'fsync' && e.id !== imageId);
  assert.ok(storeSync >= 0 && deviceWrite > storeSync, 'strict: the store is synced before the device write');
  assert.ok(recorder.entries.some((e, i) => i > deviceWrite && e.k === 'fsync' && e.id === imageId), 'the flush syncs the device');
});
