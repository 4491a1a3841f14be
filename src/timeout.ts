/**
 * A promise bounded in time: `promise`, or the error `timedOut()` gives (it may also let go of
 * what the promise waits on) once `ms` have passed; `ms` undefined waits forever.
 */
export function withTimeout<T>(promise: Promise<T>, ms: number | undefined, timedOut: () => Error): Promise<T> {
  if (ms === undefined) return promise;
  let timer: NodeJS.Timeout | undefined;
  const expired = new Promise<never>((_resolve, reject) => {
    timer = setTimeout(() => reject(timedOut()), ms);
  });
  return Promise.race([promise, expired]).finally(() => clearTimeout(timer));
}
