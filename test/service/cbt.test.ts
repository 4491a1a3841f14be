/**
 * Change-block tracking through the real daemon: an incremental copy made with standard
 * tools only (nbdcopy for the full copy, the image's qemu:dirty-bitmap context read by
 * nbdinfo and libnbd's Python binding for the changed extents), also across a SIGKILL of the
 * daemon; an image file changed while the daemon was stopped resets the generation with an
 * event; and the `cbt` commands.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { NbdClient } from '../../src/nbd/client.js';
import { cli, daemonUri, ok, sandbox, startDaemon, type Sandbox } from '../../testkit/daemon.js';
import { makeImage } from '../../testkit/files.js';
import { nbdshEnv } from '../../testkit/process.js';

const IMAGE_BYTES = 32 << 20;

interface Snap {
  id: string;
  images: Array<{ device: string; exportName: string; cbt: { generation: string; number: number } | null }>;
}

function snapshot(box: Sandbox, device: string): Snap {
  return JSON.parse(ok(box, ['snapshot', 'create', device, '--json'])) as Snap;
}

/** Make the daemon serve an idle device (a snapshot taken and dropped registers it). */
function register(box: Sandbox, device: string): void {
  ok(box, ['snapshot', 'destroy', snapshot(box, device).id]);
}

async function writeSome(box: Sandbox, device: string, count: number, seed: number): Promise<void> {
  const client = await NbdClient.connect({ socketPath: path.join(box.runDir, 'nbd.sock'), exportName: device });
  let x = seed;
  for (let i = 0; i < count; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    const offset = (x % (IMAGE_BYTES / 512 - 64)) * 512;
    await client.write(randomBytes(512 * (1 + (x % 40))), offset);
  }
  await client.flush();
  await client.close();
}

/**
 * Copy only the extents the image marks changed in `context` onto `target`, with libnbd's
 * Python binding; returns the bytes copied.
 */
function applyChanged(box: Sandbox, exportName: string, context: string, target: string): number {
  const script = `
import nbd, sys
h = nbd.NBD()
h.add_meta_context(sys.argv[2])
h.connect_uri(sys.argv[1])
assert h.can_meta_context(sys.argv[2]), "context not offered"
size = h.get_size()
changed = []
def cb(metacontext, offset, entries, err):
    if metacontext != sys.argv[2]:
        return 0
    pos = offset
    for i in range(0, len(entries), 2):
        if entries[i+1] & 1:
            changed.append((pos, entries[i]))
        pos += entries[i]
    return 0
off = 0
while off < size:
    before = len(changed)
    got = []
    def cb2(metacontext, offset, entries, err):
        if metacontext == sys.argv[2]:
            got.append(sum(entries[0::2]))
        return cb(metacontext, offset, entries, err)
    h.block_status(min(size - off, 1 << 30), off, cb2)
    off += got[0]
total = 0
with open(sys.argv[3], 'r+b') as f:
    for (o, n) in changed:
        n = min(n, size - o)
        data = h.pread(n, o)
        f.seek(o)
        f.write(data)
        total += n
print(total)
`;
  const r = spawnSync('/usr/bin/python3', ['-c', script, daemonUri(box, exportName), context, target], { encoding: 'utf8', env: nbdshEnv(), timeout: 60_000 });
  assert.equal(r.status, 0, `libnbd incremental copy: ${r.stderr}`);
  return Number(r.stdout.trim());
}

function fullCopy(box: Sandbox, exportName: string, file: string): void {
  const r = spawnSync('nbdcopy', [daemonUri(box, exportName), file], { encoding: 'utf8', timeout: 60_000 });
  assert.equal(r.status, 0, `nbdcopy: ${r.stderr}`);
}

