/**
 * The change picture: a known pattern (the first and the last tenth of the device written)
 * must show exactly the cells it touches, in the terminal picture and in the SVG, with a
 * legend that names the cell size and the totals.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { renderChangePicture, renderChangeSvg } from '../../src/cli/cbt-picture.js';
import { formatBytes } from '../../src/units.js';

const MiB = 1024 * 1024;

/** The grid's cells, row by row, from the terminal picture (labels and legend stripped). */
function cellsOf(picture: string): string[][] {
  return picture.split('\n').filter((l) => l.includes('│')).map((l) => [...l.slice(l.indexOf('│') + 1)]);
}

test('first and last tenth written: exactly the first and last row, full shade', () => {
  const size = 640 * MiB;
  const ranges = [{ offsetBytes: 0, lengthBytes: 64 * MiB }, { offsetBytes: 576 * MiB, lengthBytes: 64 * MiB }];
  const picture = renderChangePicture(ranges, size, { columns: 64, rows: 10, blockSize: 64 * 1024 });
  const rows = cellsOf(picture);
  assert.equal(rows.length, 10, picture);
  for (const [i, row] of rows.entries()) {
    assert.equal(row.length, 64, `row ${i}`);
    const want = i === 0 || i === 9 ? '█' : '·';
    assert.ok(row.every((c) => c === want), `row ${i} is all ${want}:\n${picture}`);
  }
  assert.match(picture, /one cell = 1 MiB, one row = 64 MiB, tracking blocks of 64 KiB/);
  assert.match(picture, /changed: 128 MiB of 640 MiB \(20\.0%\) in 2 ranges/);
  assert.match(picture, /^ +0 B │/m);
  assert.match(picture, /^576 MiB │/m);
});

test('an unaligned device: a cell is marked exactly when a range touches it, however little', () => {
  const size = 1_000_000_000;
  const tenth = size / 10;
  const ranges = [
    { offsetBytes: 0, lengthBytes: tenth },
    { offsetBytes: size - tenth, lengthBytes: tenth },
    { offsetBytes: 500_000_123, lengthBytes: 1 }, // one byte in the middle still shows
  ];
  const picture = renderChangePicture(ranges, size, { columns: 50, rows: 20 });
  const rows = cellsOf(picture);
  const cellBytes = 2 ** Math.ceil(Math.log2(size / (50 * 20)));
  let cell = 0;
  for (const row of rows) {
    for (const c of row) {
      const from = cell * cellBytes;
      const to = Math.min(size, from + cellBytes);
      const touched = ranges.some((r) => r.offsetBytes < to && r.offsetBytes + r.lengthBytes > from);
      if (from >= size) assert.equal(c, ' ');
      else assert.equal(c !== '·', touched, `cell ${cell} (${from}..${to}) shows '${c}'`);
      cell++;
    }
  }
  assert.ok(cell * cellBytes >= size, 'the grid covers the device');
  // The colour version has the same cells once the escapes are gone.
  const colored = renderChangePicture(ranges, size, { columns: 50, rows: 20, color: true });
  assert.ok(colored.includes('\x1b['));
  const escapes = new RegExp(`${String.fromCharCode(27)}\\[[0-9;]*m`, 'g');
  assert.deepEqual(cellsOf(colored.replace(escapes, '')), rows.map((r) => [...r.join('').trimEnd()]));
});

test('the SVG has one coloured cell per touched cell and the same legend', () => {
  const size = 640 * MiB;
  const ranges = [{ offsetBytes: 0, lengthBytes: 64 * MiB }, { offsetBytes: 576 * MiB, lengthBytes: 64 * MiB }];
  const svg = renderChangeSvg(ranges, size, { columns: 64, rows: 10, title: 'disk <1>' });
  assert.match(svg, /^<svg xmlns="http:\/\/www.w3.org\/2000\/svg"/);
  assert.match(svg, /disk &lt;1&gt;/);
  const cells = [...svg.matchAll(/<rect x="\d+" y="\d+" width="\d+" height="\d+" fill="(#[0-9a-f]{6})"><title>/g)].map((m) => m[1]);
  assert.equal(cells.length, 640);
  const unchanged = cells[64 * 5];
  assert.equal(cells.filter((c) => c !== unchanged).length, 128);
  assert.ok(cells.slice(0, 64).every((c) => c !== unchanged) && cells.slice(576).every((c) => c !== unchanged));
  assert.match(svg, /changed: 128 MiB of 640 MiB \(20\.0%\) in 2 ranges/);
});

test('formatBytes and small devices', () => {
  assert.equal(formatBytes(0), '0 B');
  assert.equal(formatBytes(65536), '64 KiB');
  assert.equal(formatBytes(1.5 * 2 ** 30), '1.5 GiB');
  assert.equal(formatBytes(2 ** 40), '1 TiB');
  const tiny = renderChangePicture([], 4096);
  assert.match(tiny, /changed: 0 B of 4 KiB \(0\.0%\) in 0 ranges/);
  assert.equal(cellsOf(tiny).length, 1);
});
