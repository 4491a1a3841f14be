/**
 * Stores written by earlier code stay readable and restorable: the committed fixtures of
 * fixtures/stores.json (see fixtures/write-store-fixtures.ts) are scanned, recovered, restored and
 * served exactly, byte for byte.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { FileDevice } from '../../src/device/file-device.js';
import { readDeviceStamp } from '../../src/host/device-stamp.js';
import { DATA_FILE, MANIFEST_FILE, sessionDirName } from '../../src/snapshot/format.js';
import { scanData } from '../../src/snapshot/store-scan.js';
import { DiffStorage, SnapshotLayer, recoverSession, restore } from '../../src/snapshot/index.js';
import { STORE_FIXTURES, pattern, type FixtureWrite } from './fixtures/store-fixtures.js';
import { tempDir } from './helpers.js';

const STORES_FILE = fileURLToPath(new URL('../../../test/snapshot/fixtures/stores.json', import.meta.url));
const STORES = (JSON.parse(fs.readFileSync(STORES_FILE, 'utf8')) as { files: Record<string, string> }).files;

/** The files of fixture store `name`, by file name. */
function storeFiles(name: string): Array<[string, Buffer]> {
  return Object.entries(STORES).filter(([p]) => p.startsWith(`${name}/`)).map(([p, b64]) => [p.slice(name.length + 1), Buffer.from(b64, 'base64')]);
}

/** Store `name`'s files written into `dir` (mode 0600). */
function placeStore(name: string, dir: string): void {
  for (const [file, bytes] of storeFiles(name)) fs.writeFileSync(path.join(dir, file), bytes, { mode: 0o600 });
}
const SESSION = STORE_FIXTURES.session;
const DIFF = STORE_FIXTURES.diff;

function applied(sizeBytes: number, seed: number, writes: readonly FixtureWrite[]): Buffer {
  const out = pattern(sizeBytes, seed, 0);
  for (const w of writes) pattern(w.length, w.seed, w.offset).copy(out, w.offset);
  return out;
}

/**
 * The fixture session `name` under a snapshot root of `dir`, recorded against `image` (a copy of
 * the device as the session left it). Only the manifest's device fields change: the session was
 * written against a device of the machine that made it.
 */
async function placeSession(dir: string, name: string): Promise<{ sessionDir: string; image: string }> {
  const image = path.join(dir, 'disk.img');
  fs.writeFileSync(image, applied(SESSION.sizeBytes, SESSION.seed, SESSION.writes));
  const manifestText = Buffer.from(STORES[`${name}/${MANIFEST_FILE}`]!, 'base64').toString('utf8');
  const manifest = JSON.parse(manifestText) as Record<string, unknown>;
  const sessionDir = path.join(dir, 'root', sessionDirName(image, new Date(manifest.mountTime as string)));
  fs.mkdirSync(sessionDir, { recursive: true });
  placeStore(name, sessionDir);
  delete manifest.startStamp;
  const endStamp = manifest.state === 'complete' ? { endStamp: await readDeviceStamp(image) } : {};
  fs.writeFileSync(path.join(sessionDir, MANIFEST_FILE), JSON.stringify({ ...manifest, ...endStamp, devicePath: image }));
  return { sessionDir, image };
}

async function scan(file: string, allowTornTail: boolean): Promise<Awaited<ReturnType<typeof scanData>>> {
  const fd = fs.openSync(file, 'r');
  try {
    return await scanData(fd, { chunkSize: SESSION.chunkSize, deviceSize: SESSION.sizeBytes, allowTornTail, where: DATA_FILE });
  } finally {
    fs.closeSync(fd);
  }
}

/** The records of both session fixtures: a copied run, a cloned-layout run sealed later, and the device's last chunk. */
const SESSION_RECORDS = [
  { position: 0, firstChunk: 0, payloadBytes: 8192, payloadPosition: 64, cloned: false },
  { position: 8256, firstChunk: 3, payloadBytes: 303_104, payloadPosition: 12_288, cloned: true },
  { position: 315_392, firstChunk: 127, payloadBytes: 4096, payloadPosition: 315_456, cloned: false },
];

