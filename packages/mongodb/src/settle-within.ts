/**
 * How long operations wait for a first-call command every operation shares (the clock's first
 * `hello`, the `buildInfo` behind `fencing: 'auto'`) before the next operation asks again. On a
 * connection gone silent (no `socketTimeoutMS` on the client) such a command never answers, and
 * without this limit it held every operation of the store for good, after the network came back.
 */
export const FIRST_CALL_TIMEOUT_MS = 5_000;

/** `work`, or a rejection naming `what` once `ms` have passed without it settling (`work` itself goes on). */
export function settleWithin<T>(work: Promise<T>, ms: number, what: string): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`[idemkit] [mongodb] ${what} did not answer within ${ms} ms.`)), ms);
    work.then(
      (value) => {
        clearTimeout(timer);
        resolve(value);
      },
      (error: unknown) => {
        clearTimeout(timer);
        reject(error as Error);
      },
    );
  });
}
