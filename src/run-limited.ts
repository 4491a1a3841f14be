/** Bounded concurrency for the many small steps of a backup (pieces, files, directories). */

/** Run `fn` over `items` with at most `limit` in flight; the first failure is thrown after the rest settle. */
export async function runLimited<T>(items: Iterable<T>, limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  const it = items[Symbol.iterator]();
  let failure: { err: unknown } | undefined;
  const lane = async (): Promise<void> => {
    for (;;) {
      if (failure) return;
      const next = it.next();
      if (next.done) return;
      try {
        await fn(next.value);
      } catch (err) {
        failure ??= { err };
      }
    }
  };
  await Promise.all(Array.from({ length: limit }, lane));
  if (failure) throw failure.err;
}