test('a session store closed cleanly by earlier code scans to its records and restores the device exactly', { timeout: 30_000 }, async (t) => {
  const dir = tempDir(t);
  const { sessionDir, image } = await placeSession(dir, SESSION.completeDir);
  const scanned = await scan(path.join(sessionDir, DATA_FILE), false);
  assert.deepEqual(scanned.records, SESSION_RECORDS);
  assert.equal(scanned.validBytes, scanned.fileBytes);
  assert.deepEqual(scanned.unsealed, []);

  const output = path.join(dir, 'restored.img');
  const summary = await restore(sessionDir, { output });
  assert.equal(summary.digestCheck, 'verified');
  assert.ok(fs.readFileSync(output).equals(pattern(SESSION.sizeBytes, SESSION.seed, 0)), 'the restored copy is the device at the mount');
  assert.ok(fs.readFileSync(image).equals(applied(SESSION.sizeBytes, SESSION.seed, SESSION.writes)), 'the device is left alone');
});

test('a session store left by a kill under earlier code is recovered (torn tail cut, clone sealed) and restores the device exactly', { timeout: 30_000 }, async (t) => {
  const dir = tempDir(t);
  const { sessionDir } = await placeSession(dir, SESSION.killedDir);
  const before = await scan(path.join(sessionDir, DATA_FILE), true);
  assert.deepEqual(before.records, SESSION_RECORDS);
  assert.match(before.tornReason ?? '', /truncated record header at byte 319552/);
  assert.deepEqual(before.unsealed.map((u) => u.position), [8256]);

  const info = await recoverSession(sessionDir);
  assert.equal(info.state, 'interrupted');
  const after = await scan(path.join(sessionDir, DATA_FILE), false);
  assert.deepEqual(after.records, SESSION_RECORDS, 'recovery keeps every record and seals the cloned one');

  const output = path.join(dir, 'restored.img');
  await restore(sessionDir, { output });
  assert.ok(fs.readFileSync(output).equals(pattern(SESSION.sizeBytes, SESSION.seed, 0)), 'the restored copy is the device at the mount');
});

test('a difference storage over two directories written by earlier code opens and serves every image exactly', { timeout: 30_000 }, async (t) => {
  const dir = tempDir(t);
  const dirs = DIFF.dirs.map((name) => {
    const d = path.join(dir, name);
    fs.mkdirSync(d, { mode: 0o700 });
    placeStore(name, d);
    return d;
  });
  // Its `.dirs` file named the directories it was written in: written again naming these.
  fs.writeFileSync(path.join(dirs[0]!, `${DIFF.id}.dirs`), JSON.stringify({ dirs, files: 2, sealedFiles: 1 }), { mode: 0o600 });

  const storage = await DiffStorage.open({ id: DIFF.id, dirs: [dirs[0]!], chunkSize: DIFF.chunkSize });
  t.after(() => storage.close());
  assert.equal(storage.state, 'ok');
  assert.equal(storage.usage().usedBytes, fs.statSync(path.join(dirs[0]!, `${DIFF.id}.0.diff`)).size + fs.statSync(path.join(dirs[1]!, `${DIFF.id}.1.diff`)).size);
  for (const d of DIFF.devices) {
    const writes = (kind: 'device' | 'image'): FixtureWrite[] => DIFF.steps.flatMap((s) => (s.kind === kind && s.key === d.key ? [s] : []));
    const imagePath = path.join(dir, `device-${d.key}.img`);
    fs.writeFileSync(imagePath, applied(DIFF.sizeBytes, d.seed, writes('device')));
    const dev = await FileDevice.open(imagePath);
    const layer = new SnapshotLayer(dev, { chunkSize: DIFF.chunkSize });
    await layer.hold();
    const image = layer.addPoint(storage, d.key);
    layer.release();
    const seen = Buffer.alloc(DIFF.sizeBytes);
    await image.read(seen, 0);
    assert.ok(seen.equals(applied(DIFF.sizeBytes, d.seed, writes('image'))), `device ${d.key}: the image is the device at its point, with the image's writes`);
    await layer.removePoint(image);
    await layer.close();
    await dev.close();
  }
  await storage.close();
  for (const [i, name] of DIFF.dirs.entries()) {
    for (const [file, bytes] of storeFiles(name)) assert.ok(fs.readFileSync(path.join(dirs[i]!, file)).equals(bytes), `${name}/${file} is read, never written`);
  }
});
