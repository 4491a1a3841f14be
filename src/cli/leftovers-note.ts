/** The note both restore commands print about files earlier, killed restores into the same output left beside it. */

/** Write the note to stderr when `left` is not empty: what they are, and when to remove them. Loaded only when there are some (`--help` loads no more modules). */
export function noteLeftovers(target: string, left: readonly string[]): void {
  if (left.length === 0) return;
  const [files, are, them] = left.length === 1 ? ['a file', 'is', 'it'] : [`${left.length} files`, 'are', 'them'];
  process.stderr.write(`bdsnap: note: ${files} of earlier restores into ${target} that did not finish (killed) ${are} beside it: ${left.join(', ')}; remove ${them} once no other restore into ${target} runs\n`);
}
