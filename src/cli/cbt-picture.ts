/**
 * Pictures of where a device changed, for `bdsnap cbt map --picture` (terminal) and `--svg`.
 * Pure functions: byte ranges in, text out.
 *
 * The device is cut into equal cells laid out row by row, left to right, like the pages of a
 * book. A cell covers a power-of-two number of bytes (so the row labels are round numbers),
 * chosen as the smallest that fits the device into the grid (but not below the tracking block). Its shade is the share of its
 * bytes that changed; any change at all shows (a cell is blank only when nothing in it
 * changed), so a lone 4 KiB write on a terabyte device is never lost in the rounding.
 */

import type { ByteRange } from '../snapshot/change-map/index.js';
import { formatBytes } from '../units.js';

export interface PictureOptions {
  /** Cells per row; default 64. */
  columns?: number;
  /** Most rows; default 16 (fewer when the device is small). */
  rows?: number;
  /** ANSI colours (terminal picture only). */
  color?: boolean;
  /** The change map's block size, named in the legend. */
  blockSize?: number;
  /** A title line, e.g. the device and the period. */
  title?: string;
}

interface Grid {
  columns: number;
  rows: number;
  cellBytes: number;
  /** Share of each cell that changed, 0..1; NaN for cells past the end of the device. */
  shares: Float64Array;
  changedBytes: number;
  ranges: number;
}

const DEFAULT_COLUMNS = 64;
const DEFAULT_ROWS = 16;
/** Terminal shades: unchanged, then up to 25%, 50%, 75%, 100% of the cell changed. */
const SHADES = ['·', '░', '▒', '▓', '█'];
const ANSI_SHADES = ['\x1b[90m', '\x1b[33m', '\x1b[33;1m', '\x1b[31m', '\x1b[31;1m'];
const ANSI_RESET = '\x1b[0m';
function positiveInteger(value: number | undefined, fallback: number, what: string): number {
  if (value === undefined) return fallback;
  if (!Number.isSafeInteger(value) || value < 1) throw new RangeError(`${what} must be a positive integer, got ${value}`);
  return value;
}

function buildGrid(ranges: readonly ByteRange[], deviceSizeBytes: number, options: PictureOptions): Grid {
  const columns = positiveInteger(options.columns, DEFAULT_COLUMNS, 'columns');
  const maxRows = positiveInteger(options.rows, DEFAULT_ROWS, 'rows');
  // Never finer than the tracking block (or 4 KiB): smaller cells would only repeat it.
  let cellBytes = 1;
  while (cellBytes < (options.blockSize ?? 4096)) cellBytes *= 2;
  while (cellBytes * columns * maxRows < deviceSizeBytes) cellBytes *= 2;
  const cells = Math.max(1, Math.ceil(deviceSizeBytes / cellBytes));
  const rows = Math.max(1, Math.ceil(cells / columns));
  const changed = new Float64Array(rows * columns);
  let changedBytes = 0;
  for (const r of ranges) {
    const start = Math.max(0, r.offsetBytes);
    const end = Math.min(deviceSizeBytes, r.offsetBytes + r.lengthBytes);
    if (end <= start) continue;
    changedBytes += end - start;
    for (let cell = Math.floor(start / cellBytes); cell * cellBytes < end; cell++) {
      const from = Math.max(start, cell * cellBytes);
      const to = Math.min(end, (cell + 1) * cellBytes);
      changed[cell]! += to - from;
    }
  }
  const shares = new Float64Array(rows * columns);
  for (let cell = 0; cell < shares.length; cell++) {
    const inDevice = Math.min(cellBytes, deviceSizeBytes - cell * cellBytes);
    shares[cell] = inDevice > 0 ? Math.min(1, changed[cell]! / inDevice) : Number.NaN;
  }
  return { columns, rows, cellBytes, shares, changedBytes, ranges: ranges.length };
}

/** 0 = unchanged, 1..4 = up to a quarter, half, three quarters, all of the cell. */
function shadeLevel(share: number): number {
  if (share <= 0) return 0;
  return Math.min(4, Math.max(1, Math.ceil(share * 4)));
}

function totalsLine(grid: Grid, deviceSizeBytes: number): string {
  const percent = deviceSizeBytes > 0 ? (100 * grid.changedBytes) / deviceSizeBytes : 0;
  const percentText = percent > 0 && percent < 0.1 ? '<0.1' : percent.toFixed(1);
  return `changed: ${formatBytes(grid.changedBytes)} of ${formatBytes(deviceSizeBytes)} (${percentText}%) in ${grid.ranges} range${grid.ranges === 1 ? '' : 's'}`;
}

function cellLine(grid: Grid, options: PictureOptions): string {
  const block = options.blockSize ? `, tracking blocks of ${formatBytes(options.blockSize)}` : '';
  return `one cell = ${formatBytes(grid.cellBytes)}, one row = ${formatBytes(grid.cellBytes * grid.columns)}${block}`;
}

/**
 * The device as a grid of text cells, one line per row with its starting offset on the left,
 * then a legend: what a cell covers, the shade key and the totals.
 */
