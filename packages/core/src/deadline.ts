/** A store call that did not answer within `storeTimeoutMs`. Becomes the `cause` of a 503. */
export class StoreTimeoutError extends Error {
  override readonly name = 'StoreTimeoutError';
  constructor(operation: string, ms: number) {
    super(`[idemkit] Store operation \`${operation}\` did not answer within ${ms} ms.`);
  }
}

/** Race a store call against a deadline, so a hung store never hangs a request (SPEC §2: 503). */
export function withDeadline<T>(operation: string, ms: number, call: () => Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new StoreTimeoutError(operation, ms)), ms);
    timer.unref();
  });
  // `call` may throw synchronously; Promise.resolve().then turns that into a rejection too.
  const work = Promise.resolve().then(call);
  return Promise.race([work, deadline]).finally(() => clearTimeout(timer));
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