for (const killBetween of [false, true]) {
  test(`incremental copy with standard tools from the image's qemu:dirty-bitmap${killBetween ? ', across a daemon SIGKILL' : ''}`, { timeout: 120_000 }, async (t) => {
    const box = sandbox(t);
    const device = makeImage(path.join(box.top, 'a.img'), IMAGE_BYTES, (b) => randomBytes(b.length).copy(b));
    let daemon = await startDaemon(t, { sandbox: box, password: false });
    register(box, device);
    await writeSome(box, device, 50, 1);
    const first = snapshot(box, device);
    const cbt1 = first.images[0]?.cbt;
    assert.ok(cbt1, 'the image records its change-map point');
    const copy = path.join(box.top, 'copy.img');
    fullCopy(box, first.images[0]!.exportName, copy);
    ok(box, ['snapshot', 'destroy', first.id]);

    await writeSome(box, device, 200, 2);
    if (killBetween) {
      // Killed once its writes have settled (50 ms without one): a kill while they ran would
      // leave the daemon's last writes indistinguishable from anyone else's, and reset the map.
      await new Promise((resolve) => setTimeout(resolve, 500));
      daemon.server.kill('SIGKILL');
      await daemon.server.stop();
      daemon = await startDaemon(t, { sandbox: box, password: false });
    }
    await writeSome(box, device, 100, 3);
    const second = snapshot(box, device);
    const cbt2 = second.images[0]?.cbt;
    assert.equal(cbt2?.generation, cbt1.generation, 'the generation survived');
    assert.equal(cbt2?.number, cbt1.number + 1);
    const context = `qemu:dirty-bitmap:${cbt1.generation}:${cbt1.number}`;

    // nbdinfo lists and maps the context.
    const list = spawnSync('nbdinfo', ['--list', '--content', daemonUri(box, second.images[0]!.exportName)], { encoding: 'utf8', timeout: 30_000 });
    const mapped = spawnSync('nbdinfo', [`--map=${context}`, daemonUri(box, second.images[0]!.exportName)], { encoding: 'utf8', timeout: 30_000 });
    assert.equal(mapped.status, 0, `nbdinfo --map: ${mapped.stderr}${list.stderr}`);
    assert.match(mapped.stdout, /dirty/, 'some extents are dirty');
    assert.match(mapped.stdout, /clean/, 'some extents are clean');

    const copied = applyChanged(box, second.images[0]!.exportName, context, copy);
    assert.ok(copied > 0 && copied < IMAGE_BYTES / 2, `copied ${copied} bytes: only the changed extents`);
    const image = path.join(box.top, 'image2.img');
    fullCopy(box, second.images[0]!.exportName, image);
    assert.deepEqual(fs.readFileSync(copy), fs.readFileSync(image), 'copy of image 1 + changed extents = image 2');
    assert.deepEqual(fs.readFileSync(image), fs.readFileSync(device), 'image 2 is the idle device');
  });
}

test('an image file changed while the daemon was stopped resets the generation, with an event', { timeout: 90_000 }, async (t) => {
  const box = sandbox(t);
  const device = makeImage(path.join(box.top, 'a.img'), IMAGE_BYTES, 0);
  const daemon = await startDaemon(t, { sandbox: box, password: false });
  register(box, device);
  await writeSome(box, device, 10, 5);
  const before = JSON.parse(ok(box, ['cbt', 'info', device, '--json'])) as { generation: string; number: number; blockSize: number };
  assert.equal(before.blockSize, 64 * 1024);
  await daemon.server.stop();
  await new Promise((r) => setTimeout(r, 20));
  const fd = fs.openSync(device, 'r+');
  fs.writeSync(fd, Buffer.alloc(4096, 1), 0, 4096, 8192);
  fs.closeSync(fd);
  const later = new Date(Date.now() + 5000);
  fs.utimesSync(device, later, later);

  await startDaemon(t, { sandbox: box, password: false });
  const after = JSON.parse(ok(box, ['cbt', 'info', device, '--json'])) as { generation: string; number: number };
  assert.notEqual(after.generation, before.generation, 'a new generation');
  const events = ok(box, ['events', '--json']).trim().split('\n').map((l) => JSON.parse(l) as { type: string; device?: string; details: { reason?: string } });
  const reset = events.find((e) => e.type === 'cbt-reset' && e.device === device && e.details.reason === 'changed-outside');
  assert.ok(reset, `a cbt-reset event says why: ${JSON.stringify(events.map((e) => [e.type, e.details.reason]))}`);
});