export function renderChangePicture(ranges: readonly ByteRange[], deviceSizeBytes: number, options: PictureOptions = {}): string {
  const grid = buildGrid(ranges, deviceSizeBytes, options);
  const color = options.color ?? false;
  const rowBytes = grid.cellBytes * grid.columns;
  const labels = Array.from({ length: grid.rows }, (_, row) => formatBytes(row * rowBytes));
  const labelWidth = Math.max(...labels.map((l) => l.length));
  const lines: string[] = [];
  if (options.title) lines.push(options.title);
  for (let row = 0; row < grid.rows; row++) {
    let text = '';
    let open = -1;
    for (let col = 0; col < grid.columns; col++) {
      const share = grid.shares[row * grid.columns + col]!;
      if (Number.isNaN(share)) {
        if (color && open >= 0) {
          text += ANSI_RESET;
          open = -1;
        }
        text += ' ';
        continue;
      }
      const level = shadeLevel(share);
      if (color && level !== open) {
        text += ANSI_SHADES[level];
        open = level;
      }
      text += SHADES[level];
    }
    if (color && open >= 0) text += ANSI_RESET;
    lines.push(`${labels[row]!.padStart(labelWidth)} │${text.trimEnd()}`);
  }
  lines.push('');
  lines.push(cellLine(grid, options));
  const key = SHADES.map((s, i) => {
    const shade = color ? `${ANSI_SHADES[i]}${s}${ANSI_RESET}` : s;
    return `${shade} ${['unchanged', '≤25%', '≤50%', '≤75%', '≤100%'][i]}`;
  }).join('  ');
  lines.push(`${key}  (share of the cell changed)`);
  lines.push(totalsLine(grid, deviceSizeBytes));
  return `${lines.join('\n')}\n`;
}

function escapeXml(text: string): string {
  return text.replace(/[<>&"']/g, (c) => ({ '<': '&lt;', '>': '&gt;', '&': '&amp;', '"': '&quot;', "'": '&apos;' })[c] ?? c);
}

/** Colour of a changed share: from a pale amber (a touch) to a deep red (all of it). */
function changedColor(share: number): string {
  const t = Math.sqrt(Math.min(1, Math.max(0, share)));
  const mix = (a: number, b: number): number => Math.round(a + (b - a) * t);
  const hex = (v: number): string => v.toString(16).padStart(2, '0');
  return `#${hex(mix(0xfd, 0xb3))}${hex(mix(0xd4, 0x00))}${hex(mix(0x9e, 0x1e))}`;
}

const UNCHANGED_COLOR = '#e8ecf1';

/** The same picture as a standalone SVG document, with colours graded by the changed share. */
export function renderChangeSvg(ranges: readonly ByteRange[], deviceSizeBytes: number, options: PictureOptions & { cellPixels?: number } = {}): string {
  const grid = buildGrid(ranges, deviceSizeBytes, options);
  const cell = positiveInteger(options.cellPixels, 12, 'cellPixels');
  const gap = cell >= 6 ? 1 : 0;
  const rowBytes = grid.cellBytes * grid.columns;
  const labels = Array.from({ length: grid.rows }, (_, row) => formatBytes(row * rowBytes));
  const font = 12;
  const labelWidth = Math.max(...labels.map((l) => l.length)) * 7 + 12;
  const top = options.title ? 30 : 10;
  const gridWidth = grid.columns * cell;
  const gridHeight = grid.rows * cell;
  const legendTop = top + gridHeight + 16;
  const width = Math.max(labelWidth + gridWidth + 10, 480);
  const height = legendTop + 70;
  const out: string[] = [];
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="${font}">`);
  out.push(`<rect width="${width}" height="${height}" fill="#ffffff"/>`);
  if (options.title) out.push(`<text x="10" y="20" font-size="14" font-weight="bold">${escapeXml(options.title)}</text>`);
  for (let row = 0; row < grid.rows; row++) {
    const y = top + row * cell;
    out.push(`<text x="${labelWidth - 6}" y="${y + cell - 2}" text-anchor="end" fill="#555">${escapeXml(labels[row]!)}</text>`);
    for (let col = 0; col < grid.columns; col++) {
      const share = grid.shares[row * grid.columns + col]!;
      if (Number.isNaN(share)) continue;
      const fill = share > 0 ? changedColor(share) : UNCHANGED_COLOR;
      const from = (row * grid.columns + col) * grid.cellBytes;
      const tip = `${formatBytes(from)} – ${formatBytes(Math.min(deviceSizeBytes, from + grid.cellBytes))}: ${(share * 100).toFixed(share > 0 && share < 0.01 ? 2 : 0)}% changed`;
      out.push(`<rect x="${labelWidth + col * cell}" y="${y}" width="${cell - gap}" height="${cell - gap}" fill="${fill}"><title>${escapeXml(tip)}</title></rect>`);
    }
  }
  out.push(`<text x="10" y="${legendTop + 4}">${escapeXml(cellLine(grid, options))}</text>`);
  const keyY = legendTop + 16;
  const keys: Array<[string, string]> = [[UNCHANGED_COLOR, 'unchanged'], [changedColor(0.02), 'a little'], [changedColor(0.5), 'half'], [changedColor(1), 'all of the cell changed']];
  let x = 10;
  for (const [fill, text] of keys) {
    out.push(`<rect x="${x}" y="${keyY}" width="${cell}" height="${cell}" fill="${fill}" stroke="#999" stroke-width="0.5"/>`);
    out.push(`<text x="${x + cell + 4}" y="${keyY + cell - 2}">${escapeXml(text)}</text>`);
    // About 7.5 px per character of a 12 px sans-serif font, then a gap.
    x += cell + 4 + Math.ceil(text.length * 7.5) + 16;
  }
  out.push(`<text x="10" y="${keyY + cell + 20}">${escapeXml(totalsLine(grid, deviceSizeBytes))}</text>`);
  out.push('</svg>');
  return `${out.join('\n')}\n`;
}
