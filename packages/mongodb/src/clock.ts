import type { Db } from 'mongodb';

/**
 * A shared first-use command (the clock's first `hello`, the `buildInfo` behind `fencing:
 * 'auto'`) still unanswered after this long is asked again by the next operation, while those
 * already waiting go on waiting. Sent on a connection gone silent (a client without
 * `socketTimeoutMS`), such a command never answers, and every operation used to wait on it for
 * good, after the network came back too. A slow but healthy first answer is still taken.
 */
export const ASK_AGAIN_AFTER_MS = 5_000;

/** Current time in epoch ms by the store's clock. */
export interface StoreClock {
  now(): Promise<number>;
}

export const localClock: StoreClock = { now: async () => Date.now() };

/**
 * Estimates the MongoDB server's clock without a round trip per operation. FerretDB v1 has no
 * `$$NOW` in updates and MongoDB's `$$NOW` cannot drive an upsert's filter, so the time has to
 * be computed here: `hello.localTime` is read once (and re-read in the background every
 * `refreshMs`), compensated by half the round trip, and kept as an offset to `Date.now()`.
 * Precision: ± half the `hello` round trip (plus the server's 1 ms resolution). The first sync
 * takes two samples (the first may include opening a connection) and keeps the shorter one.
 */
export class ServerClock implements StoreClock {
  #offset = 0;
  #syncedAt: number | undefined;
  #first: { readonly done: Promise<void>; readonly startedAt: number } | undefined;
  /** When the sync whose offset is in use started: an older one answering late is dropped. */
  #appliedStartedAt = -Infinity;
  #refreshing = false;

  constructor(
    private readonly db: Db,
    private readonly refreshMs: number,
  ) {}

  async now(): Promise<number> {
    if (this.#syncedAt === undefined) {
      // The first operations wait for one sync; a failure rejects them and the next call retries.
      // One still unanswered after ASK_AGAIN_AFTER_MS is asked again by the next call.
      const startedAt = Date.now();
      if (this.#first === undefined || startedAt - this.#first.startedAt >= ASK_AGAIN_AFTER_MS) {
        const first = {
          startedAt,
          done: this.#sync(startedAt).finally(() => {
            if (this.#first === first) this.#first = undefined;
          }),
        };
        this.#first = first;
      }
      await this.#first.done;
    } else if (!this.#refreshing && Date.now() - this.#syncedAt >= this.refreshMs) {
      this.#refreshing = true;
      // Background refresh keeps operations at one round trip. If it fails the old offset stays
      // (it was right a minute ago) and the next operation retries; the operation's own command
      // surfaces a broken connection to the caller.
      this.#sync(Date.now())
        .catch(() => undefined)
        .finally(() => {
          this.#refreshing = false;
        });
    }
    return Date.now() + this.#offset;
  }

  /** Measured offset (server minus local), in ms. */
  get offsetMs(): number {
    return this.#offset;
  }

  async #sync(startedAt: number): Promise<void> {
    let best = await this.#sample();
    // The first `hello` of a client often opens its pool's first connection (TCP, TLS, auth),
    // which the round trip then includes and which skews the midpoint by tens of ms over TLS.
    // So the first sync takes a second sample and keeps the shorter round trip.
    if (this.#syncedAt === undefined) {
      const second = await this.#sample();
      if (second.roundTripMs <= best.roundTripMs) best = second;
    }
    // A sync asked again after this one began has set the clock already: this one's samples
    // (their round trip as long as the wait, so their midpoint far off) must not replace it.
    if (startedAt < this.#appliedStartedAt) return;
    this.#appliedStartedAt = startedAt;
    this.#offset = best.offsetMs;
    this.#syncedAt = Date.now();
  }

  async #sample(): Promise<{ offsetMs: number; roundTripMs: number }> {
    const sent = Date.now();
    const reply = await this.db.admin().command({ hello: 1 });
    const received = Date.now();
    const localTime: unknown = reply['localTime'];
    if (!(localTime instanceof Date) || Number.isNaN(localTime.getTime())) {
      throw new Error('[idemkit] [mongodb] The server answered `hello` without `localTime`; use clock: "local".');
    }
    // The server stamped localTime about halfway through the round trip.
    return { offsetMs: Math.round(localTime.getTime() - (sent + (received - sent) / 2)), roundTripMs: received - sent };
  }
}
