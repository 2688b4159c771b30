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
  /**
   * What the last `hello` said: true for a standalone (no `setName`, not a mongos, not behind a
   * load balancer), where the driver retries no writes; undefined when not known.
   */
  readonly standalone?: boolean | undefined;
}

export const localClock: StoreClock = { now: async () => Date.now() };

/**
 * Milliseconds on a monotonic clock (`performance.now()`): never stepped by NTP or by an admin
 * setting the date, unlike `Date.now()`. Read at each call, so fake timers that fake
 * `performance` drive it (as they drive core's lease timing).
 */
export function monotonicNow(): number {
  return performance.now();
}

/**
 * Wall and monotonic elapsed times that differ by more than this since the offset was measured
 * mean the wall clock was stepped or the machine was suspended (a monotonic clock stops during a
 * suspend while the server's clock runs on): the offset is measured again before it is used.
 */
export const CLOCK_JUMP_MS = 1_000;

/**
 * Estimates the MongoDB server's clock without a round trip per operation. FerretDB v1 has no
 * `$$NOW` in updates and MongoDB's `$$NOW` cannot drive an upsert's filter, so the time has to
 * be computed here: `hello.localTime` is read once (and re-read in the background every
 * `refreshMs`), compensated by half the round trip, and kept as an offset to a monotonic clock.
 * Not to `Date.now()`: a wall clock stepped back after the sync (an NTP step, a resumed VM) made
 * every lease written end that much early, so another process took it over at once and the
 * handler ran twice, and the refresh, timed by the same clock, did not come for minutes. A step
 * or a suspend (see CLOCK_JUMP_MS) makes the next operation wait for a new sync.
 * Precision: ± half the `hello` round trip (plus the server's 1 ms resolution). The first sync
 * takes two samples (the first may include opening a connection) and keeps the shorter one.
 * A later sample replaces the offset only when its round trip is no worse than about twice the
 * one in use (see `#keep`): a stalled answer or a connection being opened puts the midpoint of a
 * long round trip seconds off, and a running lease would then be taken over early.
 */
export class ServerClock implements StoreClock {
  /** Server time minus monotonic time, in ms. */
  #offset = 0;
  /** The round trip of the sample the offset came from (its error is at most half of it). */
  #roundTripMs = Number.POSITIVE_INFINITY;
  /** When the offset in use was measured (monotonic), and the wall clock then. */
  #measuredAt = 0;
  #measuredWall = 0;
  /** When the last sync was asked for (monotonic): refreshes go out every `refreshMs`, kept or not. */
  #askedAt: number | undefined;
  #synced = false;
  /** Bumped when a clock jump discards the offset: samples begun before it are not used. */
  #epoch = 0;
  /** The newest sync in flight. */
  #asking: { readonly done: Promise<void>; readonly startedAt: number } | undefined;
  /** Resolves when any sync has set the clock: every operation waiting for the first one goes on. */
  #ready!: Promise<void>;
  #markReady: () => void = () => undefined;
  /** See StoreClock.standalone: from every `hello` answered, kept or not. */
  standalone: boolean | undefined;

  constructor(
    private readonly db: Db,
    private readonly refreshMs: number,
  ) {
    this.#unsync();
  }

  async now(): Promise<number> {
    const at = monotonicNow();
    if (this.#synced && Math.abs(Date.now() - this.#measuredWall - (at - this.#measuredAt)) > CLOCK_JUMP_MS) {
      // The wall clock jumped, or the machine slept: the offset may be off by that much.
      this.#unsync();
    }
    if (!this.#synced) {
      // The first operations wait for a sync: the one they find or ask for, or any later one
      // that sets the clock first (one unanswered for ASK_AGAIN_AFTER_MS is asked again). A
      // failure of their own rejects them, and the next operation asks again.
      await Promise.race([this.#ready, this.#ask(at)]);
    } else if (at - (this.#askedAt ?? 0) >= this.refreshMs) {
      // Background refresh keeps operations at one round trip. If it fails the old offset stays
      // (it was right a minute ago) and a later operation asks again; the operation's own
      // command surfaces a broken connection to the caller.
      this.#ask(at).catch(() => undefined);
    }
    return Math.round(monotonicNow() + this.#offset);
  }

  /** Measured offset (server minus local wall clock), in ms. */
  get offsetMs(): number {
    return Math.round(monotonicNow() + this.#offset - Date.now());
  }

  /** Forget the offset: the next operations wait for a new first sync. */
  #unsync(): void {
    this.#epoch++;
    this.#synced = false;
    this.#roundTripMs = Number.POSITIVE_INFINITY;
    this.#asking = undefined;
    this.#ready = new Promise<void>((resolve) => (this.#markReady = resolve));
  }

  /** The sync in flight, or a new one when there is none or it has gone ASK_AGAIN_AFTER_MS unanswered. */
  #ask(at: number): Promise<void> {
    if (this.#asking !== undefined && at - this.#asking.startedAt < ASK_AGAIN_AFTER_MS) return this.#asking.done;
    this.#askedAt = at;
    const asking = {
      startedAt: at,
      done: this.#sync().finally(() => {
        if (this.#asking === asking) this.#asking = undefined;
      }),
    };
    this.#asking = asking;
    return asking.done;
  }

  async #sync(): Promise<void> {
    const epoch = this.#epoch;
    let best = await this.#sample();
    // The first `hello` of a client often opens its pool's first connection (TCP, TLS, auth),
    // which the round trip then includes and which skews the midpoint by tens of ms over TLS.
    // So the first sync takes a second sample and keeps the shorter round trip.
    if (!this.#synced) {
      const second = await this.#sample();
      if (second.roundTripMs <= best.roundTripMs) best = second;
    }
    if (epoch === this.#epoch) this.#keep(best);
  }

  /**
   * Use a sample unless its round trip is more than twice the one in use plus 20 ms: then its
   * midpoint may be off by more than the offset in use, which clocks do not drift from in
   * minutes. After ten refresh periods any sample is taken, so a lasting change of the network
   * (a longer route) is followed.
   */
  #keep(sample: { offsetMs: number; roundTripMs: number }): void {
    const measured = monotonicNow();
    const worse = sample.roundTripMs > this.#roundTripMs * 2 + 20;
    if (worse && measured - this.#measuredAt < 10 * this.refreshMs) return;
    this.#offset = sample.offsetMs;
    this.#roundTripMs = sample.roundTripMs;
    this.#measuredAt = measured;
    this.#measuredWall = Date.now();
    this.#synced = true;
    this.#markReady();
  }

  async #sample(): Promise<{ offsetMs: number; roundTripMs: number }> {
    const sent = monotonicNow();
    const reply = await this.db.admin().command({ hello: 1 });
    const received = monotonicNow();
    this.standalone = !('setName' in reply) && reply['msg'] !== 'isdbgrid' && !('serviceId' in reply);
    const localTime: unknown = reply['localTime'];
    if (!(localTime instanceof Date) || Number.isNaN(localTime.getTime())) {
      throw new Error('[idemkit] [mongodb] The server answered `hello` without `localTime`; use clock: "local".');
    }
    // The server stamped localTime about halfway through the round trip.
    return { offsetMs: localTime.getTime() - (sent + (received - sent) / 2), roundTripMs: received - sent };
  }
}
