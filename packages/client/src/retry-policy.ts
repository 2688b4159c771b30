/** Statuses worth another attempt with the same key (SPEC §2 and issue #8). */
export function defaultRetryOn(status: number): boolean {
  return status === 408 || status === 409 || status === 425 || status === 429 || status >= 500;
}

/**
 * Exponential backoff with full jitter: a random delay in [0, min(max, base·2^(n-1))], so many
 * clients that failed together do not retry together.
 */
export function backoffDelay(attempt: number, baseMs: number, maxMs: number, random: () => number): number {
  const ceiling = Math.min(maxMs, baseMs * 2 ** Math.max(0, attempt - 1));
  return Math.round(random() * ceiling);
}

/** `Retry-After` as milliseconds: delta-seconds or an HTTP date; undefined when absent or unreadable. */
export function parseRetryAfter(value: string | null, now = Date.now()): number | undefined {
  if (value === null) return undefined;
  const trimmed = value.trim();
  // Two Retry-After lines arrive joined ("2, 2"): the first one counts.
  const seconds = /^(\d+)(?:\s*,\s*\d+)*$/.exec(trimmed);
  if (seconds) return Number(seconds[1]) * 1000;
  // An HTTP date names its day or month; Date.parse would read "1 2" as a date long past.
  if (!/[a-z]/i.test(trimmed)) return undefined;
  // Joined lines of IMF-fixdate ("Sun, 29 Nov 2026 18:00:00 GMT, Sun, ...") hold commas of their own:
  // read up to the first "GMT".
  const first = /^.*?\bGMT\b/i.exec(trimmed)?.[0] ?? trimmed;
  const date = Date.parse(first);
  return Number.isNaN(date) ? undefined : Math.max(0, date - now);
}