test('cbt commands: info, map --since, mark-dirty, reset, and clear refusals', { timeout: 60_000 }, async (t) => {
  const box = sandbox(t);
  const device = makeImage(path.join(box.top, 'a.img'), IMAGE_BYTES, 0);
  await startDaemon(t, { sandbox: box, password: false });
  const unknown = cli(box, ['cbt', 'info', device]);
  assert.notEqual(unknown.status, 0, 'a device the daemon never served is refused');
  assert.match(unknown.stderr, /not registered/);

  const first = snapshot(box, device); // registers the device; number 1 is taken
  ok(box, ['snapshot', 'destroy', first.id]);
  const client = await NbdClient.connect({ socketPath: path.join(box.runDir, 'nbd.sock'), exportName: device });
  await client.write(Buffer.alloc(4096, 7), 0);
  await client.write(Buffer.alloc(4096, 7), IMAGE_BYTES - 4096);
  await client.close();
  const map = JSON.parse(ok(box, ['cbt', 'map', device, '--since', '1', '--json'])) as { ranges: Array<{ offsetBytes: number; lengthBytes: number }>; blockSize: number };
  assert.deepEqual(map.ranges, [{ offsetBytes: 0, lengthBytes: map.blockSize }, { offsetBytes: IMAGE_BYTES - map.blockSize, lengthBytes: map.blockSize }]);
  const text = ok(box, ['cbt', 'map', device, '--since', '1']);
  assert.match(text, /^0:65536$/m);
  const picture = ok(box, ['cbt', 'map', device, '--since', '1', '--picture']);
  assert.ok(picture.split('\n').length > 3, 'the picture has rows');
  const svg = path.join(box.top, 'map.svg');
  ok(box, ['cbt', 'map', device, '--since', '1', '--svg', svg]);
  assert.match(fs.readFileSync(svg, 'utf8'), /<svg[\s>]/);
  // Root does not write the picture through a symlink someone planted at that name.
  const secret = path.join(box.top, 'secret');
  fs.writeFileSync(secret, 'root only\n', { mode: 0o600 });
  const planted = path.join(box.top, 'planted.svg');
  fs.symlinkSync(secret, planted);
  const refused = cli(box, ['cbt', 'map', device, '--since', '1', '--svg', planted]);
  assert.notEqual(refused.status, 0);
  assert.match(refused.stderr, /is a symbolic link; it is not written through/);
  assert.equal(fs.readFileSync(secret, 'utf8'), 'root only\n');
  // Nor is it held up by a FIFO planted there: the open waited for a reader that never came.
  const fifo = path.join(box.top, 'fifo.svg');
  spawnSync('mkfifo', [fifo]);
  const fromFifo = cli(box, ['cbt', 'map', device, '--since', '1', '--svg', fifo], '', ['timeout', '20']);
  assert.notEqual(fromFifo.status, 124, 'the command does not hang on the FIFO');
  assert.match(fromFifo.stderr, /fifo\.svg is not a regular file/);

  ok(box, ['cbt', 'mark-dirty', device, '1M:64K']);
  const marked = JSON.parse(ok(box, ['cbt', 'map', device, '--since', '1', '--json'])) as { ranges: Array<{ offsetBytes: number }> };
  assert.ok(marked.ranges.some((r) => r.offsetBytes === 1 << 20), 'the marked range is reported');
  const bad = cli(box, ['cbt', 'mark-dirty', device, 'nonsense']);
  assert.notEqual(bad.status, 0);
  assert.match(bad.stderr, /bad range/);

  const info = JSON.parse(ok(box, ['cbt', 'info', device, '--json'])) as { generation: string };
  const reset = JSON.parse(ok(box, ['cbt', 'reset', device, '--json'])) as { generation: string; number: number };
  assert.notEqual(reset.generation, info.generation);
  const empty = JSON.parse(ok(box, ['cbt', 'map', device, '--since', '0', '--json'])) as { ranges: unknown[] };
  assert.deepEqual(empty.ranges, [], 'a new generation has seen no change yet');
  // A point remembered with its generation is refused once that generation has ended, never answered from the new one.
  const ended = cli(box, ['cbt', 'map', device, '--since', `${info.generation}:1`]);
  assert.equal(ended.status, 1, 'a number of an ended generation is refused');
  assert.match(ended.stderr, new RegExp(`generation ${info.generation} of .* has ended .*now generation ${reset.generation}.*read the device whole`));
  const current = JSON.parse(ok(box, ['cbt', 'map', device, '--since', `${reset.generation}:0`, '--json'])) as { generation: string };
  assert.equal(current.generation, reset.generation, 'the current generation answers');
  assert.match(cli(box, ['cbt', 'map', device, '--since', 'x:1']).stderr, /bad --since "x:1"/);
});

test('a daemon started with --no-change-tracking keeps no map and says so', { timeout: 60_000 }, async (t) => {
  const box = sandbox(t);
  const device = makeImage(path.join(box.top, 'a.img'), 1 << 20, 0);
  await startDaemon(t, { sandbox: box, password: false, extraArgs: ['--no-change-tracking'] });
  const snap = snapshot(box, device);
  assert.equal(snap.images[0]?.cbt, null, 'the image has no change-map point');
  ok(box, ['snapshot', 'destroy', snap.id]);
  const r = cli(box, ['cbt', 'info', device]);
  assert.notEqual(r.status, 0);
  assert.match(r.stderr, /change tracking is off/);
  assert.equal(fs.existsSync(path.join(box.stateDir, 'cbt')), false, 'no map file was written');
});
