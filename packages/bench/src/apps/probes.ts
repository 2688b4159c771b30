/**
 * `--probes`: not libraries, the floor under any of them. `probe-hook` adds one hook that does
 * nothing (the price of being a plugin at all); `probe-store` adds one that keeps every answer
 * (status, a copy of the headers, the body bytes) under the request's key in a Map capped like
 * core's memory store. No key rules, no fingerprint, no lease, no await and no replay: the least
 * a layer that stores answers must do per request. They are not idempotent (the race check is
 * skipped for them), and a "replay" row of theirs runs the handler like bare.
 */
export class AnswerKeeper {
  readonly #answers = new Map<string, KeptAnswer>();

  constructor(readonly max = 10_000) {}

  get size(): number {
    return this.#answers.size;
  }

  keep(key: unknown, status: number, headers: Readonly<Record<string, unknown>>, body: Uint8Array): void {
    if (typeof key !== 'string') return;
    this.#answers.set(key, { status, headers: { ...headers }, body });
    // Evicted 1% at a time, oldest first, as core's memory store does.
    if (this.#answers.size <= this.max) return;
    let evict = Math.max(1, Math.floor(this.max / 100));
    for (const old of this.#answers.keys()) {
      this.#answers.delete(old);
      if (--evict === 0) break;
    }
  }
}

interface KeptAnswer {
  readonly status: number;
  readonly headers: Readonly<Record<string, unknown>>;
  readonly body: Uint8Array;
}

/** The bytes of an answer as a framework hands it over (a string, a Buffer, or nothing). */
export function answerBytes(payload: unknown): Uint8Array {
  if (typeof payload === 'string') return Buffer.from(payload);
  if (payload instanceof Uint8Array) return payload;
  return new Uint8Array(0);
}
