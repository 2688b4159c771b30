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

const POLL_FLOOR_MS = 10;

/**
 * The wait before asking an idemkit server again about a request it still runs (its 409): the
 * backoff ceiling of the `n`th such wait, jittered between half and all of it, so a short
 * operation's replay is fetched soon after it ends while a long one is asked less and less often.
 * The ceiling is at most `maxMs` but never under 10 ms, whatever `baseMs` and `maxMs` say.
 */
export function pollDelay(n: number, baseMs: number, maxMs: number, random: () => number): number {
  // At least 10 ms, from the start (`baseDelayMs: 0`) and after the cap (`maxDelayMs: 0`): the
  // polls, which no maxAttempts bounds, would otherwise go out back to back until the deadline.
  const ceiling = Math.max(POLL_FLOOR_MS, Math.min(maxMs, Math.max(baseMs, POLL_FLOOR_MS) * 2 ** Math.max(0, n - 1)));
  return Math.round(ceiling / 2 + (random() * ceiling) / 2);
}

// The three date forms RFC 9110 §5.6.7 allows, each always in GMT. Anything else is no date:
// V8's Date.parse reads nearly any text with a letter in it ("in 5" is a date long past).
const IMF_FIXDATE = /^[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT/;
const RFC850_DATE = /^[A-Z][a-z]{5,8}, \d{2}-[A-Z][a-z]{2}-\d{2} \d{2}:\d{2}:\d{2} GMT/;
const ASCTIME_DATE = /^[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d{2}:\d{2}:\d{2} \d{4}/;

/** `Retry-After` as milliseconds: delta-seconds or an HTTP date; undefined when absent or unreadable. */
export function parseRetryAfter(value: string | null, now = Date.now()): number | undefined {
  if (value === null) return undefined;
  const trimmed = value.trim();
  // Two Retry-After lines arrive joined ("2, 2"): the first one counts.
  const seconds = /^(\d+)\s*(?:,|$)/.exec(trimmed);
  if (seconds) return Number(seconds[1]) * 1000;
  const date = IMF_FIXDATE.exec(trimmed) ?? RFC850_DATE.exec(trimmed) ?? ASCTIME_DATE.exec(trimmed);
  if (!date) return undefined;
  // Only the date itself, or the first of joined lines.
  const rest = trimmed.slice(date[0].length).trim();
  if (rest !== '' && !rest.startsWith(',')) return undefined;
  // asctime names no zone: GMT, as the others say (Date.parse would take the machine's own).
  const at = Date.parse(date[0].endsWith('GMT') ? date[0] : `${date[0]} GMT`);
  return Number.isNaN(at) ? undefined : Math.max(0, at - now);
}
